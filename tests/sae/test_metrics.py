"""SAE metrics against naive numpy references (fp32 in, fp64 reference)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monojax.sae import metrics


def test_batch_metrics_match_numpy():
  rng = np.random.RandomState(0)
  x = rng.randn(128, 16).astype(np.float32) + 2.0
  x_hat = x + 0.3 * rng.randn(128, 16).astype(np.float32)
  f = np.maximum(rng.randn(128, 64), 0).astype(np.float32)
  f[f < 0.5] = 0.0
  batch_metrics = jax.jit(metrics.batch_metrics)
  got = batch_metrics(x, x_hat.astype(jnp.bfloat16), f)  # bf16 inputs are cast to fp32
  x64, xh64, f64 = (np.asarray(a, np.float64) for a in (x, jnp.asarray(x_hat, jnp.bfloat16).astype(jnp.float32), f))
  err = (x64 - xh64) ** 2
  want = {
      "mse": err.mean(),
      "fvu": err.sum() / ((x64 - x64.mean(0)) ** 2).sum(),  # not Σx² (the bug SAELens PR #443 fixed)
      "l0": (f64 > 0).sum(1).mean(),
      "l1": np.abs(f64).sum(1).mean(),
  }
  assert set(got) == set(want)
  for k, value in want.items():
    assert got[k].dtype == jnp.float32
    np.testing.assert_allclose(float(got[k]), value, rtol=2e-5, err_msg=k)
  # MSE is a per-element mean: it does not grow with the batch (SAELens PR #711).
  big = batch_metrics(np.tile(x, (4, 1)), np.tile(x_hat, (4, 1)), np.tile(f, (4, 1)))
  np.testing.assert_allclose(float(big["mse"]), float(batch_metrics(x, x_hat, f)["mse"]), rtol=1e-5)
  constant = np.ones((4, 16), np.float32)
  assert np.isnan(float(batch_metrics(constant, 0 * constant, np.zeros((4, 64), np.float32))["fvu"]))


def test_density_stats_match_numpy():
  counts = np.array([0, 0, 1, 5, 100, 10_000, 3_000_000, 0, 40])
  n = 10_000_000
  got = metrics.density_stats(counts, n, ultralow=1e-6, dense=0.01)
  d = counts / n
  assert got["dead"] == 3 and got["alive"] == 6 and got["n_features"] == 9 and got["n_tokens"] == n
  assert got["ultralow"] == int(((d > 0) & (d < 1e-6)).sum()) == 2   # 1 and 5 of 10M
  assert got["dense"] == int((d > 0.01).sum()) == 1                  # 30 %
  assert got["median_alive_density"] == pytest.approx(float(np.median(d[d > 0])), rel=1e-6)
  with pytest.raises(ValueError):
    metrics.density_stats(counts, 0)


def test_loss_recovered():
  assert float(metrics.loss_recovered(2.0, 2.0, 5.0)) == pytest.approx(1.0)
  assert float(metrics.loss_recovered(2.0, 5.0, 5.0)) == pytest.approx(0.0)
  assert float(metrics.loss_recovered(2.0, 2.63, 5.0)) == pytest.approx(0.79)  # A/1's 79 % (docs/paper-notes.md §5.2)
  np.testing.assert_allclose(metrics.loss_recovered(np.array([2.0, 3.0]), np.array([3.0, 3.5]), 4.0), [0.5, 0.5])


def test_density_histogram_json_and_png(tmp_path):
  rng = np.random.RandomState(1)
  n = 1_000_000
  counts = np.concatenate([np.zeros(7, int), rng.randint(1, 3, 20), (10 ** rng.uniform(2, 4, 200)).astype(int),
                           [300_000]])
  data = metrics.density_histogram(counts, n, None, str(tmp_path / "d.json"), title="test")
  saved = json.loads((tmp_path / "d.json").read_text())
  assert saved == data
  assert data["dead"] == 7 and sum(data["counts"]) == counts.size - 7  # dead counted apart, every alive binned
  edges = np.asarray(data["log10_bin_edges"])
  assert edges[0] == -6 and edges[-1] == 0 and np.allclose(np.diff(edges), 0.2)
  want, _ = np.histogram(np.log10(counts[counts > 0] / n), bins=edges)
  assert data["counts"] == want.tolist()
  assert data["ultralow"] == 0 and data["dense"] == 1  # 1e-6 is the lowest measurable density here
  pytest.importorskip("matplotlib")
  png = tmp_path / "d.png"
  metrics.density_histogram(counts, n, str(png), None)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
