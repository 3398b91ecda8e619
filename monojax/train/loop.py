"""The training loop: data → jitted step → deferred metrics → periodic eval and checkpoints.

One file, big_vision style. Resuming is the default: if the workdir has a checkpoint, the state
and the data iterator continue from it. SIGTERM (TPU preemption) saves at the next step boundary
and returns normally (exit 0). A non-finite loss or gradient stops the run with a message naming
the step; every save is preceded by a synchronous finiteness check, so no bad state is ever saved
and the last good checkpoint stays the newest.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from monojax import errors, sharding
from monojax.data import pipeline, summary, tokenizer as tokenizer_lib
from monojax.train import checkpoint, metrics as metrics_lib, state as state_lib, step as step_lib


class TrainingDiverged(RuntimeError):
  """The loss or the gradient norm became NaN/Inf."""


class _Preemption:
  """Turns SIGTERM into a flag read at step boundaries."""

  def __init__(self, log):
    self.requested = False
    self.log = log
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    self.log("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def _eval(eval_fn, params, cfg, tokenizer, root, mesh) -> dict:
  totals, n, counts = None, 0, np.zeros((tokenizer.vocab_size,), np.int64)
  for batch in pipeline.eval_batches(cfg, tokenizer, root, mesh):
    out = eval_fn(params, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    for shard in batch["tokens"].addressable_shards:  # targets, once per replica, for the unigram baseline
      if shard.replica_id == 0:
        counts += np.bincount(np.asarray(shard.data)[:, 1:].reshape(-1), minlength=len(counts))
    n += 1
  if totals is None:
    raise errors.ConfigError(f"data.val_files: the validation split has fewer than one batch of "
                             f"{cfg.data.global_batch} x {cfg.data.seq_len + 1} tokens")
  t = jax.device_get(totals)
  if jax.process_count() > 1:  # every host saw only its own slice of the batch
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(counts.astype(np.int32))).sum(0)
  p = counts[counts > 0] / counts.sum()
  # Entropy of the evaluated tokens' own unigram distribution: no unigram model can score below it.
  unigram = float(-(p * np.log(p)).sum())
  return {"eval/loss": t["ce_sum"] / t["tokens"], "eval/accuracy": t["correct"] / t["tokens"],
          "eval/bits_per_byte": t["ce_sum"] / math.log(2) / max(t["bytes"], 1.0),
          "eval/unigram_entropy": unigram, "eval/batches": n}


def _flatten(m: dict, sae_names: list[str]) -> dict:
  """Device metrics -> floats; per-SAE arrays become "sae<i>/<name>" entries."""
  out = {}
  for k, v in jax.device_get(m).items():
    if k == "sae":
      for name, arr in v.items():
        for i, x in enumerate(np.asarray(arr).reshape(-1)):
          out[f"sae{i}/{name}"] = float(x)
    else:
      out[k] = float(v)
  return out


def _sae_console(m: dict, sae_names: list[str]) -> list[str]:
  lines = []
  for i, name in enumerate(sae_names):
    if f"sae{i}/mse" not in m:
      continue
    g = lambda k: m.get(f"sae{i}/{k}", float("nan"))  # noqa: E731
    lines.append(f"    sae{i} [{name}] mse {g('mse'):.4g} | fvu {g('fvu'):.3f} | L0 {g('l0'):.1f} | "
                 f"L1 {g('l1'):.3g} | dead {100 * g('dead_frac'):.1f}% | lr {g('lr'):.1e} | l1 coef {g('l1_coef'):.3g}")
  return lines


def load_lm(cfg, log):
  """Frozen mode: the finished LM's config and parameters from cfg.lm_checkpoint (its workdir)."""
  import json
  lm_dir = os.path.abspath(os.path.expanduser(cfg.lm_checkpoint or ""))
  cfg_path = os.path.join(lm_dir, "config.json")
  if not cfg.lm_checkpoint or not os.path.exists(cfg_path):
    raise errors.MissingInputError(f"lm_checkpoint: {cfg.lm_checkpoint!r} is not the workdir of a finished LM run "
                                   f"(expected {cfg_path} and checkpoints/)")
  with open(cfg_path) as f:
    lm_cfg = json.load(f)
  with cfg.unlocked():  # the SAE run must see exactly the LM's model and tokenizer
    for k, v in lm_cfg["model"].items():
      if k in cfg.model and k != "max_seq_len":
        setattr(cfg.model, k, tuple(v) if isinstance(v, list) else v)
    cfg.data.tokenizer = lm_cfg["data"]["tokenizer"]
  log(f"frozen LM: model and tokenizer from {cfg_path}")
  return os.path.join(lm_dir, "checkpoints")


def run(cfg, workdir: str, log=logging.info) -> dict:
  """Trains per `cfg` in `workdir`; returns the last metrics (and last eval) as floats."""
  from monojax.sae import core as sae_core, cotrain, preview
  mesh = sharding.make_mesh(cfg.mesh)
  is_main = jax.process_index() == 0
  frozen = cfg.mode == "frozen"
  lm_ckpt_dir = load_lm(cfg, log) if frozen else None
  use_sae = cfg.mode in ("cotrain", "frozen") and cfg.sae.enabled
  root = pipeline.corpus_root(cfg.data, log=log)
  tokenizer = pipeline.get_tokenizer(cfg.data, root, log=log)
  with cfg.unlocked():
    cfg.model.vocab_size = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size)
  summary.summarize(cfg, root, tokenizer, log=log)
  host_batch = pipeline.host_batch_size(cfg.data.global_batch, jax.process_count())

  def train_batches():
    ds = pipeline.host_batches(cfg.data, "train", tokenizer=tokenizer, root=root, host_batch=host_batch,
                               seed=cfg.data.seed, process_index=jax.process_index(),
                               process_count=jax.process_count(), log=log)
    return pipeline.to_global(ds, mesh, prefetch=cfg.data.device_prefetch)

  if cfg.preview_batches > 0:
    m = summary.measure_pipeline(train_batches(), cfg.preview_batches)
    log(f"data: pipeline ({cfg.data.format}) {m['tokens_per_s'] / 1e6:.2f} M tokens/s on this host "
        f"(first batch after {m['first_batch_s']:.1f}s)")

  total = cfg.train.steps
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
  if frozen:
    lm_ckpt = checkpoint.Checkpointer(lm_ckpt_dir, keep=10**6, use_async=False, log=log)
    restored_lm = lm_ckpt.restore_params(state["params"])
    lm_ckpt.close()
    if restored_lm is None:
      raise errors.MissingInputError(f"lm_checkpoint: no restorable checkpoint in {lm_ckpt_dir}")
    log(f"frozen LM: parameters of step {restored_lm[0]} from {lm_ckpt_dir}")
    state["params"] = restored_lm[1]
  sae_names, plan, groups = [], None, []
  if use_sae:
    plan = cotrain.make_plan(cfg, total)
    groups = sae_core.groups_from_config(cfg.sae)
    sae_names = [f"{s.width} {s.recipe} l1={s.l1:g}" for s in sae_core.parse_specs(cfg.sae.saes)]
    state, shardings = cotrain.with_sae_and_buffer(cfg, state, shardings, cfg.model.d_mlp, plan, mesh)
    log(f"sae: {len(sae_names)} SAE(s) [{'; '.join(sae_names)}] on layer {cfg.sae.layer} MLP activations; "
        f"{plan.positions} positions/context -> {plan.per_step:,} vectors/step through a {plan.capacity:,}-row "
        f"buffer; sampling from step {plan.start}, SAE init at step {plan.init_step}, "
        f"{plan.total_sae_steps:,} SAE updates of {cfg.sae.batch_size:,}")
  train_iter = iter(train_batches())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                 use_async=cfg.train.async_checkpoints, log=log)
  restored = ckpt.restore_latest(state, train_iter)
  if restored is not None:
    state = restored[1]
    log(f"resumed from {ckpt.directory} at step {restored[0]}")
  start = int(jax.device_get(state["step"]))

  token_bytes = jnp.asarray(tokenizer.token_byte_lengths(cfg.model.vocab_size))
  kw = dict(vocab_size=tokenizer.vocab_size, dtype=cfg.train.dtype, loss_chunk=cfg.train.loss_chunk,
            token_bytes=token_bytes)
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  if frozen:
    lm_update = step_lib.make_lm_forward_only(graphdef, layer=cfg.sae.layer, dtype=cfg.train.dtype)
  else:
    lm_update = step_lib.make_lm_update(graphdef, tx, schedule, inject_nan_step=cfg.train.inject_nan_step,
                                        ce_kernel=cfg.train.ce_kernel, mesh=mesh, **kw)
  jit_kw = dict(in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  if use_sae:
    step_fns = {ph: jax.jit(cotrain.make_step(cfg, ph, plan, lm_update, groups, mesh, cfg.sae.layer), **jit_kw)
                for ph in ("lm", "fill", "train")}
    sae_init = cotrain.make_init_from_buffer(cfg, cfg.model.d_mlp, plan, shardings["sae"])
    sae_resample = cotrain.make_resample(cfg, groups, plan, shardings["sae"])
    resample_at = set(sae_core.resample_steps(cfg.sae, plan.total_sae_steps))
    sae_eval_step = jax.jit(cotrain.make_eval_step(graphdef, cfg, len(sae_names), cfg.sae.layer,
                                                   vocab_size=kw["vocab_size"], dtype=kw["dtype"],
                                                   loss_chunk=kw["loss_chunk"]))
  else:
    def lm_only(state, batch):
      new_state, metrics, _ = lm_update(state, batch["tokens"])
      return new_state, metrics
    step_fns = {"lm": jax.jit(lm_only, **jit_kw)}
  phase_of = plan.phase if use_sae else (lambda s: "lm")
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, **kw), in_shardings=(shardings["params"], batch_sh))
  batch_abs = {"tokens": jax.ShapeDtypeStruct((cfg.data.global_batch, cfg.data.seq_len + 1), jnp.int32,
                                              sharding=batch_sh["tokens"])}
  t0 = time.time()
  compiled = step_fns[phase_of(min(start, total - 1))].lower(state, batch_abs).compile()
  mem = compiled.memory_analysis()
  mem_txt = f", temp {mem.temp_size_in_bytes / 2**20:.0f} MiB/device" if mem is not None else ""
  n_matmul = state_lib.count_params(state["params"])
  flops_tok = metrics_lib.lm_flops_per_token(cfg.model, cfg.data.seq_len, n_matmul)
  if frozen:  # forward only, through block sae.layer: 2 N over those blocks' matmuls + attention
    n_blocks = cfg.sae.layer + 1
    n_matmul = sum(state_lib.count_params(state["params"]["blocks"][i]) for i in range(n_blocks))
    flops_tok = 2.0 * n_matmul + 4.0 * n_blocks * cfg.data.seq_len * cfg.model.n_heads * cfg.model.d_head
  peak, peak_src = metrics_lib.peak_flops(cfg.train.peak_flops)
  log(f"model: {state_lib.count_params(state['params'], exclude=()):,} params ({n_matmul:,} in matmuls), "
      f"vocab {tokenizer.vocab_size:,} -> {cfg.model.vocab_size:,}; step compiled in {time.time() - t0:.1f}s{mem_txt}; "
      f"{flops_tok / 1e6:.1f} MFLOP/token (LM{' forward' if frozen else ''}); peak {peak / 1e12:.2f} TFLOP/s ({peak_src})")

  writer = metrics_lib.MetricWriter(workdir, start, enabled=is_main)
  preempt = _Preemption(log)
  tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
  last: dict = {}
  window_t, window_steps, last_rate = time.time(), 0, float("nan")

  def check(step: int, m) -> dict:
    m = _flatten(m, sae_names)
    bad = [k for k, v in m.items() if (k in ("loss", "grad_norm") or k.endswith("/loss")) and not math.isfinite(v)]
    if bad:
      good = [s for s in ckpt.steps() if s < step]
      raise TrainingDiverged(
          f"non-finite training at step {step}: " + ", ".join(f"{k}={m[k]}" for k in bad) + "; stopped without "
          "saving. Last good checkpoint: " + (f"step {good[-1]} in {ckpt.directory}" if good else "none"))
    return m

  def report(step: int, m: dict) -> None:
    nonlocal window_t, window_steps, last_rate
    dt = time.time() - window_t
    # a report right after another (a checkpoint step) has no new steps: repeat the last rate
    tok_s = window_steps * tokens_per_step / dt if dt > 0 and window_steps else last_rate
    last_rate = tok_s
    mfu = tok_s * flops_tok / peak if math.isfinite(tok_s) else float("nan")
    eta = (total - step) * tokens_per_step / tok_s if tok_s and math.isfinite(tok_s) else float("nan")
    writer.write(step, {**m, "tokens_per_s": tok_s, "mfu": mfu, "tokens_seen": step * tokens_per_step})
    if is_main:
      log("\n".join([metrics_lib.console_line(step, total, m, tok_s, mfu, eta)] + _sae_console(m, sae_names)))
    window_t, window_steps = time.time(), 0

  def run_eval(step: int) -> dict:
    ev = _eval(eval_step, state["params"], cfg, tokenizer, root, mesh)
    log(f"eval at step {step}: loss {ev['eval/loss']:.4f} | acc {ev['eval/accuracy']:.3f} | "
        f"bits/byte {ev['eval/bits_per_byte']:.3f} | unigram entropy of these tokens "
        f"{ev['eval/unigram_entropy']:.4f} ({ev['eval/batches']} batches)")
    if use_sae and step >= plan.init_step:
      sums = _eval_sums(lambda b: sae_eval_step(state["params"], state["sae"], b), cfg, tokenizer, root, mesh)
      sev = cotrain.summarize_eval(sums, cfg)
      ev.update(sev)
      lines = [f"sae eval at step {step} on held-out tokens: LM loss clean {sev['sae_eval/loss_clean']:.4f}, "
               f"MLP zero-ablated {sev['sae_eval/loss_zero_ablated']:.4f}"]
      for i, name in enumerate(sae_names):
        g = lambda k: sev[f"sae{i}_eval/{k}"]  # noqa: E731
        lines.append(f"    sae{i} [{name}] loss recovered {100 * g('loss_recovered'):.1f}% (spliced "
                     f"{g('loss_spliced'):.4f}) | fvu {g('fvu'):.3f} | L0 {g('l0'):.1f} | dead {g('dead'):.0f} | "
                     f"ultralow {g('ultralow'):.0f} | dense {g('dense'):.0f} of {g('n_features'):.0f} features "
                     f"(on {g('n_tokens'):,.0f} tokens)")
      log("\n".join(lines))
    writer.write(step, ev)
    return ev

  pending = None  # (step, device metrics) of the previous step: fetched after the next dispatch
  step = start
  try:
    while step < total:
      batch = next(train_iter)
      state, dev_metrics = step_fns[phase_of(step)](state, batch)
      step += 1
      window_steps += 1
      if use_sae and step == plan.init_step:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 10**9 + step)
        state["sae"] = sae_init(state["buffer"]["acts"], key)
        log(f"sae: initialised from {min(plan.capacity, cfg.sae.init_inputs):,} buffered activations at step {step}")
      if use_sae and step > plan.init_step:
        sae_step = (step - plan.init_step) * plan.updates_per_step
        hits = [r for r in resample_at if sae_step - plan.updates_per_step < r <= sae_step]
        if hits:
          key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 2 * 10**9 + step)
          state["sae"], info = sae_resample(state["sae"], state["buffer"]["acts"], key)
          info = jax.device_get(info)
          log(f"sae: resampled at SAE step {sae_step}: dead {info['dead'].tolist()}, "
              f"resampled {info['resampled'].tolist()} (per SAE)")
      if pending is not None:
        p_step, p_metrics = pending
        last = check(p_step, p_metrics)
        if p_step % cfg.train.log_every == 0:
          report(p_step, last)
      pending = (step, dev_metrics)
      if cfg.train.debug_step_delay_s > 0:
        time.sleep(cfg.train.debug_step_delay_s)
      stop = preempt.requested
      if step % cfg.train.ckpt_every == 0 or step == total or stop:
        last = check(*pending)  # synchronous: never save a non-finite state
        if step % cfg.train.log_every == 0 or step == total:
          report(step, last)
        pending = None
        ckpt.save(step, state, train_iter)
      if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
        last.update(run_eval(step))
      if stop:
        log(f"preempted: checkpoint at step {step} saved in {ckpt.directory}; exiting")
        break
    if pending is not None:
      last = check(*pending)
    if use_sae and step >= plan.init_step and step == total and jax.process_count() > 1:
      log("sae: the feature preview runs in single-process jobs only; run configs/sae.py-style analysis "
          "on one host (see BUILD_NOTES.md, known gaps)")
    elif use_sae and step >= plan.init_step and step == total:
      acts_fn = jax.jit(lambda params, tokens: step_lib.lm_forward(
          graphdef, params, tokens, vocab_size=kw["vocab_size"], dtype=step_lib.DTYPES[kw["dtype"]],
          loss_chunk=kw["loss_chunk"])[1]["mlp_post"][cfg.sae.layer])
      preview.finish(cfg, state, sae_names, tokenizer, root, mesh, workdir, log,
                     lambda batch: acts_fn(state["params"], batch["tokens"]))
  finally:
    preempt.restore()
    ckpt.close()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return last


def _eval_sums(fn, cfg, tokenizer, root, mesh) -> dict:
  """Sums fn(batch) over the held-out batches of the LM eval."""
  totals = None
  for batch in pipeline.eval_batches(cfg, tokenizer, root, mesh):
    out = fn(batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return jax.device_get(totals)
