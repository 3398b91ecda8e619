"""SAE metrics, all fp32 (docs/paper-notes.md §5.1, §3.6): batch reconstruction/sparsity metrics (jittable),
feature-density statistics, loss recovered, and the paper-style log10 density histogram.

Definitions are fixed here once (docs/references.md §1: other libraries shipped wrong FVU/MSE):
  mse   mean over rows AND dims of (x − x̂)²  (independent of batch size)
  fvu   Σ(x − x̂)² / Σ(x − mean_batch(x))²  (1 − explained variance); NaN for a constant batch
  l0    mean over rows of the number of features with f > 0
  l1    mean over rows of Σ_i |f_i|
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from monojax import files

F32 = jnp.float32


def batch_metrics(x, x_hat, f) -> dict:
  """x, x_hat [B, d]; f [B, m] (reported activations). Returns fp32 scalars {mse, fvu, l0, l1}."""
  x, x_hat, f = (jnp.asarray(a).astype(F32) for a in (x, x_hat, f))
  sq_err = jnp.square(x - x_hat)
  total_var = jnp.square(x - x.mean(0)).sum()
  return {
      "mse": sq_err.mean(),
      "fvu": jnp.where(total_var > 0, sq_err.sum() / jnp.where(total_var > 0, total_var, 1.0), jnp.nan),
      "l0": (f > 0).sum(-1).astype(F32).mean(),
      "l1": jnp.abs(f).sum(-1).mean(),
  }


def density_stats(fire_counts, n_tokens, ultralow: float = 1e-6, dense: float = 0.01) -> dict:
  """Feature-density counts from per-feature firing counts over `n_tokens` tokens.

  dead: fired on none of them (§5.1); ultralow: alive with density < `ultralow` (the paper's
  1e-6 cluster: detectable only when n_tokens > 1/ultralow, else such features read as dead);
  dense: density > `dense` (§3.6: many of these mean λ is too low); alive: fired at least once.
  Also the median density of alive features (NaN if none)."""
  counts = np.asarray(fire_counts, np.int64)
  n_tokens = int(n_tokens)
  if n_tokens <= 0:
    raise ValueError(f"density_stats: n_tokens must be positive, got {n_tokens}")
  density = (counts / n_tokens).astype(np.float32)
  alive = counts > 0
  return {
      "n_features": int(counts.size),
      "n_tokens": n_tokens,
      "dead": int((~alive).sum()),
      "alive": int(alive.sum()),
      "ultralow": int((alive & (density < np.float32(ultralow))).sum()),
      "dense": int((density > np.float32(dense)).sum()),
      "median_alive_density": float(np.median(density[alive])) if alive.any() else math.nan,
  }


def loss_recovered(l_clean, l_sae, l_zero):
  """Fraction of loss recovered, (L_zero − L_SAE) / (L_zero − L_clean) (§5.1): 1 = the SAE splice
  costs nothing, 0 = as bad as zero-ablating the MLP activations."""
  l_clean, l_sae, l_zero = (jnp.asarray(v, F32) for v in (l_clean, l_sae, l_zero))
  return (l_zero - l_sae) / (l_zero - l_clean)


def density_histogram(fire_counts, n_tokens, path_png, path_json, *, ultralow: float = 1e-6,
                      dense: float = 0.01, bins_per_decade: int = 5, title: str = "") -> dict:
  """Paper-style histogram of log10(feature density) (§5.1), dead features counted separately
  (log10 0 is undefined). Bins start at the decade holding 1/n_tokens (the lowest measurable
  density) and end at 10^0. Writes the data as JSON and the plot as PNG (matplotlib, Agg canvas);
  either path may be None to skip it. Returns the JSON data."""
  counts = np.asarray(fire_counts, np.int64)
  n_tokens = int(n_tokens)
  stats = density_stats(counts, n_tokens, ultralow, dense)
  alive = counts > 0
  log_density = np.log10(counts[alive] / n_tokens)
  lo = min(math.floor(math.log10(1.0 / n_tokens)), -1)
  edges = np.linspace(lo, 0.0, -lo * bins_per_decade + 1)
  hist, _ = np.histogram(log_density, bins=edges)
  data = {
      "n_tokens": n_tokens,
      "n_features": int(counts.size),
      "dead": stats["dead"],
      "ultralow": stats["ultralow"],
      "dense": stats["dense"],
      "ultralow_threshold": ultralow,
      "dense_threshold": dense,
      "log10_bin_edges": [round(float(e), 6) for e in edges],
      "counts": [int(c) for c in hist],
      "title": title,
  }
  if path_json:
    files.atomic_write_json(path_json, data, indent=1)
  if path_png:
    _plot(data, path_png)
  return data


def _plot(data: dict, path_png: str) -> None:
  # Figure + Agg canvas directly: no pyplot global state, safe from any thread.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  edges = np.asarray(data["log10_bin_edges"])
  fig = Figure(figsize=(6.4, 3.6), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.bar(edges[:-1], data["counts"], width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white",
         linewidth=0.4)
  ax.axvline(math.log10(data["ultralow_threshold"]), color="#c44e52", linestyle="--", linewidth=1,
             label=f"ultralow < {data['ultralow_threshold']:g} ({data['ultralow']})")
  ax.axvline(math.log10(data["dense_threshold"]), color="#dd8452", linestyle=":", linewidth=1,
             label=f"dense > {data['dense_threshold']:g} ({data['dense']})")
  ax.set_xlabel("log10(feature density)")
  ax.set_ylabel("features")
  ax.set_title(data["title"] or f"{data['n_features']} features, {data['n_tokens']:,} tokens; "
               f"dead (not shown): {data['dead']}", fontsize=9)
  ax.legend(fontsize=8, frameon=False)
  fig.tight_layout()
  with files.atomic_path(path_png, suffix=".png") as tmp:
    fig.savefig(tmp)

