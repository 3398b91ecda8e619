"""Orbax checkpoints of a run: the train state, the grain iterator and a JSON record of what the
state holds, with fallback to an older step for training and a read-only view for the run loader.

Each step folder holds `state/` (sharded arrays: params, optimizer, step, rng, SAEs, buffer),
`data/` (grain's iterator state, one file per process) and `meta/` (JSON: the format version and
the SAE catalogue, see sae/catalogue.py; absent in runs written before it existed). Orbax writes
into a temporary folder and renames it when the save is complete, so a half-written step is never
listed; a step that is listed but cannot be restored (files deleted or corrupted afterwards) is
reported, moved aside (training) or named in the error (reading), never deleted.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import contextlib

import grain
import jax
import orbax.checkpoint as ocp

from monojax import errors

FORMAT = 1  # the meta record's layout; a newer one is refused by an older monojax


class _NoReadOnlyNotice(logging.Filter):
  """Orbax warns about every read-only manager it makes (and the options it then drops), and about
  the items a partial restore leaves unread on purpose (the data iterator's state); reading a run
  is not worth a warning."""
  QUIET = ("Given directory is read only", "CheckpointManagerOptions.read_only=True",
           'Item "data" was found in the checkpoint, but could not be restored')

  def filter(self, record):
    message = record.getMessage()
    return not any(q in message for q in self.QUIET)


logging.getLogger("absl").addFilter(_NoReadOnlyNotice())


def drop_closed_loop_callbacks() -> None:
  """After a failed read, orbax's pending tensorstore callbacks call into the event loop it has
  already closed; Python prints each as an 'Exception ignored' traceback. That is noise about a
  failure already reported in one line: drop exactly those, pass everything else on."""
  previous = sys.unraisablehook
  if getattr(previous, "_monojax", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)
  hook._monojax = True
  sys.unraisablehook = hook
  # The same reads' futures, garbage-collected later, are logged by asyncio as "Task exception was
  # never retrieved" with the tensorstore error's traceback (when depends on the collector).
  logging.getLogger("asyncio").addFilter(_NoUnretrievedReadErrors())


class _NoUnretrievedReadErrors(logging.Filter):
  def filter(self, record):
    return "exception was never retrieved" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax's own error logs off while a step is tried (its failure is reported as one line)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def flat_shapes(tree) -> dict[str, tuple]:
  """{"params/blocks/0/mlp/W_in": shape} for every leaf (NNX's "value" wrappers dropped, so a saved
  tree and a module's state name their leaves alike)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    out["/".join(n for n in names if n != "value")] = tuple(leaf.shape)
  return out


class Checkpointer:
  def __init__(self, directory: str, *, keep: int | None = None, use_async: bool = False, log=logging.info,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.log = log
    self.read_only = read_only
    if read_only:
      # Handlers named up front, so the saved state's metadata can be read before any restore and
      # parts of it restored alone (the PyTree handler reads what StandardSave wrote).
      opts = ocp.CheckpointManagerOptions(read_only=True, create=False)
      handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
      self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)
    else:
      opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
      self.mngr = ocp.CheckpointManager(self.directory, options=opts)

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, data_iter, meta: dict | None = None) -> None:
    items = dict(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter))
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(dict(meta, format=FORMAT))
    self.mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, state_template, data_iter):
    """Restores the newest restorable step into the template's shapes and shardings (which may be
    a different mesh than the one saved) and moves `data_iter` to the saved position. Returns
    (step, state), or None when there is no checkpoint. A step whose files cannot be read (corrupt,
    partial) is moved aside with one line and the one before is tried; a readable step holding a
    state of another shape is refused (errors.RunFormatError: nothing is moved)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_template)
    steps = self.steps()
    for i, step in enumerate(reversed(steps)):
      older = steps[-i - 2] if i + 1 < len(steps) else None
      drop_closed_loop_callbacks()  # before the read: a failing one's callbacks can fire while it fails
      try:
        with _quiet_orbax():  # orbax logs a long dump for every unreadable file: we say it in one line
          self._check_structure(step, abstract)
          out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                data=grain.checkpoint.CheckpointRestore(data_iter)))
      except errors.RunFormatError:
        raise
      except Exception as e:  # noqa: BLE001 — any failure to read a step means: try the one before
        aside = self._move_aside(step)
        self.log(f"checkpoint: step {step} in {self.directory} cannot be read ({type(e).__name__}: "
                 f"{' '.join(str(e).split())[:160]}); moved to {aside}; "
                 + (f"falling back to step {older}" if older is not None else "no older checkpoint: starting from scratch"))
        continue
      return step, out["state"]
    return None

  def _check_structure(self, step: int, abstract) -> None:
    """Raises RunFormatError if the saved state's leaves differ in name or shape from `abstract`."""
    reader = Checkpointer(self.directory, read_only=True)
    try:
      saved = flat_shapes(reader.saved_structure(step))
    finally:
      reader.close()
    want = flat_shapes(abstract)
    for name in sorted(set(saved) | set(want)):
      if saved.get(name) != want.get(name):
        got = "absent" if name not in saved else f"saved as {saved[name]}"
        need = "not made by this config" if name not in want else f"this config makes {want[name]}"
        raise errors.RunFormatError(
            f"checkpoint step {step} in {self.directory} holds another state ({name}: {got}, {need}); nothing was "
            "moved: run with the config it was trained with, or use another --workdir")

  def _move_aside(self, step: int) -> str:
    """Keeps an unrestorable step for inspection (nothing written is deleted) but out of the way
    of the new save of the same step number."""
    aside_root = self.directory + ".unrestorable"
    os.makedirs(aside_root, exist_ok=True)
    dest = os.path.join(aside_root, f"{step}-{int(time.time())}")
    os.rename(os.path.join(self.directory, str(step)), dest)
    self.mngr.reload()
    return dest

  def has_meta(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), "meta"))

  def read_meta(self, step: int) -> dict | None:
    """The step's JSON record, or None for a checkpoint written before records existed."""
    if not self.has_meta(step):
      return None
    return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_parts(self, step: int, abstract: dict) -> dict:
    """Only the named parts of the saved state (e.g. {"params": ..., "sae": ...}), each leaf a
    jax.ShapeDtypeStruct with the sharding to restore to; the rest (optimizer, buffer) is never
    read. Raises whatever orbax raises when the step cannot be read."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    return self.mngr.restore(step, args=ocp.args.Composite(state=args))["state"]

  def saved_structure(self, step: int) -> dict:
    """The saved state's tree of array metadata (shapes and dtypes), read without the arrays."""
    meta = self.mngr.item_metadata(step)
    tree = meta["state"] if meta is not None and "state" in meta else None
    if tree is None:
      raise FileNotFoundError(f"step {step} in {self.directory} has no readable state metadata")
    return getattr(tree, "tree", tree)

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
