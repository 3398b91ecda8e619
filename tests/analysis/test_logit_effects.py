"""Logit effects against an explicit float64 numpy product on a tiny random model."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from monojax.analysis import logit_effects as le
from monojax.models import transformer
from monojax.sae.catalogue import SAE

VOCAB, PADDED, D_MODEL, D_MLP, WIDTH = 53, 64, 16, 24, 40


def _model(tied: bool):
  cfg = ml_collections.ConfigDict({"d_model": D_MODEL, "d_mlp": D_MLP, "n_layers": 2, "n_heads": 2, "d_head": 8,
                                   "vocab_size": PADDED, "max_seq_len": 8, "positional": "learned",
                                   "tied_embeddings": tied, "init_std": 0.5})
  graphdef, params = transformer.build_model(cfg, seed=3)
  # a non-trivial final LN scale, so that γ matters
  w = params["ln_final"]["w"]
  w[...] = w[...] + jax.random.uniform(jax.random.key(1), (D_MODEL,))
  return nnx.merge(graphdef, params)


def _sae_state(rng):
  W_d = rng.standard_normal((2, WIDTH, D_MLP)).astype(np.float32) * 3.0  # non-unit rows (a 2024 SAE)
  sae = SAE(index=1, width=WIDTH, l1=5.0, recipe="2024", group="g0", member=1, k=0, layer=1, d_in=D_MLP, scaled=True)
  return {"groups": {"g0": {"params": {"W_d": W_d}}}, "input_scale": np.float32(7.0)}, sae, W_d[1]


def _reference(dirs_mlp, W_out, gamma, W_U):
  """float64: ((d W_out − mean) ⊙ γ) W_U[:, :VOCAB], median-shifted per row."""
  v = np.asarray(dirs_mlp, np.float64) @ np.asarray(W_out, np.float64)
  v = v - v.mean(-1, keepdims=True)
  eff = (v * np.asarray(gamma, np.float64)) @ np.asarray(W_U, np.float64)[:, :VOCAB]
  med = np.median(eff, axis=1)
  return eff - med[:, None], med


def _check(summary, ref, med, k, bins):
  n = ref.shape[0]
  assert summary["top_ids"].shape == (n, k) and summary["top_ids"].dtype == np.int32
  assert summary["hist_counts"].shape == (n, bins) and summary["hist_counts"].dtype == np.int32
  assert summary["hist_edges"].shape == (n, bins + 1)
  top, bottom = np.argsort(-ref, axis=1, kind="stable")[:, :k], np.argsort(ref, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(summary["top_ids"], top)
  np.testing.assert_array_equal(summary["bottom_ids"], bottom)
  np.testing.assert_allclose(summary["top_values"], np.take_along_axis(ref, top, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(summary["bottom_values"], np.take_along_axis(ref, bottom, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(summary["median"], med, rtol=1e-5, atol=1e-5)
  edges = summary["hist_edges"].astype(np.float64)
  np.testing.assert_allclose(edges[:, 0], ref.min(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(edges[:, -1], ref.max(1), rtol=1e-5, atol=1e-5)
  assert (summary["hist_counts"].sum(1) == VOCAB).all()
  for i in range(n):
    want, _ = np.histogram(ref[i], bins=edges[i])
    # a float64 value within fp32 rounding of an edge may land on either side of it (or outside)
    near = (np.abs(ref[i][:, None] - edges[i][None, :]) < 1e-5 * np.abs(ref[i]).max()).any(1).sum()
    assert np.abs(summary["hist_counts"][i] - want).sum() <= 2 * near, (i, summary["hist_counts"][i], want)


@pytest.mark.parametrize("tied", [False, True])
def test_sae_features_match_numpy(tied):
  rng = np.random.default_rng(0)
  model = _model(tied)
  w = le.lm_weights(model, layer=1)
  W_U = np.asarray(model.W_E[...]).T if tied else np.asarray(model.W_U[...])
  np.testing.assert_array_equal(np.asarray(w["W_U"]), W_U)
  assert w["W_U"].shape == (D_MODEL, PADDED)
  state, sae, W_d = _sae_state(rng)
  dirs = le.sae_directions(state, sae)
  unit = W_d / np.linalg.norm(W_d, axis=1, keepdims=True)  # magnitudes: per unit of reported activation
  np.testing.assert_allclose(np.asarray(dirs), unit, rtol=1e-6, atol=1e-7)
  resid = le.feature_resid_directions(state, sae, w["W_out"])
  ref, med = _reference(unit, w["W_out"], w["ln_gamma"], W_U)
  summary = le.logit_effect_summary(resid, w["ln_gamma"], w["W_U"], VOCAB, k=5, bins=12, chunk=7)
  _check(summary, ref, med, 5, 12)
  full = le.logit_weights(resid, w["ln_gamma"], w["W_U"], VOCAB)
  assert full.shape == (WIDTH, VOCAB)
  np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5)
  for i in range(WIDTH):  # exact: same fp32 values, same edges
    np.testing.assert_array_equal(summary["hist_counts"][i], np.histogram(full[i], bins=summary["hist_edges"][i])[0])


def test_neurons_and_chunking():
  rng = np.random.default_rng(1)
  w = le.lm_weights(_model(False), layer=0)
  resid = le.neuron_directions(w["W_out"])
  assert resid.shape == (D_MLP, D_MODEL)
  ref, med = _reference(np.eye(D_MLP), w["W_out"], w["ln_gamma"], w["W_U"])
  whole = le.logit_effect_summary(resid, w["ln_gamma"], w["W_U"], VOCAB, k=10, bins=40, chunk=D_MLP)
  _check(whole, ref, med, 10, 40)
  for chunk in (1, 5, 1000):
    part = le.logit_effect_summary(resid, w["ln_gamma"], w["W_U"], VOCAB, k=10, bins=40, chunk=chunk)
    for name in whole:
      np.testing.assert_allclose(part[name], whole[name], rtol=1e-6, atol=1e-6, err_msg=name)
  # direction scale: effects scale linearly, ids unchanged
  doubled = le.logit_effect_summary(2.0 * resid, w["ln_gamma"], w["W_U"], VOCAB, k=10, bins=40)
  np.testing.assert_array_equal(doubled["top_ids"], whole["top_ids"])
  np.testing.assert_allclose(doubled["top_values"], 2 * whole["top_values"], rtol=1e-5)
  del rng


def test_padding_columns_never_counted():
  rng = np.random.default_rng(2)
  W_U = rng.standard_normal((D_MODEL, PADDED)).astype(np.float32)
  W_U[:, VOCAB:] = 1e6  # padding columns that would dominate every top-k if they were read
  dirs = rng.standard_normal((6, D_MODEL)).astype(np.float32)
  gamma = np.ones(D_MODEL, np.float32)
  s = le.logit_effect_summary(dirs, gamma, W_U, VOCAB, k=VOCAB, bins=8)
  assert s["top_ids"].max() < VOCAB and s["bottom_ids"].max() < VOCAB
  assert (s["hist_counts"].sum(1) == VOCAB).all() and np.abs(s["hist_edges"]).max() < 1e5
  assert sorted(s["top_ids"][0]) == list(range(VOCAB))


def test_centring_and_constant_rows():
  rng = np.random.default_rng(3)
  W_U = rng.standard_normal((D_MODEL, VOCAB)).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, D_MODEL).astype(np.float32)
  ones = np.ones((1, D_MODEL), np.float32)  # LN removes the mean: a constant direction does nothing
  zero = np.zeros((1, D_MODEL), np.float32)  # e.g. a dead feature with a zero decoder row
  s = le.logit_effect_summary(np.concatenate([ones, zero]), gamma, W_U, VOCAB, k=3, bins=4)
  np.testing.assert_allclose(s["top_values"], 0, atol=1e-5)
  assert (s["hist_counts"].sum(1) == VOCAB).all()
  np.testing.assert_allclose(s["hist_edges"][1, [0, -1]], [-0.5, 0.5])  # np.histogram's empty range
  assert s["hist_counts"][1].tolist() == np.histogram(np.zeros(VOCAB), bins=4)[0].tolist()
  raw = le.logit_weights(ones, gamma, W_U, VOCAB, center=False)
  assert np.abs(raw).max() > 1e-3
  empty = le.logit_effect_summary(np.zeros((0, D_MODEL)), gamma, W_U, VOCAB, k=3, bins=4)
  assert empty["top_ids"].shape == (0, 3) and empty["hist_edges"].shape == (0, 5)
  with pytest.raises(ValueError):
    le.logit_effect_summary(zero, gamma, W_U, VOCAB + 1)
