"""The training loop: data → jitted step → deferred metrics → periodic eval and checkpoints.

big_vision style, in three parts: `job.setup` builds everything (resuming from the workdir's newest
checkpoint: state and data iterator), this file steps, `evaluate` reports. SIGTERM (TPU
preemption) saves at the next step boundary and returns normally (exit 0). A non-finite loss or
gradient stops the run with a message naming the step; every save is preceded by a synchronous
finiteness check, so no bad state is ever saved and the last good checkpoint stays the newest.
"""
from __future__ import annotations

import logging
import signal
import time

import jax
import jax.numpy as jnp

from monojax import errors
from monojax.train import evaluate, job as job_lib, preview
from monojax.train.evaluate import TrainingDiverged  # noqa: F401 (the entry point catches it from here)


class _Preemption:
  """SIGTERM (a preemption notice) → a checkpoint at a step boundary, then a normal return.

  One process: a Python handler sets a flag read at the next step boundary. Several processes: the
  signal may reach only some of them, or reach them a step apart, but the orbax save is collective:
  all must save the same step. jax's preemption sync manager (started by jax.distributed.initialize,
  works on CPU) agrees on it: its C++ SIGTERM handler notifies the coordination service, which takes
  max(step of each process) + 1. Chosen over a per-step OR of the flags because it costs a mutex per
  step, not a blocking collective (BUILD_NOTES.md, "Multi-host and launch"); no Python handler is
  installed then, as it would replace jax's. Fallback when jax_enable_preemption_service is off:
  the flags OR-ed by a process_allgather every step.
  """

  def __init__(self, log):
    self.requested = False
    self.log = log
    self._multi = jax.process_count() > 1
    self._sync = self._multi and jax.config.jax_enable_preemption_service
    self._old = None if self._sync else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    self.log("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer in every process. Call every step."""
    if not self._multi:
      return self.requested
    import numpy as np
    from jax.experimental import multihost_utils
    if not self._sync:
      return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
    # The global step, as orbax's save passes it to the same sync manager. Known gap (as in orbax): a
    # notice during a resumed job's setup gives the sync point 1 (counters start at 0), never reached;
    # the job trains on until killed, and resumes from the checkpoint it started from.
    if not multihost_utils.reached_preemption_sync_point(step):
      return False
    self.log(f"preemption notice (SIGTERM) in some process: every process saves at step {step}")
    return True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def run(cfg, workdir: str, log=logging.info) -> dict:
  """Trains per `cfg` in `workdir`; returns the last metrics (and last eval) as floats."""
  job = job_lib.setup(cfg, workdir, log)
  preempt = _Preemption(log)
  try:
    last, step = _steps(job, preempt, log)
  finally:
    preempt.restore()
    job.close()
  if job.saes and step == cfg.train.steps and step >= job.plan.init_step:
    _finish(job, log)
  return last


def _steps(job: job_lib.Job, preempt: _Preemption, log) -> tuple[dict, int]:
  """Steps from job.start to train.steps (or a SIGTERM); returns (last metrics, last step).

  The hot path, per step: next batch, dispatch, the previous step's metrics fetched (the one host
  sync) and checked, cadence checks. The state stays a list of leaves between steps (job.LeafStep);
  job.state is rebuilt from it before anything else reads it (SAE events, saves, evals, the end)."""
  cfg, plan, total = job.cfg, job.plan, job.cfg.train.steps
  log_every, ckpt_every, eval_every = cfg.train.log_every, cfg.train.ckpt_every, cfg.train.eval_every
  delay = cfg.train.debug_step_delay_s
  last: dict = {}
  pending = None  # (step, device metrics) of the previous step: fetched after the next dispatch

  def check(step: int, m) -> dict:
    m = evaluate.flatten(m)
    evaluate.check_finite(step, m, job.ckpt.steps, job.ckpt.directory)  # steps() listed only on a failure
    return m

  state = _StateLeaves(job)
  step = job.start
  if step >= total:
    log(f"nothing to train: {job.ckpt.directory} is at step {step}, train.steps is {total} (raise train.steps "
        "to continue this run)")
  last_phase = None
  try:
    while step < total:
      batch = next(job.train_iter)
      phase = job.phase(step)
      dev_metrics = state.step(phase, batch)
      step += 1
      if phase != last_phase:  # this call compiled its phase's step: time only the steps after it
        jax.block_until_ready(dev_metrics)
        job.reporter.restart(step)
        last_phase = phase
      if plan is not None and _sae_event_due(job, step):
        state.sync()
        _sae_events(job, step, log)
        state.reload()
        job.reporter.restart(step)  # host work on the buffer (init, resampling) is not a step either
      if pending is not None:
        p_step, p_metrics = pending
        last = check(p_step, p_metrics)
        if p_step % log_every == 0:
          job.reporter.report(p_step, last)
      pending = (step, evaluate.pack(dev_metrics))  # one array to fetch, not one per metric
      if delay > 0:
        time.sleep(delay)
      stop = preempt.reached(step)
      if step % ckpt_every == 0 or step == total or stop:
        last = check(*pending)  # synchronous: never save a non-finite state
        if step % log_every == 0 or step == total:
          job.reporter.report(step, last)
        pending = None
        state.sync()
        _check_state_finite(job, step)
        job.ckpt.save(step, job.state, job.train_iter, meta=job.ckpt_meta())
        job.reporter.restart(step)
      if (eval_every and step % eval_every == 0) or step == total:
        state.sync()
        ev = job.evaluate(step, job.state)
        job.writer.write(step, ev)
        evaluate.check_eval_finite(step, ev, job.ckpt.directory)
        last.update(ev)
        job.reporter.restart(step)
      if stop:
        log(f"preempted: checkpoint at step {step} saved in {job.ckpt.directory}; exiting")
        break
    if pending is not None:
      last = check(*pending)
  finally:
    state.sync()
  return last, step


class _StateLeaves:
  """The train state between steps as the jitted steps take it: a list of leaves (job.LeafStep).
  After a step job.state is stale (its arrays were donated); sync() rebuilds it, reload() takes
  the leaves again after something changed job.state."""

  def __init__(self, job: job_lib.Job):
    self.job = job
    self.reload()

  def reload(self) -> None:
    self.leaves, self.treedef = jax.tree.flatten(self.job.state)
    self.fns = {ph: fn.jitted(self.treedef) for ph, fn in self.job.step_fns.items()}
    self.stale = False

  def step(self, phase: str, batch):
    self.stale = True  # from here on job.state's arrays are donated, whether or not the call succeeds
    self.leaves, metrics = self.fns[phase](self.leaves, batch)
    return metrics

  def sync(self) -> None:
    if self.stale:
      self.job.state = self.treedef.unflatten(self.leaves)
      self.stale = False


def _check_state_finite(job: job_lib.Job, step: int) -> None:
  """Before a save: every parameter (LM and SAEs) is finite. A loss computed before an update can be
  finite while the update itself overflowed; such a state is never saved."""
  bad = [name for name, ok in jax.device_get(_finite_parts(job.state)).items() if not ok]
  if bad:
    good = [s for s in job.ckpt.steps() if s < step]
    raise TrainingDiverged(f"non-finite parameters at step {step} ({', '.join(bad)}); stopped without saving. Last "
                           "good checkpoint: " + (f"step {good[-1]} in {job.ckpt.directory}" if good else "none"))


@jax.jit
def _finite_parts(state) -> dict:
  parts = {"LM parameters": state["params"]}
  for key, group in state.get("sae", {}).get("groups", {}).items():
    parts[f"SAE group {key}"] = group["params"]
  return {name: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)])) for name, tree in parts.items()}


def _resample_due(job: job_lib.Job, step: int) -> bool:
  plan = job.plan
  if step <= plan.init_step:
    return False
  sae_step = (step - plan.init_step) * plan.updates_per_step
  return any(sae_step - plan.updates_per_step < r <= sae_step for r in job.resample_at)


def _sae_event_due(job: job_lib.Job, step: int) -> bool:
  """Whether `_sae_events` has work after `step` (pure Python: no look at the state)."""
  return step == job.plan.init_step or _resample_due(job, step)


def _sae_events(job: job_lib.Job, step: int, log) -> bool:
  """The SAE's once-per-run initialisation from the full buffer, and dead-feature resampling.
  Returns whether either ran."""
  plan, state = job.plan, job.state
  ran = False
  if step == plan.init_step:
    ran = True
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 10**9 + step)
    state["sae"] = job.sae_init(state["buffer"]["acts"], key)
    log(f"sae: initialised from {min(plan.capacity, job.cfg.sae.init_inputs):,} buffered activations at step {step}")
  if step > plan.init_step:
    sae_step = (step - plan.init_step) * plan.updates_per_step
    if _resample_due(job, step):
      ran = True
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 2 * 10**9 + step)
      state["sae"], info = job.sae_resample(state["sae"], state["buffer"]["acts"], key)
      info = jax.device_get(info)
      log(f"sae: resampled at SAE step {sae_step}: dead {info['dead'].tolist()}, "
          f"resampled {info['resampled'].tolist()} (per SAE)")
  return ran


def _finish(job: job_lib.Job, log) -> None:
  """The end of a run with SAEs, from the run as saved (the run loader reads the final checkpoint):
  with analysis.tokens > 0 and an analysis split, the analysis pass, RUN/report.md and the feature
  preview from the database (analysis/first_look.py), the offline autointerp baseline (analysis.autointerp),
  then the inspector site (RUN/inspector); else
  the quick preview of the val split."""
  if jax.process_count() > 1:
    log("sae: the feature preview runs in single-process jobs only; open the run on one host for it "
        "(BUILD_NOTES.md, known gaps)")
    return
  from monojax.analysis import first_look
  from monojax.run import Run
  run = Run.open(job.workdir, mesh=job.mesh, log=log)
  if run.cfg.analysis.tokens > 0 and first_look.end_of_run(run, log):
    if run.cfg.analysis.autointerp:
      from monojax.autointerp import runner
      try:
        runner.run_autointerp(run.workdir, backend=run.cfg.analysis.autointerp, neurons=True, run=run, site=False,
                              progress=False, log=log)
      except errors.UserInputError as e:   # the run and its analysis stay done; autointerp can be re-run alone
        log(f"autointerp: not run: {e}")
    from monojax.inspector import site
    try:
      site.build(run.workdir, run=run, log=log)   # its last line says which page to open
    except errors.UserInputError as e:   # e.g. a folder of somebody's at RUN/inspector: the run stays done
      log(f"inspect: the inspector site was not built: {e}")
    return
  preview.finish(run, log)
