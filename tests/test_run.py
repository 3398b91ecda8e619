"""The run loader (monojax/run.py): a run opened from disk gives what the in-memory training state
gave at that step — for a co-trained run with several SAE groups, and for a frozen-LM run — and a
workdir it cannot open gives one clear line and is left exactly as it was."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monojax import errors
from monojax.run import Run
from monojax.sae import catalogue, core as sae_core
from monojax.train import step as step_lib
from run_fixtures import tiny_config, train_in_process

SAES = "64:0.004:2023,64:0.01:2023,32::2024,48:0:topk"  # three groups, a λ sweep, a TopK SAE


def _cfg(tiny_corpus, index_dir, **overrides):
  return tiny_config(tiny_corpus, index_dir, **{
      "train.steps": 6, "train.ckpt_every": 3, "train.log_every": 3, "sae.saes": SAES, "sae.topk_k": 4,
      "sae.aux_k": 8, **overrides})


def _train(cfg, workdir):
  """The in-memory training state at the last (checkpointed) step, as a job (run_fixtures)."""
  return train_in_process(cfg, workdir)


def _snapshot(root):
  """Every file under root with its size and mtime (to show nothing was written)."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for f in dirs + files:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
  base = tmp_path_factory.mktemp("runs")
  idx = base / "idx"
  cotrained = _train(_cfg(tiny_corpus, idx), base / "cotrain")
  lm = _train(_cfg(tiny_corpus, idx, mode="lm", **{"train.steps": 3}), base / "lm")
  lm_files = _snapshot(base / "lm")
  frozen = _train(_cfg(tiny_corpus, idx, mode="frozen", lm_checkpoint=str(base / "lm"),
                       **{"data.seq_len": 8, "sae.saes": "64:0.002:2023,64:0.008:2023", "train.steps": 4}),
                  base / "frozen")
  return {"cotrain": cotrained, "lm": lm, "frozen": frozen, "lm_files": lm_files, "base": base}


def _tokens(run):
  return next(iter(run.held_out_batches(1)))["tokens"]


def _reference(job, tokens):
  """Clean CE sum and MLP activations from the training code path (train/step.lm_forward) on the
  in-memory parameters."""
  cfg = job.cfg
  _, aux = step_lib.lm_forward(job.graphdef, job.state["params"], tokens, vocab_size=job.tokenizer.vocab_size,
                               dtype=jnp.float32, loss_chunk=0)
  return aux["ce_sum"], aux["mlp_post"][cfg.sae.layer]


def _same_leaves(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["cotrain", "frozen"])
def test_opened_run_equals_the_in_memory_state(runs, name):
  job = runs[name]
  run = Run.open(job.workdir)
  assert run.step == job.cfg.train.steps and run.cfg.mode == name
  assert run.saes == job.saes == catalogue.build(job.cfg.sae, job.cfg.model.d_mlp, job.cfg.sae.layer)
  _same_leaves(run.params, job.state["params"])
  for g in {s.group for s in run.saes}:  # bit-identical SAE parameters and firing statistics
    for part in ("params", "fired_count", "fired_count_last", "last_fired"):
      _same_leaves(run.sae_state["groups"][g][part], job.state["sae"]["groups"][g][part])
  assert float(run.sae_state["input_scale"]) == float(job.state["sae"]["input_scale"])

  tokens = _tokens(run)
  inputs, targets = tokens[:, :-1], np.asarray(tokens[:, 1:])
  ce_ref, acts_ref = _reference(job, tokens)
  acts = run.mlp_acts(inputs)
  np.testing.assert_allclose(np.asarray(acts), np.asarray(acts_ref), rtol=1e-6, atol=1e-6)
  logits = np.asarray(run.logits(inputs), np.float64)
  assert logits.shape == (*inputs.shape, run.tokenizer.vocab_size)  # padding columns dropped
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1,
                                                                                                              keepdims=True)
  ce = -np.take_along_axis(logp, targets[..., None], -1).sum()
  np.testing.assert_allclose(ce, float(ce_ref), rtol=1e-5)
  x = np.asarray(acts_ref).reshape(-1, acts_ref.shape[-1])
  for sae in run.saes:
    f = np.asarray(run.features(inputs, sae))
    assert f.shape == (*inputs.shape, sae.width)
    want = np.asarray(sae_core.encode(job.state["sae"], sae, x)).reshape(f.shape)
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)
    assert (f > 0).any(), f"{sae.name} never fires: the comparison would be vacuous"
  assert run.sae("sae1") == run.saes[1] and run.sae(1) == run.saes[1]
  with pytest.raises(errors.UserInputError, match="no SAE 'sae9'"):
    run.sae("sae9")


def test_several_groups_and_recipes_are_in_the_catalogue(runs):
  run = Run.open(runs["cotrain"].workdir)
  assert [(s.name, s.recipe, s.width, s.l1, s.k) for s in run.saes] == [
      ("sae0", "2023", 64, 0.004, 0), ("sae1", "2023", 64, 0.01, 0), ("sae2", "2024", 32, 5.0, 0),
      ("sae3", "topk", 48, 0.0, 4)]
  assert run.saes[0].group == run.saes[1].group != run.saes[2].group  # the λ sweep is one stacked group
  assert {s.member for s in run.saes[:2]} == {0, 1}
  scale = float(runs["cotrain"].state["sae"]["input_scale"])
  # every SAE here trains on scaled inputs (the 2023 ones through sae.normalize_inputs, the default)
  assert [run.input_scale(s) for s in run.saes] == [scale] * 4 and scale != 1.0 and all(s.scaled for s in run.saes)
  assert "sae3 [48 topk l1=0] layer 0" in repr(run)


def test_frozen_run_uses_the_lm_run(runs):
  lm, frozen = Run.open(runs["lm"].workdir), Run.open(runs["frozen"].workdir)
  assert frozen.cfg.model.to_dict() == lm.cfg.model.to_dict()  # the LM's model, max_seq_len included
  assert frozen.cfg.data.seq_len == 8 < lm.cfg.model.max_seq_len == 16  # a shorter context than the LM's
  assert frozen.tokenizer.hf.to_str() == lm.tokenizer.hf.to_str()
  _same_leaves(frozen.params, lm.params)  # the LM is frozen: its parameters are the LM run's
  assert lm.saes == () and lm.sae_state is None
  assert _snapshot(runs["base"] / "lm") == runs["lm_files"]  # the LM run was only read
  assert frozen.meta["lm_source"] == {"workdir": lm.workdir, "step": lm.step}  # which LM, which step


def test_tokenizer_is_the_runs_copy_not_retrained(runs, tmp_path):
  wd = tmp_path / "moved"
  shutil.copytree(runs["cotrain"].workdir, wd)
  cfg = json.loads((wd / "config.json").read_text())
  cfg["data"]["index_dir"] = str(tmp_path / "empty-index")  # where a retrained BPE would have to go
  (wd / "config.json").write_text(json.dumps(cfg))
  run = Run.open(wd)
  assert run.tokenizer.spec == str(wd / "tokenizer.json")
  assert run.tokenizer.hf.to_str() == runs["cotrain"].tokenizer.hf.to_str()
  assert not (tmp_path / "empty-index").exists()


def _open_error(wd, step=None) -> str:
  before = _snapshot(wd)
  with pytest.raises(errors.UserInputError) as e:
    Run.open(wd, step=step)
  assert _snapshot(wd) == before  # nothing written, moved or deleted
  msg = str(e.value)
  assert "\n" not in msg and len(msg) < 400, msg
  return msg


def test_unopenable_workdirs_give_one_clear_line(runs, tmp_path):
  good = runs["cotrain"].workdir
  with pytest.raises(errors.MissingInputError, match="not a directory"):
    Run.open(tmp_path / "nowhere")

  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  shutil.copy(os.path.join(good, "config.json"), no_ckpt)
  assert "no checkpoints/ folder" in _open_error(no_ckpt)

  partial = tmp_path / "partial"
  shutil.copytree(good, partial)
  for step in os.listdir(partial / "checkpoints"):  # only an unfinished save left
    shutil.move(partial / "checkpoints" / step, partial / "checkpoints" / f"{step}.orbax-checkpoint-tmp-123")
  msg = _open_error(partial)
  assert "no complete checkpoint" in msg and "unfinished" in msg

  assert "no checkpoint at step 5; saved steps: 3, 6" in _open_error(good, step=5)

  corrupt = tmp_path / "corrupt"
  shutil.copytree(good, corrupt)
  for root, _, files in os.walk(corrupt / "checkpoints" / "6" / "state"):
    for f in files:
      if not f.startswith("_") and "manifest" not in f:
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
  msg = _open_error(corrupt)
  assert "checkpoints/6" in msg and "cannot be read" in msg and "step=3" in msg
  assert Run.open(corrupt, step=3).step == 3  # the older step still opens


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c["model"].pop("positional"), "field model.positional is missing"),
    (lambda c: c["train"].update(new_knob=1), "field train.new_knob is unknown"),
    (lambda c: c.update(config_version=99), "config_version 99"),
    (lambda c: c["model"].update(d_mlp="wide"), "field model.d_mlp = 'wide' is not a int"),
    (lambda c: c["model"].update(d_mlp=32), "is saved as"),
])
def test_config_from_another_monojax_is_one_clear_line(runs, tmp_path, edit, expect):
  wd = tmp_path / "other"
  shutil.copytree(runs["cotrain"].workdir, wd)
  cfg = json.loads((wd / "config.json").read_text())
  edit(cfg)
  (wd / "config.json").write_text(json.dumps(cfg))
  assert expect in _open_error(wd)


def test_older_run_without_records_opens_from_its_config(runs, tmp_path):
  """A run written before checkpoints carried the SAE records (and config.json its version and
  resolved vocab) opens: the catalogue comes from its config."""
  wd = tmp_path / "older"
  shutil.copytree(runs["cotrain"].workdir, wd)
  for step in os.listdir(wd / "checkpoints"):
    shutil.rmtree(wd / "checkpoints" / step / "meta", ignore_errors=True)
  cfg = json.loads((wd / "config.json").read_text())
  cfg.pop("config_version")
  cfg["model"]["vocab_size"] = None
  (wd / "config.json").write_text(json.dumps(cfg))
  run = Run.open(wd)
  assert run.saes == runs["cotrain"].saes and run.cfg.model.vocab_size == runs["cotrain"].cfg.model.vocab_size


def test_opens_on_another_mesh(runs):
  """A run trained data-parallel on 8 devices opens sharded (2 data x 4 model) and gives the same
  features: orbax reshards on restore."""
  from monojax import sharding
  from ml_collections import config_dict
  mesh = sharding.make_mesh(config_dict.ConfigDict({"shape": (2, 4), "axes": ("data", "model")}))
  a, b = Run.open(runs["cotrain"].workdir), Run.open(runs["cotrain"].workdir, mesh=mesh)
  w_in = b.params["blocks"][0]["mlp"]["W_in"]
  assert w_in.sharding.spec == jax.sharding.PartitionSpec(None, "model")  # the MLP width split 4 ways
  tokens = _tokens(a)[:, :-1]
  for sae in a.saes:
    np.testing.assert_allclose(np.asarray(b.features(tokens, sae)), np.asarray(a.features(tokens, sae)),
                               rtol=1e-5, atol=1e-6)
