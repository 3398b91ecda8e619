"""Toy models of superposition: synthetic activations built from known sparse features (more
features than dimensions), on which every SAE recipe can be trained and scored by how many of the
true features it recovers. A seconds-scale check of the SAE code path, no language model needed.

Data: x = Σ_i a_i v_i (+ offset + noise), v_i random unit vectors in R^d (n_features > d). Feature
i is on with probability p_active; firing can be correlated within blocks of features (Gaussian
copula: the marginal rate stays p_active); magnitudes are uniform, exponential or constant, times a
per-feature scale drawn log-uniformly in [scale_min, scale_max].

Recovery: a true feature counts as recovered when some decoder direction has cosine > threshold
with it (0.9); we also report the mean over true features of the best cosine.
"""
from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from monojax import errors, files
from monojax.sae import catalogue, core, metrics
from monojax.sae.config import sae_config

F32 = jnp.float32


def toy_config() -> config_dict.ConfigDict:
  """The `toy` config section; every field documented once, here."""
  t = config_dict.ConfigDict()
  t.n_features = 64                # true sparse features
  t.d = 32                         # activation dimension (< n_features: superposition)
  t.p_active = 0.05                # probability a feature is on in a sample (~3.2 active of 64)
  t.magnitude = "uniform"          # "uniform" U(0,1] | "exponential" (mean 1) | "constant" (1)
  t.scale_min = 1.0                # per-feature magnitude scale, log-uniform in [scale_min, scale_max]
  t.scale_max = 1.0
  t.corr = 0.0                     # firing correlation within a block of corr_block features (0 = independent)
  t.corr_block = 4
  t.offset_norm = 0.0              # norm of a constant offset added to every sample (what b_d must learn)
  t.noise_std = 0.0                # isotropic Gaussian noise added to every sample
  t.steps = 1000                   # SAE updates (the run length T that sae fractions refer to)
  t.eval_samples = 16384           # held-out samples for the final metrics and densities
  t.recovered_cos = 0.9            # cosine above which a true feature counts as recovered
  t.seed = 0                       # true features, data stream and SAE init
  return t


def toy_sae_config() -> config_dict.ConfigDict:
  """The `sae` section tuned for the toy: one SAE per recipe at 2x the true feature count, and
  learning rates raised for a 1,000-step run (the paper-scale defaults assume 1M steps). The λ are
  per recipe (2023 averages the squared error over dims, 2024 sums it over scaled inputs)."""
  s = sae_config()
  s.saes = "128:0.01:2023,128:3:2024,128:0:topk"
  s.normalize_inputs = False       # the 2023 SAE on the raw toy data, as the paper's recipe (its λ is tuned so)
  s.batch_size = 512
  s.lr = 2e-3
  s.lr_2024 = 2e-3
  s.lr_topk = 2e-3
  s.topk_k = 4
  s.aux_k = 32
  s.resample_inputs = 32768
  s.resample_at = (0.1, 0.2, 0.3, 0.4)
  s.dead_window = 0.05
  s.density_window = 0.1
  return s


class ToyFeatures(NamedTuple):
  """The ground truth: unit directions [n_features, d] and per-feature magnitude scales."""
  directions: jax.Array
  scales: jax.Array


def make_features(toy_cfg, key) -> ToyFeatures:
  if toy_cfg.n_features <= 0 or toy_cfg.d <= 0:
    raise errors.ConfigError("toy.n_features and toy.d must be positive")
  k_dir, k_scale = jax.random.split(key)
  v = jax.random.normal(k_dir, (toy_cfg.n_features, toy_cfg.d), F32)
  lo, hi = math.log(toy_cfg.scale_min), math.log(toy_cfg.scale_max)
  scales = jnp.exp(jax.random.uniform(k_scale, (toy_cfg.n_features,), F32, lo, hi))
  return ToyFeatures(v / jnp.linalg.norm(v, axis=1, keepdims=True), scales)


def sample(toy_cfg, features: ToyFeatures, key, n: int):
  """(x [n, d], true activations a [n, n_features]) for n fresh samples. Jittable."""
  if toy_cfg.magnitude not in ("uniform", "exponential", "constant"):
    raise errors.ConfigError(f"toy.magnitude must be uniform, exponential or constant, got {toy_cfg.magnitude!r}")
  n_feat = toy_cfg.n_features
  k_own, k_shared, k_mag, k_noise = jax.random.split(key, 4)
  if toy_cfg.corr > 0:
    # Gaussian copula: a latent shared by each block keeps the marginal rate and correlates firing.
    n_blocks = -(-n_feat // toy_cfg.corr_block)
    shared = jnp.repeat(jax.random.normal(k_shared, (n, n_blocks), F32), toy_cfg.corr_block, axis=1)[:, :n_feat]
    z = math.sqrt(toy_cfg.corr) * shared + math.sqrt(1.0 - toy_cfg.corr) * jax.random.normal(k_own, (n, n_feat), F32)
    on = z > jax.scipy.special.ndtri(1.0 - toy_cfg.p_active)
  else:
    on = jax.random.uniform(k_own, (n, n_feat), F32) < toy_cfg.p_active
  if toy_cfg.magnitude == "uniform":
    mag = 1.0 - jax.random.uniform(k_mag, (n, n_feat), F32)  # (0, 1]
  elif toy_cfg.magnitude == "exponential":
    mag = jax.random.exponential(k_mag, (n, n_feat), F32)
  else:
    mag = jnp.ones((n, n_feat), F32)
  a = jnp.where(on, mag * features.scales, 0.0)
  x = a @ features.directions
  if toy_cfg.offset_norm > 0:
    offset = jnp.ones((toy_cfg.d,), F32) * (toy_cfg.offset_norm / math.sqrt(toy_cfg.d))
    x = x + offset
  if toy_cfg.noise_std > 0:
    x = x + toy_cfg.noise_std * jax.random.normal(k_noise, x.shape, F32)
  return x, a


def recovery(true_directions, learned_directions, threshold: float = 0.9) -> dict:
  """Share of true features whose best-matching learned direction has cosine > threshold, and the
  mean best cosine (both unit-row inputs)."""
  cos = np.asarray(true_directions, np.float32) @ np.asarray(learned_directions, np.float32).T
  best = cos.max(axis=1)
  return {"recovered": float((best > threshold).mean()), "mean_max_cos": float(best.mean())}


def train_toy(cfg, log=None) -> dict:
  """Trains every SAE in cfg.sae.saes on fresh toy batches for cfg.toy.steps updates (2023 SAEs
  resampled at their resample steps) and scores them. Returns {"saes": [per-SAE results], ...}."""
  log = log or (lambda msg: None)
  t_cfg, s_cfg = cfg.toy, cfg.sae
  total = int(t_cfg.steps)
  key_feat, key_init, key_data, key_eval, key_res = jax.random.split(jax.random.key(t_cfg.seed), 5)
  features = make_features(t_cfg, key_feat)
  specs = core.parse_specs(s_cfg.saes)
  groups = tuple(core.make_groups(specs))
  init_x, _ = sample(t_cfg, features, jax.random.fold_in(key_init, 1), max(4096, s_cfg.batch_size))
  state = core.init_state(s_cfg, t_cfg.d, key_init, init_x, total)

  def train_step(state, step_key):
    x, _ = sample(t_cfg, features, step_key, s_cfg.batch_size)
    return core.update(s_cfg, groups, total, state, x, step_key)

  step_fn = jax.jit(train_step, donate_argnums=0)
  resample_fn = core.make_resample_fn(s_cfg, groups, total)
  resample_at = set(core.resample_steps(s_cfg, total))
  n_resample = min(int(s_cfg.resample_inputs), 65536)
  start = time.time()
  resampled = np.zeros(len(specs), np.int64)
  for step in range(1, total + 1):
    state, step_metrics = step_fn(state, jax.random.fold_in(key_data, step))
    if step in resample_at:
      xs, _ = sample(t_cfg, features, jax.random.fold_in(key_res, step), n_resample)
      state, info = resample_fn(state, xs, jax.random.fold_in(key_res, total + step))
      resampled += np.asarray(info["resampled"])
    if step == 1 or step % max(1, total // 5) == 0 or step == total:
      m = jax.device_get(step_metrics)
      log(f"toy step {step}/{total}: " + " | ".join(
          f"{s.recipe}/{s.width}: fvu {m['fvu'][i]:.3f} l0 {m['l0'][i]:.1f}" for i, s in enumerate(specs)))
  train_s = time.time() - start

  x_eval, a_eval = sample(t_cfg, features, key_eval, t_cfg.eval_samples)

  saes = catalogue.build(s_cfg, t_cfg.d)

  @jax.jit
  def evaluate(state, x):  # every SAE in one program
    out = []
    for sae in saes:
      f = core.encode(state, sae, x)
      out.append((metrics.batch_metrics(x, core.reconstruct(state, sae, x), f), (f > 0).sum(0),
                  core.decoder_directions(state, sae)))
    return out

  results = []
  for i, (spec, (batch, fire_counts, directions)) in enumerate(zip(specs, jax.device_get(evaluate(state, x_eval)))):
    dens = metrics.density_stats(fire_counts, t_cfg.eval_samples, s_cfg.ultralow_density, s_cfg.dense_density)
    rec = recovery(features.directions, directions, t_cfg.recovered_cos)
    results.append({"index": i, "recipe": spec.recipe, "width": spec.width, "l1_coef": spec.l1, **rec,
                    **{k: float(v) for k, v in batch.items()}, "dead": dens["dead"], "dense": dens["dense"],
                    "resampled": int(resampled[i])})
  true_l0 = float((np.asarray(a_eval) > 0).sum(1).mean())
  return {"saes": results, "steps": total, "train_seconds": train_s, "true_l0": true_l0,
          "n_features": t_cfg.n_features, "d": t_cfg.d}


def run_toy(cfg, workdir: str, log=print) -> dict:
  """Entry for `mode == "toy"`: trains, writes <workdir>/toy_results.json, logs a summary."""
  results = train_toy(cfg, log=log)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "toy_results.json")
  files.atomic_write_json(path, results, indent=1)
  log(f"toy: {results['n_features']} true features in {results['d']} dims (true L0 {results['true_l0']:.2f}), "
      f"{results['steps']} steps in {results['train_seconds']:.1f} s")
  for r in results["saes"]:
    log(f"toy: SAE {r['index']} ({r['recipe']}, width {r['width']}, l1 {r['l1_coef']:g}): recovered "
        f"{r['recovered']:.1%} of true features, mean max cos {r['mean_max_cos']:.3f}, fvu {r['fvu']:.3f}, "
        f"l0 {r['l0']:.2f}, dead {r['dead']}, resampled {r['resampled']}")
  log(f"toy: results in {path}")
  return results
