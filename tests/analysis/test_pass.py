"""The analysis pass end to end on a tiny co-trained run (2 SAEs): the database against a slow
numpy reference computed from the run's own functions on the stored tokens; resume = uninterrupted;
one device = eight; universality of a run against itself; the verb's bad input."""
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from run_fixtures import ANALYSIS_TOKENS as TOKENS, analysis_options, copy_run

from monojax import analyze, errors
from monojax.analysis import database, proxies, scan, universality
from monojax.run import Run

quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def workdir(analysed_run_template, tmp_path_factory):
  """This module's copy of the session's tiny co-trained run (2 SAEs; hostile, URL, hex, Cyrillic and
  Arabic text in the analysis split) with RUN/analysis from the session's one uninterrupted pass
  (tests/conftest.py analysed_run_template: _opts(), the same pass as this module's)."""
  return copy_run(analysed_run_template, str(tmp_path_factory.mktemp("arun") / "run"))


def _opts(**kw):
  return analysis_options(**kw)


@pytest.fixture(scope="module")
def analysed(workdir):
  run = Run.open(workdir)
  keep = os.path.join(os.path.dirname(workdir), "analysis.first")
  shutil.copytree(database.database_dir(workdir), keep)
  return run, database.open_database(keep)


def _reference(run, db, unit):
  """Activations of `unit` on the stored tokens, from the run's own jitted functions."""
  tokens = np.asarray(db.tokens)
  if unit == "neurons":
    return np.asarray(run.mlp_acts(tokens), np.float64)
  return np.asarray(run.features(tokens, unit), np.float64)


@pytest.mark.parametrize("unit", ["neurons", "sae0", "sae1"])
def test_database_against_a_reference(analysed, unit):
  run, db = analysed
  assert db.n_tokens == TOKENS and db.tokens.shape == (TOKENS // 16, 16)
  assert db.meta["source"]["split"] == "analysis"
  f = _reference(run, db, unit)
  flat = f.reshape(-1, f.shape[-1])
  u = db.unit(unit)
  np.testing.assert_array_equal(u.array("fired"), (flat > 0).sum(0))
  np.testing.assert_allclose(u.array("density"), (flat > 0).mean(0))
  np.testing.assert_allclose(u.array("max"), flat.max(0), rtol=1e-5)
  assert u.array("hist").sum() == (flat > 0).sum()
  live = np.flatnonzero(u.array("fired") > 0)
  assert live.size > 0
  for j in live[:8]:
    rec = u.feature(j)
    top = [e for e in rec["examples"] if e["group"] == "top"]
    want = np.sort(flat[:, j][flat[:, j] > 0])[::-1][:len(top)]
    np.testing.assert_allclose([e["value"] for e in top], want, rtol=1e-5)
    for e in top[:3]:   # the example's token and window are where the activation is
      assert f[e["seq"], e["pos"], j] == pytest.approx(e["value"], rel=1e-5)
      assert e["tokens"][e["center"]] == db.tokens[e["seq"], e["pos"]]
      np.testing.assert_allclose(e["acts"][e["center"]], e["value"], rtol=1e-5)
    for e in rec["examples"]:
      if e["group"].startswith("interval"):
        i = int(e["group"].split()[1])
        assert (10 - i) / 10 * rec["max"] - 1e-6 <= e["value"] <= (11 - i) / 10 * rec["max"] + 1e-6
  # proxies: correlation of each unit with each proxy's labels on the stored tokens
  labels = proxies.ProxyLabeler(run.tokenizer).labels(np.asarray(db.tokens)).reshape(len(proxies.PROXIES), -1)
  corr = u.array("proxy_corr")
  for p in range(labels.shape[0]):
    if labels[p].std() == 0:
      continue
    for j in live[:4]:
      if flat[:, j].std() > 0:
        assert corr[j, p] == pytest.approx(np.corrcoef(flat[:, j], labels[p])[0, 1], abs=1e-4)
        share = (flat[:, j] * labels[p]).sum() / flat[:, j].sum()
        assert u.array("proxy_precision")[j, p] == pytest.approx(share, abs=1e-5)


def test_logit_effects_and_neurons_against_explicit_products(analysed):
  run, db = analysed
  model = nnx.merge(run.graphdef, run.params)
  W_out = np.asarray(model.blocks[0].mlp.W_out[...], np.float64)
  gamma = np.asarray(model.ln_final.w[...], np.float64)
  W_U = np.asarray(model.unembed_weight(), np.float64)[:, :run.tokenizer.vocab_size]
  from monojax.sae import core as sae_core
  dec = np.asarray(sae_core.decoder_directions(run.sae_state, run.sae("sae0")), np.float64)
  v = dec @ W_out
  eff = ((v - v.mean(1, keepdims=True)) * gamma) @ W_U
  eff -= np.median(eff, axis=1, keepdims=True)
  u = db.unit("sae0")
  for j in (0, 5, 63):
    np.testing.assert_array_equal(u.array("logit_top_ids")[j], np.argsort(-eff[j], kind="stable")[:10])
    np.testing.assert_allclose(u.array("logit_top_values")[j], np.sort(eff[j])[::-1][:10], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(u.array("top_neurons")[j], np.argsort(-np.abs(dec[j]), kind="stable")[:3])
  # the most correlated neuron, against np.corrcoef on the stored tokens
  f = _reference(run, db, "sae0").reshape(-1, 64)
  x = _reference(run, db, "neurons").reshape(-1, 64)
  for j in np.flatnonzero(f.std(0) > 0)[:5]:
    c = np.array([np.corrcoef(f[:, j], x[:, n])[0, 1] if x[:, n].std() > 0 else -2 for n in range(64)])
    assert u.array("corr_neuron_value")[j] == pytest.approx(c.max(), abs=1e-4)


def test_families_between_the_two_saes(analysed):
  _, db = analysed
  fam = db.families("sae0", "sae1")
  assert fam["cos_ids"].shape == (64, 3) and fam["corr_ids"].shape == (64, 3)
  assert (np.diff(fam["cos"], axis=1) <= 1e-6).all()


def test_resume_equals_uninterrupted(analysed, workdir):
  run, db = analysed
  with pytest.raises(KeyboardInterrupt):
    scan.run_pass(run, _opts(stop_after_batches=2), log=quiet)
  assert os.path.exists(os.path.join(workdir, scan.PARTIAL, "state.npz"))
  messages = []
  scan.run_pass(run, _opts(), log=messages.append)
  assert any("resuming" in m for m in messages)
  assert not os.path.exists(os.path.join(workdir, scan.PARTIAL))
  again = database.open_database(workdir)
  np.testing.assert_array_equal(again.tokens, db.tokens)
  for unit in db.unit_names:
    for name in os.listdir(os.path.join(db.path, unit)):
      if name.endswith(".npy"):
        a, b = db.unit(unit).array(name[:-4]), again.unit(unit).array(name[:-4])
        np.testing.assert_array_equal(a, b, err_msg=f"{unit}/{name}")


def test_one_device_equals_eight(analysed, workdir, tmp_path):
  run, db = analysed
  assert run.mesh.devices.size == 8
  one = Run.open(workdir, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model")))
  shutil.copytree(workdir, tmp_path / "copy", ignore=shutil.ignore_patterns("analysis*"))
  one.workdir = str(tmp_path / "copy")
  scan.run_pass(one, _opts(), log=quiet)
  other = database.open_database(one.workdir)
  for unit in ("neurons", "sae0"):
    for name in ("fired", "hist", "ex_seq", "ex_pos", "logit_top_ids"):
      np.testing.assert_array_equal(db.unit(unit).array(name), other.unit(unit).array(name), err_msg=name)
    for name in ("max", "density", "proxy_corr", "ex_val"):
      np.testing.assert_allclose(db.unit(unit).array(name), other.unit(unit).array(name), rtol=1e-5, atol=1e-6)


def test_universality_of_a_run_with_itself(analysed):
  run, _ = analysed
  out = universality.run_compare(run, run, _opts(), log=quiet)
  import json
  s = json.load(open(os.path.join(out, "summary.json")))
  assert s["features"]["median_max_corr"] == pytest.approx(1.0, abs=1e-6)
  assert s["neurons"]["median_max_corr"] == pytest.approx(1.0, abs=1e-6)
  m = np.load(os.path.join(out, "matches.npz"))
  ok = m["feature_best"] >= 0
  np.testing.assert_array_equal(m["feature_best"][ok], np.flatnonzero(ok))


@pytest.mark.parametrize("argv, says", [
    ([], "either --workdir"),
    (["--workdir=/nonexistent/run"], "/nonexistent/run"),
    (["--workdir=x", "--tokens=-5"], "--tokens"),
    (["--workdir=x", "--split=banana"], "--split"),
    (["--workdir=x", "--compare", "a", "b"], "either --workdir"),
])
def test_bad_command_lines_give_one_line(argv, says, capsys):
  try:
    code = analyze.main(argv)
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err.strip()
  assert code == 2 and says in err and len(err.splitlines()) == 1, err


def test_unknown_sae_and_missing_database(analysed, workdir, tmp_path, capsys):
  assert analyze.main([f"--workdir={workdir}", "--saes=sae7"]) == 2
  assert "no SAE" in capsys.readouterr().err
  with pytest.raises(errors.MissingInputError):
    database.open_database(str(tmp_path))


def test_out_never_replaces_foreign_files(analysed, tmp_path, capsys):
  run, _ = analysed
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  assert analyze.main([f"--workdir={run.workdir}", f"--out={foreign}", "--tokens=128", "--batch_size=8"]) == 2
  assert "not a feature database" in capsys.readouterr().err
  assert (foreign / "notes.txt").read_text() == "keep me" and len(os.listdir(foreign)) == 1
