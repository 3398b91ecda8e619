"""2023 dead-feature resampling (docs/paper-notes.md §3.5), for one stacked group. Entry point for the loop:
`core.maybe_resample` (when: `core.resample_steps`).

Choices where the paper is ambiguous (docs/paper-notes.md §10 item 5):
  * "loss" per input = reconstruction MSE only (mean over dims of (x − x̂)²), not MSE + λ·L1: the
    aim is to seed features on the inputs the SAE reconstructs worst, and the L1 term would favour
    inputs that are merely dense.
  * The new dictionary vector is the RAW input, unit-normalised (as ai-safety-foundation's
    implementation), not x − b_d.
  * Inputs are drawn ∝ loss² WITHOUT replacement (Gumbel top-k, like torch.multinomial
    replacement=False), so two dead features never get the same seed; with fewer inputs than
    features it falls back to drawing with replacement. All-zero inputs are never drawn.
  * With no alive feature left, the "mean alive encoder norm" is taken as 1.
  * A resampled feature's last_fired is set to the current step (it starts a fresh dead window).
Everything else, including Adam's step count, b_d and its moments, is untouched.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


F32 = jnp.float32
LOSS_CHUNK_ELEMENTS = 2**26  # bound on rows x m x S pre-activations alive at once while scoring (256 MB fp32)


def per_input_loss(recipe, params, xs):
  """Reconstruction MSE of every input for every member: xs [N, d] -> [N, S], in chunks."""
  def one_input(x_row):
    def member(p):
      _, _, x_hat = recipe.forward(p, x_row[None], 0)
      return jnp.square(x_row - x_hat[0]).mean()
    return jax.vmap(member)(params)
  n_members, width = params["b_e"].shape
  rows = max(1, min(4096, LOSS_CHUNK_ELEMENTS // (width * n_members), xs.shape[0]))
  return jax.lax.map(one_input, xs, batch_size=rows)


def draw_inputs(key, weights, n_draws: int):
  """n_draws input indices drawn ∝ weights [N] (≥ 0), without replacement when N ≥ n_draws
  (the top n_draws of log w + Gumbel noise are such a draw, in draw order)."""
  usable = weights > 0
  # A perfect reconstruction leaves no weight: fall back to uniform over the usable inputs.
  weights = jnp.where(usable.any(), weights, 1.0)
  log_w = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
  n = weights.shape[0]
  if n >= n_draws:
    return jax.lax.top_k(log_w + jax.random.gumbel(key, (n,), F32), n_draws)[1]
  return jax.random.categorical(key, log_w, shape=(n_draws,))


def _resample_member(cfg, params, mu, nu, dead, losses, xs, key):
  """One SAE: dead bool[m]; losses [N]. Returns (params, mu, nu) with only dead entries replaced."""
  width = dead.shape[0]
  norms = jnp.linalg.norm(xs, axis=1)
  chosen = draw_inputs(key, jnp.where(norms > 0, jnp.square(losses), 0.0), width)
  # The r-th dead feature (in index order) takes the r-th draw.
  rank = jnp.clip(jnp.cumsum(dead) - 1, 0, width - 1)
  picked = chosen[rank]
  unit = xs[picked] / jnp.maximum(norms[picked], 1e-12)[:, None]                  # [m, d]
  enc_norms = jnp.linalg.norm(params["W_e"], axis=0)                              # [m]
  n_alive = (~dead).sum()
  mean_alive = jnp.where(n_alive > 0, jnp.where(dead, 0.0, enc_norms).sum() / jnp.maximum(n_alive, 1), 1.0)
  col, row = dead[None, :], dead[:, None]  # W_e [d, m] columns and W_d [m, d] rows of dead features
  new_params = dict(
      params,
      W_d=jnp.where(row, unit, params["W_d"]),
      W_e=jnp.where(col, unit.T * (cfg.resample_encoder_scale * mean_alive), params["W_e"]),
      b_e=jnp.where(dead, 0.0, params["b_e"]))

  def reset(moments):
    return dict(moments, W_d=jnp.where(row, 0.0, moments["W_d"]), W_e=jnp.where(col, 0.0, moments["W_e"]),
                b_e=jnp.where(dead, 0.0, moments["b_e"]))

  return new_params, reset(mu), reset(nu)


def resample_group(recipe, cfg, group_state, dead, xs, step, key):
  """Resamples a stacked group's dead features (dead bool[S, m]) from the loss sample xs [N, d], in
  the units the group trains on (scaled when the recipe scales). Returns (group_state, n_resampled
  int32[S])."""
  params, opt = group_state["params"], group_state["opt"]
  adam = opt[-1]  # Recipe.optimizer is always a chain ending in scale_by_adam
  losses = per_input_loss(recipe, params, xs).T                                    # [S, N]
  keys = jax.random.split(key, dead.shape[0])
  member = lambda p, m, v, d, loss, k: _resample_member(cfg, p, m, v, d, loss, xs, k)  # noqa: E731
  new_params, mu, nu = jax.vmap(member)(params, adam.mu, adam.nu, dead, losses, keys)
  new_group = dict(group_state, params=new_params, opt=(*opt[:-1], adam._replace(mu=mu, nu=nu)),
                   last_fired=jnp.where(dead, step, group_state["last_fired"]))
  return new_group, dead.sum(-1, dtype=jnp.int32)
