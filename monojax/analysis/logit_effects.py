"""Logit weights ("logit effects") of SAE features and MLP neurons: the direct path from a unit of
activation to the next-token logits (paper-spec §6.3, Towards Monosemanticity footnotes 14-15):

  logit_weight_i = W_U · LN_approx · W_out · d_i,   then shifted so its median over the vocabulary is 0

Pure functions over arrays; fp32 maths (matmuls at Precision.HIGHEST, so no TF32 on GPU).

Directions (what one unit of activation writes into the MLP output space, [N, d_mlp]):
  * an SAE feature: its UNIT decoder row, `core.decoder_directions` (rows of the member's W_d
    [width, d_mlp], state["groups"][sae.group]["params"]["W_d"][sae.member]). `core.encode` reports
    activations a_i in the original input units (2023: f_i/c; 2024/topk: f_i·‖W_d,i‖/c, c the
    input_scale, 1 for unscaled SAEs) so that x̂ = Σ_i a_i·d̂_i + b_d/c in raw MLP units: the unit row
    is exactly the raw-unit direction per unit of REPORTED activation. The raw row W_d,i of a scaled
    SAE points the same way but is in scaled units (x̂ = dec(f)/c), so its magnitude would be off by
    ‖W_d,i‖/c; the unit row needs no correction.
  * a neuron: the one-hot in MLP space, i.e. its residual direction is the row W_out[n] (`neuron_directions`).
  Residual-stream direction: v = d @ W_out  [N, d_model] (`resid_directions`).

The final LayerNorm (LN_approx). LN(x) = γ·(x − mean(x))/σ(x) + β. A logit weight is a property of
the weights, not of a token, so (as the paper) the per-token normalisation 1/σ(x) is IGNORED (it
rescales every feature's effect on a token by the same positive factor), and so is the bias β
(independent of the feature). The mean removal IS applied (`center=True`, the default): it is a
fixed linear projection LN performs on every input, so a direction's component along (1,…,1)
never reaches the logits; then the diagonal γ (ln_final.w). Hence
  effect = ((v − mean_d(v)) ⊙ γ) @ W_U[:, :vocab_size]
in units of logit per unit activation per unit 1/σ. The model's vocabulary is padded: only the
tokenizer's vocab_size columns count (padding columns never enter a histogram, top-k or median).
Finally each feature's row is shifted by its median over those columns (softmax is shift-invariant).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from monojax.sae import core as sae_core
from monojax.sae import recipes

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------ directions

def lm_weights(model, layer: int) -> dict:
  """The arrays the logit path needs from an nnx Transformer (e.g. nnx.merge(run.graphdef,
  run.params)): {"W_out": [d_mlp, d_model] of block `layer`, "ln_gamma": [d_model] (ln_final.w),
  "W_U": [d_model, vocab_padded] (model.unembed_weight(): W_Eᵀ when tied)}, all fp32."""
  return {"W_out": jnp.asarray(model.blocks[layer].mlp.W_out[...], F32),
          "ln_gamma": jnp.asarray(model.ln_final.w[...], F32),
          "W_U": jnp.asarray(model.unembed_weight(), F32)}


def sae_directions(sae_state, sae) -> jax.Array:
  """[width, d_mlp] unit decoder rows of catalogue record `sae` (per unit of reported activation)."""
  return jnp.asarray(sae_core.decoder_directions(sae_state, sae), F32)


def resid_directions(mlp_directions, W_out) -> jax.Array:
  """[N, d_mlp] MLP-space directions -> [N, d_model] residual-stream directions (d @ W_out)."""
  return jnp.matmul(jnp.asarray(mlp_directions, F32), jnp.asarray(W_out, F32), precision=HIGHEST)


def neuron_directions(W_out) -> jax.Array:
  """[d_mlp, d_model]: neuron n's residual direction per unit of its post-ReLU activation (W_out[n])."""
  return jnp.asarray(W_out, F32)


def feature_resid_directions(sae_state, sae, W_out) -> jax.Array:
  """[width, d_model]: `sae`'s features' residual-stream directions (sae_directions @ W_out)."""
  return resid_directions(sae_directions(sae_state, sae), W_out)


# ------------------------------------------------------------------------------------ effects

def _raw_effects(dirs, ln_gamma, W_U, center: bool):
  """[n, d_model] -> [n, V] effects before the median shift (W_U already cut to the vocabulary)."""
  v = dirs.astype(F32)
  if center:
    v = v - v.mean(-1, keepdims=True)
  return jnp.matmul(v * ln_gamma.astype(F32), W_U.astype(F32), precision=HIGHEST)


def _median(eff):
  """Exact per-row median of [n, V] (np.median: the mean of the middle two when V is even), by
  bisection (recipes.kth_largest: 32 compare-and-count passes; XLA's CPU sort is ~25x slower)."""
  V = eff.shape[-1]
  upper = recipes.kth_largest(eff, (V + 1) // 2)[:, 0]
  return upper if V % 2 else 0.5 * (upper + recipes.kth_largest(eff, V // 2 + 1)[:, 0])


@functools.partial(jax.jit, static_argnames=("center",))
def _centred(dirs, ln_gamma, W_U, center):
  eff = _raw_effects(dirs, ln_gamma, W_U, center)
  return eff - _median(eff)[:, None]


@functools.partial(jax.jit, static_argnames=("k", "bins", "center"))
def _summary_chunk(dirs, ln_gamma, W_U, k, bins, center):
  eff = _raw_effects(dirs, ln_gamma, W_U, center)
  median = _median(eff)
  x = eff - median[:, None]
  top_values, top_ids = jax.lax.top_k(x, k)                       # ties: the lower token id first
  neg_bottom, bottom_ids = jax.lax.top_k(-x, k)
  lo, hi = x.min(-1), x.max(-1)
  # np.histogram's rule for an empty range: widen by ±0.5.
  lo, hi = jnp.where(hi > lo, lo, lo - 0.5), jnp.where(hi > lo, hi, hi + 0.5)
  frac = jnp.arange(bins + 1, dtype=F32) / bins
  edges = lo[:, None] + (hi - lo)[:, None] * frac[None, :]
  edges = edges.at[:, 0].set(lo).at[:, -1].set(hi)
  # np.histogram with explicit edges: bin i holds edges[i] <= x < edges[i+1], the last bin also x == hi.
  # The arithmetic bin, then numpy's one-bin correction against the edges themselves (as its uniform path).
  idx = jnp.clip(jnp.floor((x - lo[:, None]) / (hi - lo)[:, None] * bins).astype(jnp.int32), 0, bins - 1)
  idx = idx - (x < jnp.take_along_axis(edges, idx, 1)).astype(jnp.int32)
  idx = idx + ((x >= jnp.take_along_axis(edges, idx + 1, 1)) & (idx < bins - 1)).astype(jnp.int32)
  n = x.shape[0]
  counts = jnp.zeros((n * bins,), jnp.int32).at[(idx + bins * jnp.arange(n)[:, None]).ravel()].add(1)
  return {"top_ids": top_ids.astype(jnp.int32), "top_values": top_values,
          "bottom_ids": bottom_ids.astype(jnp.int32), "bottom_values": -neg_bottom,
          "hist_counts": counts.reshape(n, bins), "hist_edges": edges, "median": median}


def _prepared(directions_resid, ln_gamma, W_U, vocab_size):
  dirs = jnp.asarray(directions_resid, F32)
  W_U = jnp.asarray(W_U, F32)
  if dirs.ndim != 2 or dirs.shape[1] != W_U.shape[0]:
    raise ValueError(f"directions must be [N, {W_U.shape[0]}] (d_model), got {dirs.shape}")
  if not 0 < int(vocab_size) <= W_U.shape[1]:
    raise ValueError(f"vocab_size {vocab_size} must be in 1..{W_U.shape[1]} (W_U's columns)")
  return dirs, jnp.asarray(ln_gamma, F32), W_U[:, :int(vocab_size)]


def logit_weights(directions_resid, ln_gamma, W_U, vocab_size: int, *, center: bool = True) -> np.ndarray:
  """The full median-centred logit weights [N, vocab_size] (fp32, numpy). For few directions (a
  feature page, the logit-weight correlation of two features); `logit_effect_summary` for many."""
  dirs, gamma, W = _prepared(directions_resid, ln_gamma, W_U, vocab_size)
  return np.asarray(_centred(dirs, gamma, W, center))


def logit_effect_summary(directions_resid, ln_gamma, W_U, vocab_size: int, *, k: int = 10, bins: int = 40,
                         chunk: int = 256, center: bool = True) -> dict:
  """Per direction (row of directions_resid [N, d_model]; `feature_resid_directions` or
  `neuron_directions`) the summary of its median-centred logit weights over the real vocabulary
  (the first vocab_size columns of W_U [d_model, vocab_padded]), as numpy arrays:
    top_ids int32[N, k], top_values f32[N, k]        the k most promoted tokens, largest first
    bottom_ids int32[N, k], bottom_values f32[N, k]  the k most suppressed tokens, smallest first
    hist_counts int32[N, bins]                        np.histogram of the row over hist_edges (sums to vocab_size)
    hist_edges f32[N, bins + 1]                       evenly spaced from the row's min to its max
                                                      (min − 0.5 .. max + 0.5 for a constant row, as numpy)
    median f32[N]                                     the shift subtracted (median of the raw row)
  Values are the CENTRED effects. Ties in top/bottom: the lower token id first. Computed `chunk`
  rows at a time on the default device (one jit program; the last chunk is padded), so only
  [chunk, vocab] effects exist at once: 65k features × 50k tokens is fine (2 CPU cores: ~3 s per
  512 rows at d_model 128, vocab 50k)."""
  dirs, gamma, W = _prepared(directions_resid, ln_gamma, W_U, vocab_size)
  n, V = dirs.shape[0], W.shape[1]
  k, bins, chunk = int(k), int(bins), max(1, int(chunk))
  if not 0 < k <= V or bins < 1:
    raise ValueError(f"need 0 < k <= vocab_size ({V}) and bins >= 1, got k={k}, bins={bins}")
  chunk = min(chunk, max(n, 1))
  parts = []
  for start in range(0, n, chunk):
    block = dirs[start:start + chunk]
    rows = block.shape[0]
    if rows < chunk:  # one program shape for every chunk
      block = jnp.pad(block, ((0, chunk - rows), (0, 0)))
    out = jax.device_get(_summary_chunk(block, gamma, W, k, bins, center))
    parts.append({name: a[:rows] for name, a in out.items()})
  if not parts:
    empty = {"top_ids": (k, np.int32), "top_values": (k, np.float32), "bottom_ids": (k, np.int32),
             "bottom_values": (k, np.float32), "hist_counts": (bins, np.int32),
             "hist_edges": (bins + 1, np.float32)}
    out = {name: np.zeros((0, w), dt) for name, (w, dt) in empty.items()}
    return dict(out, median=np.zeros((0,), np.float32))
  return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
