"""Streaming per-feature statistics of one *unit* (an SAE's features, or the MLP's neurons) over
batches of tokens, merged on device. Pure functions: `init(spec)` → accumulator (a dict of arrays),
`update(spec, acc, f, ...)` → accumulator, jitted by the caller.

Two kinds of state:
- additive sums (firing counts, Σf, Σf², the 40-bin log10 histogram, Σ f·neuron, Σ f·proxy, ...):
  summed on device in fp32/int32 for a few batches, then `flush`ed into float64 host totals, so
  precision does not depend on the number of tokens;
- order statistics kept on device for the whole pass: the max, the top-k and bottom-k activations
  and a stratified sample of firings (for the paper's subsample intervals), each with where it
  happened (sequence, position) and the feature's activation on a window of tokens around it.

Sampling for intervals: the maximum is not known until the end, so firings are sampled per
(feature, histogram bin) — bins fixed in log10 space — keeping per bin the `samples` firings with
the highest hash of (token index, feature); each batch offers at most one firing per (feature, bin)
(the one with the highest hash in that batch). At the end the paper's intervals of [0, max] take
their examples from these samples. Deterministic: a resumed pass equals an uninterrupted one.

Top-k uses blocks of tokens: the k largest values lie in the k blocks with the largest block
maxima, so a top-k over N/8 block maxima plus one over 8k candidates replaces a top-k over N.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

HIST_BINS = 40
HIST_LOG10 = (-5.0, 3.0)   # bin edges: 10^-5 … 10^3, 0.2 decades a bin; values outside go to the end bins
LEFT, RIGHT = 24, 8        # window: 24 tokens before the firing token, 8 after (the paper showed 4 and 4)
WINDOW = LEFT + 1 + RIGHT

ADDITIVE = ("fired", "sum", "sum_sq", "hist", "neuron_sum", "proxy_sum", "proxy_fired")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static shape of one unit's statistics (hashable: a jit static argument)."""
  width: int               # features (or neurons)
  n_proxies: int = 0       # proxy labels per token (0: none)
  d_neurons: int = 0       # Σ f·x against this many neurons (0: none; the neurons' own unit)
  top_k: int = 20
  bottom_k: int = 20
  samples: int = 4         # kept firings per (feature, histogram bin)


def hist_edges() -> np.ndarray:
  """The 41 edges (activation values) of the log10 histogram; the first and last bin also hold
  everything below/above."""
  return 10.0 ** np.linspace(*HIST_LOG10, HIST_BINS + 1)


def hist_bin(f):
  """Bin index (int32) of positive activations f."""
  lo, hi = HIST_LOG10
  b = jnp.floor((jnp.log10(jnp.maximum(f, 1e-30)) - lo) * (HIST_BINS / (hi - lo)))
  return jnp.clip(b, 0, HIST_BINS - 1).astype(jnp.int32)


def init(spec: Spec) -> dict:
  F, W = spec.width, WINDOW
  z = lambda shape, dt=jnp.float32: jnp.zeros(shape, dt)
  acc = {
      "fired": z((F,), jnp.int32), "sum": z((F,)), "sum_sq": z((F,)), "hist": z((F, HIST_BINS), jnp.int32),
      "max": z((F,)),
      "top_val": jnp.full((F, spec.top_k), -jnp.inf), "top_seq": z((F, spec.top_k), jnp.int32),
      "top_pos": z((F, spec.top_k), jnp.int32), "top_win": z((F, spec.top_k, W)),
      "bot_val": jnp.full((F, spec.bottom_k), -jnp.inf),  # stores −f: the largest −f is the smallest f
      "bot_seq": z((F, spec.bottom_k), jnp.int32), "bot_pos": z((F, spec.bottom_k), jnp.int32),
      "bot_win": z((F, spec.bottom_k, W)),
      "smp_key": jnp.full((F, HIST_BINS, spec.samples), -1, jnp.int32),
      "smp_val": z((F, HIST_BINS, spec.samples)), "smp_seq": z((F, HIST_BINS, spec.samples), jnp.int32),
      "smp_pos": z((F, HIST_BINS, spec.samples), jnp.int32), "smp_win": z((F, HIST_BINS, spec.samples, W)),
  }
  if spec.d_neurons:
    acc["neuron_sum"] = z((F, spec.d_neurons))
  if spec.n_proxies:
    acc["proxy_sum"] = z((spec.n_proxies, F))
    acc["proxy_fired"] = z((spec.n_proxies, F))
  return acc


def zero_additive(acc: dict) -> dict:
  return {k: (jnp.zeros_like(v) if k in ADDITIVE else v) for k, v in acc.items()}


def _hash(x):
  """murmur3's 32-bit finaliser: a well-mixed uint32 of a uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def sample_priority(token_index, feature):
  """The hash priority (int32 ≥ 0, 31 bits) of a firing: a pure function of (global token index,
  feature), so which firings are kept does not depend on batching across resumes."""
  h = _hash(token_index.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + _hash(feature.astype(jnp.uint32) + jnp.uint32(1)))
  return (h >> 1).astype(jnp.int32)


def _windows(f3p, b, t, feat):
  """f3p [B, LEFT+T+RIGHT, F] (NaN-padded) → the feature's activations on the window around (b, t)."""
  return f3p[b[..., None], t[..., None] + jnp.arange(WINDOW), feat[..., None]]


def _block_topk(g, k: int, block: int):
  """Top-k over axis 0 of g [N, F] per column: (values [F, k], rows [F, k]); exact (see module doc)."""
  N, F = g.shape
  if block > 1 and N % block == 0 and N // block >= k:
    bmax = g.reshape(N // block, block, F).max(1).T        # [F, N/block]
    _, bidx = jax.lax.top_k(bmax, k)                       # [F, k]
    cand = (bidx[:, :, None] * block + jnp.arange(block)).reshape(F, k * block)
    vals = g[cand, jnp.arange(F)[:, None]]
    v, i = jax.lax.top_k(vals, k)
    return v, jnp.take_along_axis(cand, i, 1)
  kk = min(k, N)
  v, i = jax.lax.top_k(g.T, kk)
  if kk < k:
    v = jnp.pad(v, ((0, 0), (0, k - kk)), constant_values=-jnp.inf)
    i = jnp.pad(i, ((0, 0), (0, k - kk)))
  return v, i


def _merge_topk(old: tuple, new: tuple, k: int):
  """Keeps the k largest of (values, *payload) along axis 1; old entries win ties (stable)."""
  vals = jnp.concatenate([old[0], new[0]], 1)
  v, order = jax.lax.top_k(vals, k)
  out = [v]
  for a, b in zip(old[1:], new[1:]):
    both = jnp.concatenate([a, b], 1)
    idx = order.reshape(order.shape + (1,) * (both.ndim - 2))
    out.append(jnp.take_along_axis(both, idx, 1))
  return out


def update(spec: Spec, acc: dict, f, seq0, *, neurons=None, proxies=None, valid=None) -> dict:
  """One batch. f [B, T, F] fp32 activations (≥ 0); seq0: global index of the batch's first
  sequence (int32 scalar); neurons [B, T, d_neurons] for Σ f·x; proxies [P, B, T] labels;
  valid [B] bool (padding sequences of a last partial batch count for nothing)."""
  B, T, F = f.shape
  N = B * T
  if valid is not None:
    f = jnp.where(valid[:, None, None], f, 0.0)
  flat = f.reshape(N, F)
  pos = f > 0
  acc = dict(acc)
  acc["fired"] = acc["fired"] + jnp.sum(pos, axis=(0, 1), dtype=jnp.int32)
  acc["sum"] = acc["sum"] + jnp.sum(flat, 0)
  acc["sum_sq"] = acc["sum_sq"] + jnp.sum(flat * flat, 0)
  acc["max"] = jnp.maximum(acc["max"], jnp.max(flat, 0))
  bins = hist_bin(flat)                                         # [N, F]
  feat = jnp.broadcast_to(jnp.arange(F, dtype=jnp.int32), (N, F))
  cell = (feat * HIST_BINS + bins).ravel()
  acc["hist"] = acc["hist"] + jnp.zeros((F * HIST_BINS,), jnp.int32).at[cell].add(
      pos.reshape(-1).astype(jnp.int32), mode="drop").reshape(F, HIST_BINS)
  if spec.d_neurons:
    acc["neuron_sum"] = acc["neuron_sum"] + jnp.einsum("nf,nd->fd", flat, neurons.reshape(N, -1).astype(jnp.float32))
  if spec.n_proxies:
    lab = proxies.reshape(spec.n_proxies, N).astype(jnp.float32)
    acc["proxy_sum"] = acc["proxy_sum"] + lab @ flat
    acc["proxy_fired"] = acc["proxy_fired"] + lab @ pos.reshape(N, F).astype(jnp.float32)

  f3p = jnp.pad(f, ((0, 0), (LEFT, RIGHT), (0, 0)), constant_values=jnp.nan)
  seq0 = jnp.asarray(seq0, jnp.int32)
  rows = jnp.arange(F)

  def located(n):
    b, t = n // T, n % T
    return b + seq0, t, _windows(f3p, b, t, rows[:, None] if n.ndim == 2 else rows[:, None, None])

  # Top-k (only firings: zeros never count).
  v, n = _block_topk(jnp.where(flat > 0, flat, -jnp.inf), spec.top_k, 8)
  s, t, w = located(n)
  acc["top_val"], acc["top_seq"], acc["top_pos"], acc["top_win"] = _merge_topk(
      (acc["top_val"], acc["top_seq"], acc["top_pos"], acc["top_win"]), (v, s, t, w), spec.top_k)
  # Bottom-k: the smallest positive activations.
  v, n = _block_topk(jnp.where(flat > 0, -flat, -jnp.inf), spec.bottom_k, 8)
  s, t, w = located(n)
  acc["bot_val"], acc["bot_seq"], acc["bot_pos"], acc["bot_win"] = _merge_topk(
      (acc["bot_val"], acc["bot_seq"], acc["bot_pos"], acc["bot_win"]), (v, s, t, w), spec.bottom_k)

  # Stratified sample: per (feature, bin) this batch's firing of highest priority.
  bits = max(1, int(np.ceil(np.log2(N))))
  gidx = (seq0 + jnp.arange(B, dtype=jnp.int32))[:, None] * T + jnp.arange(T, dtype=jnp.int32)
  prio = sample_priority(gidx.reshape(N, 1), feat)              # [N, F], 31 bits
  comp = jnp.where(pos.reshape(N, F), ((prio >> bits) << bits) | jnp.arange(N, dtype=jnp.int32)[:, None], -1)
  best = jnp.full((F * HIST_BINS,), -1, jnp.int32).at[cell].max(comp.ravel(), mode="drop").reshape(F, HIST_BINS)
  ok = best >= 0
  n = jnp.where(ok, best & ((1 << bits) - 1), 0)
  s, t, w = located(n)
  key = jnp.where(ok, best >> bits, -1)   # the priority's high bits: comparable across batches
  val = flat[n, rows[:, None]]
  merged = _merge_topk(
      tuple(x.reshape(F * HIST_BINS, spec.samples, *x.shape[3:]) for x in
            (acc["smp_key"], acc["smp_val"], acc["smp_seq"], acc["smp_pos"], acc["smp_win"])),
      tuple(x.reshape(F * HIST_BINS, 1, *x.shape[2:]) for x in (key, val, s, t, w)), spec.samples)
  for name, x in zip(("smp_key", "smp_val", "smp_seq", "smp_pos", "smp_win"), merged):
    acc[name] = x.reshape((F, HIST_BINS) + x.shape[1:])
  return acc
