"""What a newcomer sees at the end of a co-training run, before any inspector exists: the density
histogram of every SAE (PNG + JSON) and, for the first SAE, a handful of live features sampled
across densities with the held-out tokens (in context) where each fires most. Reads the run as
saved (monojax/run.py), like every verb after training."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from monojax import files, text
from monojax.sae import core as sae_core, metrics as sae_metrics

TOP_K = 3          # contexts shown per feature
N_FEATURES = 6     # features shown, spread across the density range
LEFT, RIGHT = 10, 3  # tokens of context either side of the firing token


def top_activations(run, sae, batches, k: int = TOP_K):
  """Scans held-out batches: per-feature firing counts, and the k largest activations with the
  (flat) token index where each happened. Returns (counts[m], top_vals[m,k], top_idx[m,k], tokens[N, T+1])."""
  counts, top_vals, top_idx, all_tokens = None, None, None, []
  offset = 0

  @jax.jit
  def stats(f):
    f = f.reshape(-1, f.shape[-1])
    vals, idx = jax.lax.top_k(f.T, k)
    return jnp.sum(f > 0, axis=0, dtype=jnp.int32), vals, idx

  for batch in batches:
    tokens = np.asarray(jax.device_get(batch["tokens"]))
    c, v, i = jax.device_get(stats(run.features(batch["tokens"][:, :-1], sae)))
    i = i + offset
    offset += tokens.shape[0] * (tokens.shape[1] - 1)
    all_tokens.append(tokens)
    if counts is None:
      counts, top_vals, top_idx = c.astype(np.int64), v, i
    else:
      counts += c
      vals = np.concatenate([top_vals, v], 1)
      idx = np.concatenate([top_idx, i], 1)
      order = np.argsort(-vals, axis=1)[:, :k]
      top_vals, top_idx = np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)
  return counts, top_vals, top_idx, np.concatenate(all_tokens)


def pick_features(counts, n: int = N_FEATURES) -> list[int]:
  """n live features at evenly spaced quantiles of log density (rarest to densest)."""
  live = np.flatnonzero(counts > 0)
  if live.size == 0:
    return []
  order = live[np.argsort(counts[live], kind="stable")]
  picks = np.unique(np.round(np.linspace(0, order.size - 1, min(n, order.size))).astype(int))
  return [int(order[p]) for p in picks]


def context(tokenizer, tokens, flat_index: int) -> str:
  """The decoded tokens around one position, the firing token between « and », as visible text
  (text.visible: newlines as ⏎, control and bidi characters as escapes). Corpus text: whoever
  writes it for a reader still quotes it for the medium (text.markdown_code, text.html)."""
  T = tokens.shape[1] - 1
  row, pos = divmod(int(flat_index), T)
  ids = tokens[row, :T]
  left = tokenizer.decode(ids[max(0, pos - LEFT):pos])
  here = tokenizer.decode(ids[pos:pos + 1])
  right = tokenizer.decode(ids[pos + 1:pos + 1 + RIGHT])
  return text.visible(left + "«" + here + "»" + right)


def preview_lines(sae, counts, vals, idx, tokens, tokenizer, plots: str) -> list[str]:
  """preview.md's lines: a header, then for each picked feature a line of its numbers and a list of
  its top contexts, each an inline code span (no HTML, link or emphasis can come from corpus text)."""
  n_tok = tokens.shape[0] * (tokens.shape[1] - 1)
  lines = [text.visible(f"# Feature preview: {sae.name} [{sae.label}]"), "",
           f"{int((counts > 0).sum()):,} of {counts.size:,} features fire on {n_tok:,} held-out tokens. "
           f"{N_FEATURES} live features from rarest to densest; «» marks the token where the feature fires, "
           f"with its activation. Density histograms: " + text.markdown_code(f"{plots}/sae<i>_density.png"), ""]
  for f in pick_features(counts):
    lines.append(f"feature {f}: density {counts[f] / n_tok:.2e} ({counts[f]} of {n_tok:,} tokens), "
                 f"max activation {vals[f, 0]:.3g}")
    lines.append("")
    for v, j in zip(vals[f], idx[f]):
      if v > 0:
        lines.append(f"- {v:.3f} " + text.markdown_code(context(tokenizer, tokens, j)))
    lines.append("")
  return lines


def finish(run, log) -> str:
  """Writes plots/sae<i>_density.{png,json} and preview.md into the run's workdir; logs the preview.
  Returns its text."""
  cfg, workdir = run.cfg, run.workdir
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  for sae in run.saes:
    fires, n_tok = sae_core.density(run.sae_state, sae)
    fires = np.asarray(jax.device_get(fires))
    if n_tok > 0:
      sae_metrics.density_histogram(fires, n_tok, os.path.join(plots, f"{sae.name}_density.png"),
                                    os.path.join(plots, f"{sae.name}_density.json"), ultralow=cfg.sae.ultralow_density,
                                    dense=cfg.sae.dense_density, title=f"{sae.name} [{sae.label}], {n_tok:,} training tokens")
  sae = run.saes[0]
  counts, vals, idx, tokens = top_activations(run, sae, run.held_out_batches(cfg.train.eval_batches))
  out = "\n".join(preview_lines(sae, counts, vals, idx, tokens, run.tokenizer, plots)).rstrip("\n") + "\n"
  path = os.path.join(workdir, "preview.md")
  files.atomic_write(path, out)
  log(text.console(out + f"(written to {path})"))
  return out
