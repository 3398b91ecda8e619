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
from monojax.train import cotrain

TOP_K = 3          # contexts shown per feature
N_FEATURES = 6     # features shown, spread across the density range
LEFT, RIGHT = 10, 3  # tokens of context either side of the firing token


def _batch_stats(sae, k: int):
  """jit: (SAE state, activations [N, d]) -> (firing counts [m], top-k values [m, k], their rows
  [m, k]), the features computed one chunk of rows at a time (cotrain.EVAL_CHUNK_ELEMENTS), so
  memory is bounded like the training step's whatever the batch."""
  @jax.jit
  def stats(sae_state, x):
    rows = max(k, cotrain.chunk_rows(x.shape[0], sae.width))
    xp, valid = cotrain.padded_chunks(x, rows)

    def body(carry, inp):
      counts, vals, idx = carry
      c, xc, vc = inp
      f = jnp.where(vc[:, None], sae_core.encode(sae_state, sae, xc), -jnp.inf)  # padding rows never win
      v, i = jax.lax.top_k(f.T, k)
      both_v, both_i = jnp.concatenate([vals, v], 1), jnp.concatenate([idx, i + c * rows], 1)
      best_v, order = jax.lax.top_k(both_v, k)
      return (counts + jnp.sum(f > 0, axis=0, dtype=jnp.int32), best_v,
              jnp.take_along_axis(both_i, order, 1)), None

    init = (jnp.zeros((sae.width,), jnp.int32), jnp.full((sae.width, k), -jnp.inf), jnp.zeros((sae.width, k), jnp.int32))
    (counts, vals, idx), _ = jax.lax.scan(body, init, (jnp.arange(xp.shape[0]), xp, valid))
    return counts, vals, idx
  return stats


def top_activations(run, sae, batches, k: int = TOP_K):
  """Scans held-out batches: per-feature firing counts, and the k largest activations with the
  (flat) token index where each happened. Returns (counts[m], top_vals[m,k], top_idx[m,k], tokens[N, T+1])."""
  counts, top_vals, top_idx, all_tokens = None, None, None, []
  offset = 0
  stats = _batch_stats(sae, k)
  for batch in batches:
    tokens = np.asarray(jax.device_get(batch["tokens"]))
    x = run.mlp_acts(batch["tokens"][:, :-1], sae.layer)
    c, v, i = jax.device_get(stats(run.sae_state, x.reshape(-1, x.shape[-1])))
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
