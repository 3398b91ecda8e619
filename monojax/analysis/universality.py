"""Universality (Towards Monosemanticity §6.7): two runs (seeds A and B) on the same held-out
tokens; each A feature matched to its most activation-correlated B feature, each A neuron to its
most correlated B neuron. The paper's medians: 0.72 (features) vs 0.46 (neurons).

  python -m monojax.analyze --compare RUN_A RUN_B [--tokens=N] [--saes=sae0]

Writes RUN_A/universality/: summary.json (medians, histograms, what was excluded), matches.npz
(per A feature and neuron: best B index and correlation) and hist.png.
"""
from __future__ import annotations

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from monojax import errors, files
from monojax.analysis import similarity
from monojax.sae import core as sae_core

DIRNAME = "universality"
FLUSH_EVERY = 16


def _tokenizer_digest(run) -> str:
  return hashlib.sha1(run.tokenizer.hf.to_str().encode()).hexdigest()


def _check_pair(a, b, sae_a, sae_b) -> None:
  if _tokenizer_digest(a) != _tokenizer_digest(b):
    raise errors.UserInputError(f"--compare: {a.workdir} and {b.workdir} use different tokenizers; universality "
                                "needs the same tokens through both models")
  if b.cfg.data.seq_len < a.cfg.data.seq_len and b.cfg.model.positional == "learned":
    raise errors.UserInputError(f"--compare: {b.workdir} has a context of {b.cfg.data.seq_len} tokens, shorter than "
                                f"{a.workdir}'s {a.cfg.data.seq_len}")
  if sae_a.layer != sae_b.layer:
    raise errors.UserInputError(f"--compare: {sae_a.name} reads layer {sae_a.layer}, {sae_b.name} layer {sae_b.layer}")


def _sums_fn(a, b, sae_a, sae_b):
  fa, fb = a._mlp_acts_fn(sae_a.layer), b._mlp_acts_fn(sae_b.layer)

  def sums(pa, sa, pb, sb, tokens, acc):
    xa, xb = fa(pa, tokens), fb(pb, tokens)
    xa, xb = xa.reshape(-1, xa.shape[-1]), xb.reshape(-1, xb.shape[-1])
    ya, yb = sae_core.encode(sa, sae_a, xa), sae_core.encode(sb, sae_b, xb)
    nf, nn = similarity.batch_sums(ya, yb), similarity.batch_sums(xa, xb)
    return {"features": {k: acc["features"][k] + nf[k] for k in nf},
            "neurons": {k: acc["neurons"][k] + nn[k] for k in nn}}
  return jax.jit(sums, donate_argnums=(5,))


def _zeros(wa, wb):
  return {"n": jnp.zeros((), jnp.float32), "sum_a": jnp.zeros((wa,)), "sum_a2": jnp.zeros((wa,)),
          "sum_b": jnp.zeros((wb,)), "sum_b2": jnp.zeros((wb,)), "sum_ab": jnp.zeros((wa, wb))}


def run_compare(a, b, opts, *, log=print) -> str:
  """Accumulates the correlation sums of A's and B's features and neurons over opts.tokens tokens
  of A's held-out split and writes RUN_A/universality/. Returns that folder."""
  from monojax.corpus import build_corpus
  from monojax.data import pipeline
  names = opts.saes or (0,)
  sae_a, sae_b = a.sae(names[0]), b.sae(names[-1])
  _check_pair(a, b, sae_a, sae_b)
  seq_len = a.cfg.data.seq_len
  per_batch = opts.batch_size * seq_len
  n_batches = max(1, -(-int(opts.tokens) // per_batch))
  step = _sums_fn(a, b, sae_a, sae_b)
  fresh = lambda: {"features": _zeros(sae_a.width, sae_b.width),  # noqa: E731
                   "neurons": _zeros(a.cfg.model.d_mlp, b.cfg.model.d_mlp)}
  acc, totals = fresh(), {"features": None, "neurons": None}
  root = build_corpus.ensure_data_root(a.cfg.data, log=log)
  batches = pipeline.analysis_batches(a.cfg, a.tokenizer, root, a.mesh, batch_size=opts.batch_size,
                                      n_batches=n_batches, split=opts.split)
  t0 = last = time.perf_counter()
  done = 0
  for batch in batches:
    acc = step(a.params, a.sae_state, b.params, b.sae_state, batch["tokens"][:, :-1], acc)
    done += 1
    if done % FLUSH_EVERY == 0 or done == n_batches:
      for k in totals:
        totals[k] = similarity.add_sums(totals[k], jax.device_get(acc[k]))
      acc = fresh()
    now = time.perf_counter()
    if now - last > 10:
      rate = done * per_batch / (now - t0)
      log(f"analyze --compare: {done * per_batch:,}/{n_batches * per_batch:,} tokens, {rate:,.0f} tokens/s, "
          f"ETA {(n_batches - done) * per_batch / rate:,.0f} s")
      last = now
  if done % FLUSH_EVERY and done != n_batches:
    for k in totals:
      totals[k] = similarity.add_sums(totals[k], jax.device_get(acc[k]))
  if done == 0:
    raise errors.MissingInputError(f"--compare: the {opts.split} split gave no batch of {opts.batch_size} sequences")
  corr_f = similarity.corr_from_sums(totals["features"])
  corr_n = similarity.corr_from_sums(totals["neurons"])
  u = similarity.universality(corr_f, corr_n)
  out = os.path.join(a.workdir, DIRNAME)
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "matches.npz"),
           feature_best=u["features"]["best_index"], feature_corr=u["features"]["best_value"],
           neuron_best=u["neurons"]["best_index"], neuron_corr=u["neurons"]["best_value"])
  summary = {"run_a": a.workdir, "run_b": b.workdir, "sae_a": sae_a.name, "sae_b": sae_b.name,
             "n_tokens": done * per_batch, "split": opts.split, "seconds": round(time.perf_counter() - t0, 1)}
  for k in ("features", "neurons"):
    s = u[k]
    summary[k] = {"median_max_corr": s["median"], "mean_max_corr": s["mean"], "n": s["n_used"],
                  "excluded": s["n_excluded"], "dead_a": s["dead_rows"], "dead_b": s["dead_columns"],
                  "hist_counts": s["counts"].tolist(), "hist_edges": s["edges"].tolist()}
  files.atomic_write_json(os.path.join(out, "summary.json"), summary, indent=1)
  _plot(u, summary, os.path.join(out, "hist.png"))
  log(f"analyze --compare: median max correlation, features {summary['features']['median_max_corr']:.3f} "
      f"(n {summary['features']['n']}), neurons {summary['neurons']['median_max_corr']:.3f} "
      f"(paper: 0.72 vs 0.46) over {summary['n_tokens']:,} tokens")
  return out


def _plot(u, summary, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for k, color in (("features", "tab:blue"), ("neurons", "tab:orange")):
    s = u[k]
    centres = (s["edges"][:-1] + s["edges"][1:]) / 2
    share = s["counts"] / max(1, s["counts"].sum())
    ax.step(centres, share, where="mid", color=color,
            label=f"{k}: median {s['median']:.2f} (n {s['n_used']})")
  ax.set_xlabel("max activation correlation with run B")
  ax.set_ylabel("share")
  ax.set_title(f"Universality over {summary['n_tokens']:,} tokens")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
