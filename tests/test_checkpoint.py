"""monojax/checkpoint.py: a readable checkpoint of another shape is refused (nothing moved); only an
unreadable one is moved aside, in one line, and the step before it restored."""
import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from monojax import checkpoint, errors


def _iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save(directory, steps, shape=(4, 3)):
  ck = checkpoint.Checkpointer(str(directory), keep=5, use_async=False, log=lambda *a: None)
  for s in steps:
    ck.save(s, {"params": {"w": jnp.full(shape, float(s))}, "step": jnp.int32(s)}, _iter(), meta={"saes": []})
  ck.close()


def test_a_checkpoint_of_another_shape_is_refused_and_left_alone(tmp_path):
  _save(tmp_path / "ck", [1, 2])
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=5, use_async=False, log=lambda *a: None)
  other = {"params": {"w": jnp.zeros((4, 5))}, "step": jnp.int32(0)}
  with pytest.raises(errors.RunFormatError, match=r"step 2 .* holds another state \(params/w: saved as \(4, 3\), "
                                                  r"this config makes \(4, 5\)\); nothing was moved"):
    ck.restore_latest(other, _iter())
  assert ck.steps() == [1, 2] and not (tmp_path / "ck.unrestorable").exists()
  step, state = ck.restore_latest({"params": {"w": jnp.zeros((4, 3))}, "step": jnp.int32(0)}, _iter())
  assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert ck.read_meta(2) == {"saes": [], "format": checkpoint.FORMAT}
  ck.close()


def test_an_unreadable_checkpoint_is_moved_aside_in_one_line(tmp_path):
  _save(tmp_path / "ck", [1, 2])
  for root, _, files in os.walk(tmp_path / "ck" / "2" / "state"):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
  logs = []
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=5, use_async=False, log=logs.append)
  step, state = ck.restore_latest({"params": {"w": jnp.zeros((4, 3))}, "step": jnp.int32(0)}, _iter())
  ck.close()
  assert step == 1 and np.asarray(state["params"]["w"]).max() == 1.0
  [line] = logs
  assert "step 2" in line and "cannot be read" in line and "falling back to step 1" in line and "\n" not in line
  assert [p.name.split("-")[0] for p in (tmp_path / "ck.unrestorable").iterdir()] == ["2"]
