"""Setting up a training job: data, tokenizer, model and SAE state, restored position, the jitted
step of each phase, evaluation and writers, gathered in one `Job` record the loop runs.

Frozen mode (configs/sae.py) opens the finished LM through the run loader (monojax/run.py): its
model config, tokenizer and parameters are the LM run's own.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from monojax import checkpoint, config as config_lib, errors, sharding
from monojax.corpus import build_corpus
from monojax.data import pipeline, summary, tokenizer as tokenizer_lib
from monojax.run import Run
from monojax.sae import catalogue, core as sae_core
from monojax.train import cotrain, evaluate, metrics as metrics_lib, state as state_lib, step as step_lib


@dataclasses.dataclass
class Job:
  cfg: Any
  workdir: str
  mesh: Any
  tokenizer: tokenizer_lib.TextTokenizer
  graphdef: Any
  state: dict                       # the train state (donated to each step: always use job.state; while the loop
                                    # steps it holds the leaves and rebuilds job.state before anything reads it)
  start: int                        # the step this process starts (or resumes) at
  saes: tuple                       # catalogue.SAE records ((): LM only)
  plan: cotrain.Plan | None         # the co-training phases (None: LM only)
  step_fns: dict[str, LeafStep]     # phase -> jitted (state, batch) -> (state, metrics), also on the state's leaves
  sae_init: Callable | None         # (buffer acts, key) -> SAE state, once at plan.init_step
  sae_resample: Callable | None     # (SAE state, buffer acts, key) -> (SAE state, info)
  resample_at: set                  # SAE steps after which to resample
  lm_source: dict | None            # frozen mode: the LM run read ({"workdir", "step"})
  evaluate: evaluate.Evaluator
  reporter: evaluate.Reporter
  writer: metrics_lib.MetricWriter
  ckpt: checkpoint.Checkpointer
  train_iter: Any

  def phase(self, step: int) -> str:
    return self.plan.phase(step) if self.plan is not None else "lm"

  def ckpt_meta(self) -> dict:
    """The record saved with every checkpoint: what the state holds, for the run loader."""
    meta = {"mode": self.cfg.mode, "saes": catalogue.to_json(self.saes)}
    if self.lm_source is not None:
      meta["lm_source"] = self.lm_source
    return meta

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()
    if hasattr(self.train_iter, "close"):
      self.train_iter.close()


def setup(cfg, workdir: str, log) -> Job:
  """Everything the step loop needs, resumed from the workdir's newest checkpoint if any."""
  mesh = sharding.make_mesh(cfg.mesh)
  frozen = cfg.mode == "frozen"
  lm_run = _open_frozen_lm(cfg, mesh, log) if frozen else None
  changes = _check_resume(cfg, workdir, log)  # before anything is built or written
  root, tokenizer, train_batches = _data(cfg, workdir, mesh, lm_run, changes, log)
  total = cfg.train.steps
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
  if frozen:
    state["params"] = lm_run.params
    log(f"frozen LM: parameters of step {lm_run.step} from {lm_run.workdir}")
  saes, plan = (), None
  if cfg.mode in ("cotrain", "frozen") and cfg.sae.enabled:
    plan = cotrain.make_plan(cfg, total)
    saes = catalogue.build(cfg.sae, cfg.model.d_mlp, cfg.sae.layer)
    state, shardings = cotrain.with_sae_and_buffer(cfg, state, shardings, cfg.model.d_mlp, plan, mesh)
    log(f"sae: {len(saes)} SAE(s) [{'; '.join(s.label for s in saes)}] on layer {cfg.sae.layer} MLP activations; "
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

  kw = dict(vocab_size=tokenizer.vocab_size, dtype=cfg.train.dtype, loss_chunk=cfg.train.loss_chunk,
            token_bytes=jnp.asarray(tokenizer.token_byte_lengths(cfg.model.vocab_size)))
  step_fns = _step_functions(cfg, graphdef, tx, schedule, shardings, mesh, plan, kw)
  sae_init, sae_resample, resample_at, sae_eval_step = _sae_functions(cfg, graphdef, shardings, plan, saes, kw)
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, **kw), in_shardings=(shardings["params"], batch_sh))
  flops_tok, peak = _log_model(cfg, state, step_fns, plan, start, total, mesh, tokenizer, frozen, log)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, start, enabled=is_main)
  reporter = evaluate.Reporter(writer, total=total, tokens_per_step=cfg.data.global_batch * cfg.data.seq_len,
                               flops_per_token=flops_tok, peak=peak, saes=saes, is_main=is_main, log=log,
                               start=start, alarm_dead_frac=cfg.sae.alarm_dead_frac)
  evaluator = evaluate.Evaluator(cfg, tokenizer=tokenizer, root=root, mesh=mesh, eval_step=eval_step,
                                 sae_eval_step=sae_eval_step, saes=saes,
                                 sae_from_step=plan.init_step if plan else total + 1, log=log)
  return Job(cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tokenizer, graphdef=graphdef, state=state, start=start,
             saes=saes, plan=plan, step_fns=step_fns, sae_init=sae_init, sae_resample=sae_resample,
             resample_at=resample_at, evaluate=evaluator, reporter=reporter, writer=writer, ckpt=ckpt,
             train_iter=train_iter,
             lm_source={"workdir": lm_run.workdir, "step": lm_run.step} if lm_run is not None else None)


def _data(cfg, workdir: str, mesh, lm_run, changes: dict, log):
  """The data root (the default corpus built if needed), the tokenizer (a frozen job's: the LM
  run's), the resolved config and the tokenizer copy written to the workdir, the corpus summary,
  and a factory of global training batches (its throughput measured once)."""
  root = build_corpus.ensure_data_root(cfg.data, log=log)
  tokenizer = lm_run.tokenizer if lm_run is not None else pipeline.get_tokenizer(cfg.data, root, log=log)
  with cfg.unlocked():
    cfg.model.vocab_size = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size)
  if jax.process_index() == 0:
    tokenizer_lib.save_for_run(tokenizer, workdir)
    if changes:
      _record_changes(workdir, changes)
    log(f"config written to {config_lib.write_resolved(cfg, workdir)}")
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
  return root, tokenizer, train_batches


def _sae_functions(cfg, graphdef, shardings, plan, saes, kw):
  """(init from the buffer, resample, SAE steps to resample after, jitted SAE eval step); Nones
  for an LM-only job."""
  if plan is None:
    return None, None, set(), None
  groups = catalogue.groups_from_config(cfg.sae)
  return (cotrain.make_init_from_buffer(cfg, cfg.model.d_mlp, plan, shardings["sae"]),
          cotrain.make_resample(cfg, groups, plan, shardings["sae"]),
          set(sae_core.resample_steps(cfg.sae, plan.total_sae_steps)),
          jax.jit(cotrain.make_eval_step(graphdef, saes, vocab_size=kw["vocab_size"], dtype=kw["dtype"],
                                         loss_chunk=kw["loss_chunk"])))


def _check_resume(cfg, workdir: str, log) -> dict:
  """A workdir that holds checkpoints continues only with a config that keeps its state and data
  stream: fields that would change them (model, SAEs, data, tokenizer, seeds, ...) are refused,
  listed, and nothing is touched; changes a resume may make (config.RESUMABLE: steps, cadence, ...)
  are logged and returned, to be kept in config_changes.jsonl."""
  path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.exists(path) or not (os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))):
    return {}
  try:
    saved = config_lib.load_resolved(path)
  except errors.UserInputError as e:
    raise errors.RunFormatError(f"--workdir {workdir} holds a run this monojax cannot continue ({e}); use another "
                                "--workdir") from None
  refused, allowed = config_lib.resume_changes(saved, cfg)
  if refused:
    shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:3])
    more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
    raise errors.ConfigError(
        f"--workdir {workdir} holds a run trained with another config ({shown}{more}); these change its state or "
        "data, so it cannot resume: run with the values it was trained with, or use a new --workdir (nothing was "
        "changed)")
  if allowed:
    log("resuming with changed settings: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in allowed.items())
        + f" (kept in {os.path.join(workdir, CHANGES_FILE)})")
  return allowed


CHANGES_FILE = "config_changes.jsonl"


def _record_changes(workdir: str, changes: dict) -> None:
  """Appends one JSON line per resume that changed settings: when, and each field's old and new value."""
  import datetime
  import json
  line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "changes": {k: [a, b] for k, (a, b) in changes.items()}}
  with open(os.path.join(workdir, CHANGES_FILE), "a") as fh:
    fh.write(json.dumps(line) + "\n")


def _open_frozen_lm(cfg, mesh, log) -> Run:
  """The finished LM of a frozen-mode job; the job takes its model config and tokenizer."""
  if not cfg.lm_checkpoint:
    raise errors.MissingInputError("lm_checkpoint: frozen mode needs the workdir of a finished LM run "
                                   "(--config.lm_checkpoint=runs/quickstart)")
  try:
    lm_run = Run.open(cfg.lm_checkpoint, mesh=mesh, log=log)
  except errors.UserInputError as e:
    raise type(e)(f"lm_checkpoint: {e}") from None
  with cfg.unlocked():  # the SAE run must see exactly the LM's model and tokenizer
    cfg.model = config_dict.ConfigDict(lm_run.cfg.model.to_dict())  # a new section: no reference to data.seq_len
    cfg.data.tokenizer = lm_run.cfg.data.tokenizer
  if cfg.data.seq_len > cfg.model.max_seq_len:
    raise errors.ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the LM's context "
                             f"({cfg.model.max_seq_len}, {lm_run.workdir})")
  log(f"frozen LM: model and tokenizer of {lm_run}")
  return lm_run


def _step_functions(cfg, graphdef, tx, schedule, shardings, mesh, plan, kw) -> dict:
  """{phase: jitted (state, batch) -> (state, metrics)}: LM only, or the three co-training phases."""
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  if cfg.mode == "frozen":
    lm_update = step_lib.make_lm_forward_only(graphdef, layer=cfg.sae.layer, dtype=cfg.train.dtype)
  else:
    lm_update = step_lib.make_lm_update(graphdef, tx, schedule, inject_nan_step=cfg.train.inject_nan_step,
                                        ce_kernel=cfg.train.ce_kernel, mesh=mesh, **kw)
  if plan is not None:
    groups = catalogue.groups_from_config(cfg.sae)
    return {ph: LeafStep(cotrain.make_step(cfg, ph, plan, lm_update, groups, mesh, cfg.sae.layer), shardings, batch_sh)
            for ph in ("lm", "fill", "train")}

  def lm_only(state, batch):
    new_state, metrics, _ = lm_update(state, batch["tokens"])
    return new_state, metrics
  return {"lm": LeafStep(lm_only, shardings, batch_sh)}


class LeafStep:
  """A step (state, batch) -> (state, metrics), jitted on the state's leaves.

  The same computation as jax.jit(step, in_shardings=(shardings, batch), out_shardings=(shardings,
  None), donate_argnums=0) on the state pytree, the same arguments in the same order, but the
  jitted function takes and returns a flat list of arrays. Dispatching a pytree of NNX variables
  flattens it and builds a new one from the outputs in Python on every call: ~0.4 ms of host time
  per step on CPU, more than the whole step of a small model (benchmarks/loop_overhead.py). The
  loop keeps the state's leaves from step to step and calls `jitted(treedef)` on them; called with
  a state pytree, a LeafStep flattens it and rebuilds it as before."""

  def __init__(self, fn, shardings, batch_sharding):
    self.fn, self.shardings, self.batch_sharding = fn, shardings, batch_sharding
    self._jits: dict = {}  # state treedef -> jitted function on that structure's leaves

  def jitted(self, treedef):
    """The jitted (leaves, batch) -> (leaves, metrics) for states of this structure; the leaves,
    jax.tree.flatten(state)[0], are donated."""
    fn = self._jits.get(treedef)
    if fn is None:
      fn = self._jits[treedef] = self._jit(treedef)
    return fn

  def _jit(self, treedef):
    step = self.fn
    # One sharding per leaf (the shardings tree may be a prefix of the state's).
    template = treedef.unflatten([0] * treedef.num_leaves)
    leaf_sh = jax.tree.leaves(jax.tree.map(lambda sh, sub: jax.tree.map(lambda _: sh, sub), self.shardings, template))

    def on_leaves(leaves, batch):
      new_state, metrics = step(treedef.unflatten(leaves), batch)
      out, out_def = jax.tree.flatten(new_state)
      if out_def != treedef:
        raise ValueError(f"the step changed the state's structure: {treedef} -> {out_def}")
      return out, metrics
    on_leaves.__name__ = getattr(step, "__name__", "step")
    return jax.jit(on_leaves, in_shardings=(leaf_sh, self.batch_sharding), out_shardings=(leaf_sh, None),
                   donate_argnums=0)

  def __call__(self, state, batch):
    leaves, treedef = jax.tree.flatten(state)
    leaves, metrics = self.jitted(treedef)(leaves, batch)
    return treedef.unflatten(leaves), metrics

  def lower(self, state, batch):
    leaves, treedef = jax.tree.flatten(state)
    return self.jitted(treedef).lower(leaves, batch)


def _log_model(cfg, state, step_fns, plan, start, total, mesh, tokenizer, frozen, log):
  """Compiles the first step (for its memory) and logs the model line; returns (FLOPs/token, peak)."""
  batch_abs = {"tokens": jax.ShapeDtypeStruct((cfg.data.global_batch, cfg.data.seq_len + 1), jnp.int32,
                                              sharding=sharding.batch_sharding(mesh))}
  phase = plan.phase(min(start, total - 1)) if plan is not None else "lm"
  t0 = time.time()
  compiled = step_fns[phase].lower(state, batch_abs).compile()
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
  return flops_tok, peak
