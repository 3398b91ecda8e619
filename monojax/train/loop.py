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
  it = pipeline.host_batches(cfg.data, "val", tokenizer=tokenizer, root=root,
                             host_batch=pipeline.host_batch_size(cfg.data.global_batch, jax.process_count()),
                             seed=0, process_index=jax.process_index(), process_count=jax.process_count(),
                             repeat=False)
  totals, n, counts = None, 0, np.zeros((tokenizer.vocab_size,), np.int64)
  for batch in pipeline.to_global(it, mesh, prefetch=0):
    out = eval_fn(params, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    for shard in batch["tokens"].addressable_shards:  # this host's targets, for the unigram baseline
      counts += np.bincount(np.asarray(shard.data)[:, 1:].reshape(-1), minlength=len(counts))
    n += 1
    if n >= cfg.train.eval_batches:
      break
  if totals is None:
    raise errors.ConfigError(f"data.val_files: the validation split has fewer than one batch of "
                             f"{cfg.data.global_batch} x {cfg.data.seq_len + 1} tokens")
  t = jax.device_get(totals)
  p = counts[counts > 0] / counts.sum()
  # Entropy of the evaluated tokens' own unigram distribution: no unigram model can score below it.
  unigram = float(-(p * np.log(p)).sum())
  return {"eval/loss": t["ce_sum"] / t["tokens"], "eval/accuracy": t["correct"] / t["tokens"],
          "eval/bits_per_byte": t["ce_sum"] / math.log(2) / max(t["bytes"], 1.0),
          "eval/unigram_entropy": unigram, "eval/batches": n}


def run(cfg, workdir: str, log=logging.info) -> dict:
  """Trains per `cfg` in `workdir`; returns the last metrics (and last eval) as floats."""
  mesh = sharding.make_mesh(cfg.mesh)
  is_main = jax.process_index() == 0
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

  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
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
  train_step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, inject_nan_step=cfg.train.inject_nan_step, **kw),
                       in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, **kw), in_shardings=(shardings["params"], batch_sh))
  batch_abs = {"tokens": jax.ShapeDtypeStruct((cfg.data.global_batch, cfg.data.seq_len + 1), jnp.int32,
                                              sharding=batch_sh["tokens"])}
  t0 = time.time()
  compiled = train_step.lower(state, batch_abs).compile()
  mem = compiled.memory_analysis()
  mem_txt = f", temp {mem.temp_size_in_bytes / 2**20:.0f} MiB/device" if mem is not None else ""
  n_matmul = state_lib.count_params(state["params"])
  flops_tok = metrics_lib.lm_flops_per_token(cfg.model, cfg.data.seq_len, n_matmul)
  peak, peak_src = metrics_lib.peak_flops(cfg.train.peak_flops)
  log(f"model: {state_lib.count_params(state['params'], exclude=()):,} params ({n_matmul:,} in matmuls), "
      f"vocab {tokenizer.vocab_size:,} -> {cfg.model.vocab_size:,}; step compiled in {time.time() - t0:.1f}s{mem_txt}; "
      f"{flops_tok / 1e6:.1f} MFLOP/token; peak {peak / 1e12:.2f} TFLOP/s ({peak_src})")

  writer = metrics_lib.MetricWriter(workdir, start, enabled=is_main)
  preempt = _Preemption(log)
  total = cfg.train.steps
  tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
  last: dict = {}
  window_t, window_steps = time.time(), 0

  def check(step: int, m) -> dict:
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      good = [s for s in ckpt.steps() if s < step]
      raise TrainingDiverged(
          f"non-finite training at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}; stopped without "
          f"saving. Last good checkpoint: " + (f"step {good[-1]} in {ckpt.directory}" if good else "none"))
    return m

  def report(step: int, m: dict) -> None:
    nonlocal window_t, window_steps
    dt = time.time() - window_t
    tok_s = window_steps * tokens_per_step / dt if dt > 0 and window_steps else float("nan")
    mfu = tok_s * flops_tok / peak if math.isfinite(tok_s) else float("nan")
    eta = (total - step) * dt / window_steps if window_steps else float("nan")
    writer.write(step, {**m, "tokens_per_s": tok_s, "mfu": mfu, "tokens_seen": step * tokens_per_step})
    if is_main:
      log(metrics_lib.console_line(step, total, m, tok_s, mfu, eta))
    window_t, window_steps = time.time(), 0

  pending = None  # (step, device metrics) of the previous step: fetched after the next dispatch
  step = start
  try:
    while step < total:
      batch = next(train_iter)
      state, dev_metrics = train_step(state, batch)
      step += 1
      window_steps += 1
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
        ev = _eval(eval_step, state["params"], cfg, tokenizer, root, mesh)
        writer.write(step, ev)
        last.update(ev)
        log(f"eval at step {step}: loss {ev['eval/loss']:.4f} | acc {ev['eval/accuracy']:.3f} | "
            f"bits/byte {ev['eval/bits_per_byte']:.3f} | unigram entropy of these tokens "
            f"{ev['eval/unigram_entropy']:.4f} ({ev['eval/batches']} batches)")
      if stop:
        log(f"preempted: checkpoint at step {step} saved in {ckpt.directory}; exiting")
        break
    if pending is not None:
      last = check(*pending)
  finally:
    preempt.restore()
    ckpt.close()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return last
