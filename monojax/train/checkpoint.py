"""Orbax checkpoints of the train state plus the grain iterator, with fallback to an older step.

Each step folder holds `state/` (sharded arrays: params, optimizer, step, rng) and `data/` (grain's
iterator state, one file per process). Orbax writes into a temporary folder and renames it when the
save is complete, so a half-written step is never listed; a step that is listed but cannot be
restored (files deleted or corrupted afterwards) is reported and the previous one is used.
"""
from __future__ import annotations

import logging
import os
import time

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, use_async: bool, log=logging.info):
    self.directory = os.path.abspath(directory)
    self.log = log
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
    self.mngr = ocp.CheckpointManager(self.directory, options=opts)

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, data_iter) -> None:
    self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore_latest(self, state_template, data_iter):
    """Restores the newest restorable step into the template's shapes and shardings (which may be
    a different mesh than the one saved) and moves `data_iter` to the saved position. Returns
    (step, state), or None when there is no checkpoint."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_template)
    steps = self.steps()
    for i, step in enumerate(reversed(steps)):
      try:
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # noqa: BLE001 — any failure to read a step means: try the one before
        older = steps[-i - 2] if i + 1 < len(steps) else None
        aside = self._move_aside(step)
        self.log(f"checkpoint: step {step} in {self.directory} cannot be restored ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:200]}); moved to {aside}; "
                 + (f"falling back to step {older}" if older is not None else "no older checkpoint: starting from scratch"))
        continue
      return step, out["state"]
    return None

  def _move_aside(self, step: int) -> str:
    """Keeps an unrestorable step for inspection (nothing written is deleted) but out of the way
    of the new save of the same step number."""
    aside_root = self.directory + ".unrestorable"
    os.makedirs(aside_root, exist_ok=True)
    dest = os.path.join(aside_root, f"{step}-{int(time.time())}")
    os.rename(os.path.join(self.directory, str(step)), dest)
    self.mngr.reload()
    return dest

  def restore_params(self, params_template):
    """(step, params) of the newest restorable step, placed like `params_template` (a frozen-LM run
    reads only the parameters; the saved state may also hold an optimizer, SAEs and a buffer)."""
    for step in reversed(self.steps()):
      try:
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      except Exception as e:  # noqa: BLE001
        self.log(f"checkpoint: step {step} in {self.directory} cannot be read ({type(e).__name__}); trying older")
        continue
      saved = jax.tree.leaves(out["state"]["params"])
      template, treedef = jax.tree.flatten(params_template)
      shapes = [tuple(x.shape) for x in saved], [tuple(x.shape) for x in template]
      if shapes[0] != shapes[1]:
        raise ValueError(f"lm_checkpoint: parameters in {self.directory} step {step} do not match the configured "
                         f"model (shapes {shapes[0][:4]}... vs {shapes[1][:4]}...)")
      return step, jax.tree.unflatten(treedef, [jax.device_put(s, t.sharding) for s, t in zip(saved, template)])
    return None

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
