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

from monojax.train import evaluate, job as job_lib, preview
from monojax.train.evaluate import TrainingDiverged  # noqa: F401 (the entry point catches it from here)


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
  """Steps from job.start to train.steps (or a SIGTERM); returns (last metrics, last step)."""
  cfg, plan, total = job.cfg, job.plan, job.cfg.train.steps
  last: dict = {}
  pending = None  # (step, device metrics) of the previous step: fetched after the next dispatch

  def check(step: int, m) -> dict:
    m = evaluate.flatten(m)
    evaluate.check_finite(step, m, job.ckpt.steps(), job.ckpt.directory)
    return m

  step = job.start
  while step < total:
    batch = next(job.train_iter)
    job.state, dev_metrics = job.step_fns[job.phase(step)](job.state, batch)
    step += 1
    job.reporter.stepped()
    if plan is not None:
      _sae_events(job, step, log)
    if pending is not None:
      p_step, p_metrics = pending
      last = check(p_step, p_metrics)
      if p_step % cfg.train.log_every == 0:
        job.reporter.report(p_step, last)
    pending = (step, dev_metrics)
    if cfg.train.debug_step_delay_s > 0:
      time.sleep(cfg.train.debug_step_delay_s)
    stop = preempt.requested
    if step % cfg.train.ckpt_every == 0 or step == total or stop:
      last = check(*pending)  # synchronous: never save a non-finite state
      if step % cfg.train.log_every == 0 or step == total:
        job.reporter.report(step, last)
      pending = None
      job.ckpt.save(step, job.state, job.train_iter, meta=job.ckpt_meta())
    if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
      ev = job.evaluate(step, job.state)
      job.writer.write(step, ev)
      last.update(ev)
    if stop:
      log(f"preempted: checkpoint at step {step} saved in {job.ckpt.directory}; exiting")
      break
  if pending is not None:
    last = check(*pending)
  return last, step


def _sae_events(job: job_lib.Job, step: int, log) -> None:
  """The SAE's once-per-run initialisation from the full buffer, and dead-feature resampling."""
  plan, state = job.plan, job.state
  if step == plan.init_step:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 10**9 + step)
    state["sae"] = job.sae_init(state["buffer"]["acts"], key)
    log(f"sae: initialised from {min(plan.capacity, job.cfg.sae.init_inputs):,} buffered activations at step {step}")
  if step > plan.init_step:
    sae_step = (step - plan.init_step) * plan.updates_per_step
    if any(sae_step - plan.updates_per_step < r <= sae_step for r in job.resample_at):
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 2 * 10**9 + step)
      state["sae"], info = job.sae_resample(state["sae"], state["buffer"]["acts"], key)
      info = jax.device_get(info)
      log(f"sae: resampled at SAE step {sae_step}: dead {info['dead'].tolist()}, "
          f"resampled {info['resampled'].tolist()} (per SAE)")


def _finish(job: job_lib.Job, log) -> None:
  """The end-of-run preview, from the run as saved (the run loader reads the final checkpoint)."""
  if jax.process_count() > 1:
    log("sae: the feature preview runs in single-process jobs only; open the run on one host for it "
        "(BUILD_NOTES.md, known gaps)")
    return
  from monojax.run import Run
  preview.finish(Run.open(job.workdir, mesh=job.mesh, log=log), log)
