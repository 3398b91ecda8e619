"""Similarity functions against np.corrcoef and brute force."""
import numpy as np
import pytest

from monojax.analysis import similarity as sim


def _acts(rng, T, A, dead=(), const=()):
  x = np.maximum(rng.standard_normal((T, A)), 0).astype(np.float32)
  x[:, list(dead)] = 0.0
  x[:, list(const)] = 0.75
  return x


def _streamed(a, b, batch):
  total = None
  for s in range(0, a.shape[0], batch):
    total = sim.add_sums(total, sim.batch_sums(a[s:s + batch], b[s:s + batch]))
  return total


def test_pearson_matches_corrcoef_with_dead_and_constant():
  rng = np.random.default_rng(0)
  a = _acts(rng, 300, 7, dead=[2], const=[5])
  b = 0.5 * a[:, [0, 1, 3, 4, 6]] + np.maximum(rng.standard_normal((300, 5)), 0).astype(np.float32)
  b = np.concatenate([b, np.zeros((300, 1), np.float32)], 1)  # a dead column
  sums = _streamed(a, b, batch=64)
  assert sums["n"] == 300 and sums["sum_ab"].dtype == np.float64
  corr = sim.corr_from_sums(sums)
  assert corr.shape == (7, 6)
  with np.errstate(invalid="ignore", divide="ignore"):  # numpy warns on the constant columns
    full = np.corrcoef(a.astype(np.float64), b.astype(np.float64), rowvar=False)[:7, 7:]
  live_r, live_c = [0, 1, 3, 4, 6], [0, 1, 2, 3, 4]
  np.testing.assert_allclose(corr[np.ix_(live_r, live_c)], full[np.ix_(live_r, live_c)], atol=1e-6)
  assert np.isnan(corr[[2, 5]]).all() and np.isnan(corr[:, 5]).all()
  assert np.isfinite(corr[np.ix_(live_r, live_c)]).all()
  with pytest.raises(ValueError):
    sim.pearson_from_sums(1, *(np.zeros(1) for _ in range(4)), np.zeros((1, 1)))


def test_self_correlation_is_identity():
  rng = np.random.default_rng(1)
  a = _acts(rng, 500, 12, dead=[4])
  corr = sim.corr_from_sums(_streamed(a, a, batch=100))
  live = [i for i in range(12) if i != 4]
  np.testing.assert_allclose(np.diag(corr)[live], 1.0, atol=1e-6)
  ids, vals = sim.best_match(corr)
  assert ids[live].tolist() == live and ids[4] == -1 and np.isnan(vals[4])
  np.testing.assert_allclose(vals[live], 1.0, atol=1e-6)
  t = sim.transpose_sums(_streamed(a, a[:, :3], 100))
  np.testing.assert_allclose(sim.corr_from_sums(t), corr[:3], atol=1e-6, equal_nan=True)


def test_top_k_rows_nan_safe():
  c = np.array([[0.1, np.nan, 0.9, -0.5], [np.nan] * 4, [np.nan, 0.2, np.nan, np.nan]])
  ids, vals = sim.top_k_rows(c, 2)
  assert ids.tolist() == [[2, 0], [-1, -1], [1, -1]]
  np.testing.assert_allclose(vals, [[0.9, 0.1], [np.nan, np.nan], [0.2, np.nan]])


def test_universality_on_constructed_data():
  # features: best matches 0.1, 0.5, 0.7, 0.9 (median 0.6) and one dead row; neurons: 0.2, 0.4, 0.6
  cf = np.full((5, 3), -0.3)
  cf[0, 1], cf[1, 2], cf[2, 0], cf[3, 1] = 0.1, 0.5, 0.7, 0.9
  cf[4] = np.nan
  cn = np.array([[0.2, -0.1, np.nan], [0.0, 0.4, np.nan], [0.6, 0.1, np.nan]])
  u = sim.universality(cf, cn, bins=10, hist_range=(0.0, 1.0))
  f, n = u["features"], u["neurons"]
  assert f["median"] == pytest.approx(0.6) and n["median"] == pytest.approx(0.4)
  assert f["mean"] == pytest.approx(0.55)
  assert (f["n_used"], f["n_excluded"], f["dead_rows"], f["dead_columns"]) == (4, 1, 1, 0)
  assert (n["n_used"], n["n_excluded"], n["dead_rows"], n["dead_columns"]) == (3, 0, 0, 1)
  assert f["best_index"].tolist() == [1, 2, 0, 1, -1]
  np.testing.assert_allclose(f["edges"], np.linspace(0, 1, 11))
  assert f["counts"].tolist() == np.histogram([0.1, 0.5, 0.7, 0.9], bins=10, range=(0, 1))[0].tolist()
  assert f["counts"].sum() == 4 and n["counts"].sum() == 3


def _brute(a, b, k, exclude_self=False):
  an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  cos = an.astype(np.float64) @ bn.astype(np.float64).T
  if exclude_self:
    np.fill_diagonal(cos, -np.inf)
  ids = np.argsort(-cos, axis=1, kind="stable")[:, :k]
  return ids, np.take_along_axis(cos, ids, 1)


def test_decoder_cosine_neighbours_vs_brute_force_and_chunks():
  rng = np.random.default_rng(2)
  a = rng.standard_normal((37, 10)).astype(np.float32) * rng.uniform(0.1, 5, (37, 1)).astype(np.float32)
  b = rng.standard_normal((23, 10)).astype(np.float32)
  want_ids, want_cos = _brute(a, b, 3)
  for chunk in (1, 8, 37, 4096):
    ids, cos = sim.decoder_cosine_neighbours(a, b, k=3, chunk=chunk)
    assert ids.shape == (37, 3) and ids.dtype == np.int32 and cos.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(cos, want_cos, atol=1e-5)
  ids, cos = sim.decoder_cosine_neighbours(a, a, k=2, chunk=5)
  assert (ids[:, 0] == np.arange(37)).all()
  np.testing.assert_allclose(cos[:, 0], 1.0, atol=1e-5)
  ids, cos = sim.decoder_cosine_neighbours(a, a, k=2, chunk=5, exclude_self=True)
  want_ids, want_cos = _brute(a, a, 2, exclude_self=True)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(cos, want_cos, atol=1e-5)
  with pytest.raises(ValueError):
    sim.decoder_cosine_neighbours(a, b[:, :5])


def test_families():
  rng = np.random.default_rng(3)
  d = 12
  small = rng.standard_normal((6, d)).astype(np.float32)
  # the large SAE splits each small feature into two nearby ones
  big = np.repeat(small, 2, axis=0) + 0.05 * rng.standard_normal((12, d)).astype(np.float32)
  acts_small = _acts(rng, 400, 6, dead=[5])
  acts_big = np.repeat(acts_small, 2, axis=1) * rng.uniform(0.5, 1.0, (400, 12)).astype(np.float32)
  sums = {("s", "b"): _streamed(acts_small, acts_big, 128)}
  fam = sim.families({"s": small, "b": big}, k=2, corr_sums=sums, chunk=4)
  assert set(fam) == {("s", "b"), ("b", "s")}
  sb, bs = fam[("s", "b")], fam[("b", "s")]
  assert sb["cos_ids"].shape == (6, 2) and bs["cos_ids"].shape == (12, 2)
  assert all(sorted(sb["cos_ids"][i]) == [2 * i, 2 * i + 1] for i in range(6))
  assert (bs["cos_ids"][:, 0] == np.arange(12) // 2).all()
  assert all(sorted(sb["corr_ids"][i]) == [2 * i, 2 * i + 1] for i in range(5))
  assert (sb["corr_ids"][5] == -1).all() and np.isnan(sb["corr"][5]).all()
  assert (bs["corr_ids"][:10, 0] == np.arange(10) // 2).all() and (bs["corr_ids"][10:] == -1).all()
  corr = sim.corr_from_sums(sums[("s", "b")])
  np.testing.assert_allclose(bs["corr"][:10, 0], np.nanmax(corr[:, :10], axis=0))
  assert "corr" not in sim.families({"s": small, "b": big}, k=2)[("s", "b")]
