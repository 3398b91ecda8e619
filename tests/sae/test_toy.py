"""Toy superposition data and feature recovery: the 2023 and 2024 recipes each find >= 90 % of
the true features in a small setting (the paper's recipes on ground truth they can be scored on)."""
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from monojax.sae import toy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import toy as toy_configs  # noqa: E402  (configs/toy.py)


def test_sampler_rates_correlation_and_shapes():
  c = toy.toy_config()
  feats = toy.make_features(c, jax.random.key(0))
  np.testing.assert_allclose(np.linalg.norm(feats.directions, axis=1), 1.0, rtol=1e-5)
  x, a = jax.jit(lambda k: toy.sample(c, feats, k, 8192))(jax.random.key(1))
  assert x.shape == (8192, c.d) and a.shape == (8192, c.n_features)
  np.testing.assert_allclose(np.asarray(x), np.asarray(a) @ np.asarray(feats.directions), atol=1e-5)
  assert (np.asarray(a) > 0).mean() == pytest.approx(c.p_active, rel=0.05)
  c.corr, c.corr_block, c.magnitude = 0.8, 4, "exponential"
  _, a = jax.jit(lambda k: toy.sample(c, feats, k, 8192))(jax.random.key(2))
  on = np.asarray(a) > 0
  assert on.mean() == pytest.approx(c.p_active, rel=0.1)                  # the copula keeps the rate
  same_block = np.corrcoef(on[:, 0], on[:, 1])[0, 1]
  other_block = np.corrcoef(on[:, 0], on[:, 4])[0, 1]
  assert same_block > 0.2 and abs(other_block) < 0.05


def test_recovery_metric():
  true = np.eye(4, 8)
  learned = np.concatenate([np.eye(8)[:3], [np.ones(8) / np.sqrt(8)]])
  r = toy.recovery(true, learned)
  assert r["recovered"] == 0.75 and r["mean_max_cos"] == pytest.approx((3 + 1 / np.sqrt(8)) / 4)


def test_2023_and_2024_recover_true_features(tmp_path):
  cfg = toy_configs.get_config()
  assert cfg.mode == "toy"
  cfg.sae.saes = "128:0.01:2023,128:3:2024"
  cfg.toy.steps = 800
  lines = []
  results = toy.run_toy(cfg, str(tmp_path), lines.append)
  saved = json.loads((tmp_path / "toy_results.json").read_text())
  assert saved == results and any("recovered" in line for line in lines)
  by_recipe = {r["recipe"]: r for r in results["saes"]}
  for recipe in ("2023", "2024"):
    r = by_recipe[recipe]
    assert r["recovered"] >= 0.9, r
    assert r["mean_max_cos"] > 0.95 and r["l0"] < 3 * results["true_l0"], r
