"""Similarity between features, neurons and SAEs (paper-spec §6.6-§6.8): activation correlation
from streamed sums, best matches, the universality summary (median max-correlation, features vs
neurons: the paper's 0.72 vs 0.46), decoder-cosine neighbours, and feature families across SAEs
of several widths on one layer. Pure functions; correlations in float64 on the host, cosines in
fp32 on the device (chunked, Precision.HIGHEST).

Streaming Pearson. Over the same T tokens, with activations a [T, A] and b [T, B], accumulate
  n = T, sum_a = Σ a, sum_a2 = Σ a², sum_b, sum_b2, sum_ab = aᵀb [A, B]
batch by batch in FLOAT64 (`batch_sums` gives one batch's sums in fp32 on the device; add them into
float64 totals, `add_sums`), then `pearson_from_sums`. A variable that is constant over the n tokens
(a dead feature: all zero) has no correlation: its row/column is NaN, never 0, so a dead feature
is told apart from an uncorrelated one; `best_match` and `universality` skip NaN.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
SUM_KEYS = ("n", "sum_a", "sum_a2", "sum_b", "sum_b2", "sum_ab")


# ------------------------------------------------------------------------------ correlation

@jax.jit
def batch_sums(a, b) -> dict:
  """One batch's sums (fp32, on the device) of a [T, A] and b [T, B] (cast to fp32)."""
  a, b = a.astype(F32), b.astype(F32)
  return {"n": jnp.asarray(a.shape[0], F32), "sum_a": a.sum(0), "sum_a2": (a * a).sum(0), "sum_b": b.sum(0),
          "sum_b2": (b * b).sum(0), "sum_ab": jnp.matmul(a.T, b, precision=HIGHEST)}


def add_sums(total: dict | None, batch: dict) -> dict:
  """total + batch as float64 numpy (total None: start from batch)."""
  batch = {k: np.asarray(batch[k], np.float64) for k in SUM_KEYS}
  return batch if total is None else {k: total[k] + batch[k] for k in SUM_KEYS}


def transpose_sums(sums: dict) -> dict:
  """The sums of (b, a) from those of (a, b)."""
  return {"n": sums["n"], "sum_a": sums["sum_b"], "sum_a2": sums["sum_b2"], "sum_b": sums["sum_a"],
          "sum_b2": sums["sum_a2"], "sum_ab": np.asarray(sums["sum_ab"]).T}


def _var(n, s, s2, rtol):
  """n·Var (float64) and whether it is zero up to cancellation (a constant variable)."""
  v = s2 - s * s / n
  return v, v <= rtol * np.maximum(s2, np.finfo(np.float64).tiny)


def pearson_from_sums(n, sum_a, sum_a2, sum_b, sum_b2, sum_ab, *, rtol: float = 1e-6) -> np.ndarray:
  """Pearson correlation [A, B] (float64, clipped to [-1, 1]) from sums over n tokens. NaN in every
  row of a constant a-variable and every column of a constant b-variable: n·Var <= rtol·Σx² (an
  all-zero variable always; the default rtol is the precision of fp32 per-batch sums, below which
  Σx² − (Σx)²/n is rounding noise)."""
  n = float(n)
  if n < 2:
    raise ValueError(f"a correlation needs at least 2 tokens, got n={n}")
  sa, sb = np.asarray(sum_a, np.float64), np.asarray(sum_b, np.float64)
  va, dead_a = _var(n, sa, np.asarray(sum_a2, np.float64), rtol)
  vb, dead_b = _var(n, sb, np.asarray(sum_b2, np.float64), rtol)
  cov = np.asarray(sum_ab, np.float64) - np.outer(sa, sb) / n
  with np.errstate(invalid="ignore", divide="ignore"):
    corr = cov / np.sqrt(np.outer(np.where(dead_a, 1.0, va), np.where(dead_b, 1.0, vb)))
  corr = np.clip(corr, -1.0, 1.0)
  corr[dead_a, :] = np.nan
  corr[:, dead_b] = np.nan
  return corr


def corr_from_sums(sums: dict, **kw) -> np.ndarray:
  return pearson_from_sums(*(sums[k] for k in SUM_KEYS), **kw)


def best_match(corr) -> tuple[np.ndarray, np.ndarray]:
  """For each row of corr [A, B], the column with the largest value ignoring NaN: (index int64[A],
  value float64[A]); (-1, NaN) for a row with no finite value (a dead row, or all columns dead)."""
  ids, vals = top_k_rows(corr, 1)
  return ids[:, 0], vals[:, 0]


def top_k_rows(corr, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k largest finite values of each row (descending; ties by column): (ids int64[A, k], values
  float64[A, k]), padded with (-1, NaN) where a row has fewer than k finite values."""
  c = np.asarray(corr, np.float64)
  k = min(int(k), c.shape[1])
  key = np.where(np.isfinite(c), c, -np.inf)
  ids = np.argsort(-key, axis=1, kind="stable")[:, :k]
  vals = np.take_along_axis(c, ids, axis=1)
  bad = ~np.isfinite(np.take_along_axis(key, ids, axis=1))
  return np.where(bad, -1, ids), np.where(bad, np.nan, vals)


def _summary(corr, bins, hist_range):
  ids, best = best_match(corr)
  ok = np.isfinite(best)
  counts, edges = np.histogram(best[ok], bins=bins, range=hist_range)
  c = np.asarray(corr)
  return {"best_index": ids, "best_value": best,
          "median": float(np.median(best[ok])) if ok.any() else float("nan"),
          "mean": float(np.mean(best[ok])) if ok.any() else float("nan"),
          "counts": counts.astype(np.int64), "edges": edges,
          "n_used": int(ok.sum()), "n_excluded": int((~ok).sum()),
          "dead_rows": int(np.isnan(c).all(1).sum()) if c.shape[1] else int(c.shape[0]),
          "dead_columns": int(np.isnan(c).all(0).sum()) if c.shape[0] else int(c.shape[1])}


def universality(corr_features, corr_neurons, *, bins: int = 40, hist_range=(-1.0, 1.0)) -> dict:
  """The universality comparison (§6.7): for each row (feature of run A, neuron of model A) its
  max correlation over the columns (features of run B, neurons of model B).
  Returns {"features": S, "neurons": S} with S =
    best_index int64[rows] (-1: excluded), best_value float64[rows] (NaN: excluded),
    median, mean: float over the rows used (the paper: 0.72 features, 0.46 neurons),
    counts int64[bins], edges float64[bins + 1]: histogram of best_value over hist_range,
    n_used, n_excluded: rows with / without a finite best match (dead rows, rows against only dead columns),
    dead_rows, dead_columns: rows / columns that are NaN throughout (constant variables)."""
  return {"features": _summary(corr_features, bins, hist_range), "neurons": _summary(corr_neurons, bins, hist_range)}


# ------------------------------------------------------------------------------------- cosine

@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _cos_chunk(a, b_unit, offset, k, exclude_self):
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  cos = jnp.matmul(a, b_unit.T, precision=HIGHEST)
  if exclude_self:
    rows = offset + jnp.arange(a.shape[0])
    cos = jnp.where(rows[:, None] == jnp.arange(b_unit.shape[0])[None, :], -jnp.inf, cos)
  vals, ids = jax.lax.top_k(cos, k)
  return ids.astype(jnp.int32), vals


def decoder_cosine_neighbours(W_dec_a, W_dec_b, k: int = 3, *, chunk: int = 1024,
                              exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """For each row of W_dec_a [Fa, d], the k rows of W_dec_b [Fb, d] of largest cosine similarity:
  (ids int32[Fa, k], cos float32[Fa, k]), largest first. Rows need not be unit (a zero row has
  cosine 0 with everything). exclude_self (a and b the same SAE): a row is not its own neighbour.
  `chunk` rows of a at a time on the device (one program; the last chunk padded)."""
  a, b = jnp.asarray(W_dec_a, F32), jnp.asarray(W_dec_b, F32)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"decoders must be [Fa, d] and [Fb, d], got {a.shape} and {b.shape}")
  k = int(k)
  if not 0 < k <= b.shape[0] - int(exclude_self):
    raise ValueError(f"k={k} neighbours from {b.shape[0]} rows (exclude_self={exclude_self})")
  b_unit = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  n, chunk = a.shape[0], max(1, min(int(chunk), max(a.shape[0], 1)))
  ids, cos = [], []
  for start in range(0, n, chunk):
    block = a[start:start + chunk]
    rows = block.shape[0]
    if rows < chunk:
      block = jnp.pad(block, ((0, chunk - rows), (0, 0)))
    i, c = jax.device_get(_cos_chunk(block, b_unit, jnp.int32(start), k, bool(exclude_self)))
    ids.append(i[:rows])
    cos.append(c[:rows])
  if not ids:
    return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
  return np.concatenate(ids), np.concatenate(cos)


# ------------------------------------------------------------------------------------ families

def families(decoders: dict, *, k: int = 3, corr_sums: dict | None = None, chunk: int = 1024) -> dict:
  """Feature families across SAEs on one layer (feature splitting, §6.8).

  decoders: {name: W_dec [F_name, d]} (e.g. {"sae0": core.decoder_directions(state, sae0), ...});
  corr_sums: optional {(name_a, name_b): sums} (SUM_KEYS, accumulated over the same tokens with a
  = name_a's activations, b = name_b's); one direction of a pair is enough (the other is transposed).
  Returns {(name_a, name_b): table} for every ordered pair of distinct names, table a dict of arrays
  with one row per feature of name_a (its feature index = the row):
    "cos_ids" int32[F_a, k], "cos" float32[F_a, k]:   name_b's k features nearest by decoder cosine
    "corr_ids" int64[F_a, k], "corr" float64[F_a, k]: name_b's k features most correlated in activation
                                                       (only when the pair's sums were given; -1/NaN
                                                       pads rows of dead features)
  A database writer can store each table as rows (name_a, feature, name_b, rank, id, value)."""
  names = list(decoders)
  sums = dict(corr_sums or {})
  out = {}
  for na in names:
    for nb in names:
      if na == nb:
        continue
      kk = min(int(k), int(np.shape(decoders[nb])[0]))
      ids, cos = decoder_cosine_neighbours(decoders[na], decoders[nb], kk, chunk=chunk)
      table = {"cos_ids": ids, "cos": cos}
      pair = sums.get((na, nb))
      if pair is None and (nb, na) in sums:
        pair = transpose_sums(sums[(nb, na)])
      if pair is not None:
        table["corr_ids"], table["corr"] = top_k_rows(corr_from_sums(pair), kk)
      out[(na, nb)] = table
  return out
