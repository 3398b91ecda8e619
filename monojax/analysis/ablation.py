"""Feature ablation effects for the inspector's hover panel (paper-spec §6.4): for a feature's top
and interval examples, ablate the feature over the whole context — the MLP activations become
x̂(f') + (x − x̂(f)) with f'_i = 0, i.e. x − f_i·d_i (d_i the unit decoder row, f_i the reported
activation) — and record, per position, the change in the actual next token's loss and the tokens
whose log-probability rose and fell most.

When the SAE reads the model's LAST layer, ablating at a position changes nothing but that
position's residual stream (no attention comes after it): logits'(t) = LN(r(t) − f_i(t)·d_i·W_out)
W_U, with r the final residual. So the effect is computed exactly and only where the feature fired:
per example, the ABL_POSITIONS positions of its window with the largest activation. SAEs on an
earlier layer would need a full forward per (feature, example); they are skipped (and said so).

Arrays (first axis = feature, second = ABL_SLOTS of the database's example slots):
  abl_off   int8[F, S, K]      window offset of the position (−1: none)
  abl_dloss f32[F, S, K]       loss of the actual next token, ablated − clean (NaN at a sequence's end)
  abl_up    int32[F, S, K, 5]  tokens whose log-probability rose most; abl_up_val f32 their Δ log p
  abl_down  int32[F, S, K, 5]  ... fell most; abl_down_val f32
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monojax.analysis import database, stats
from monojax.models import transformer
from monojax.sae import core as sae_core

ABL_SLOTS = database.ABL_SLOTS   # the top 10 examples and the first of each interval
ABL_POSITIONS = 3
TOP_TOKENS = 5
CHUNK = 256      # positions per logits chunk: [CHUNK, vocab] fp32 at a time


def applies(run, sae) -> bool:
  """Whether the exact local computation applies: the SAE reads the model's last layer."""
  return int(sae.layer) == int(run.cfg.model.n_layers) - 1


def _entries(ex_seq, ex_pos, ex_win):
  """The (feature, slot, k) positions to ablate: the ABL_POSITIONS largest activations of each chosen
  slot's window. Returns (off int8[F, S, K], seq, pos, act flat over valid entries, flat index)."""
  seq = np.asarray(ex_seq)[:, ABL_SLOTS]
  pos = np.asarray(ex_pos)[:, ABL_SLOTS]
  win = np.nan_to_num(np.asarray(ex_win, np.float32)[:, ABL_SLOTS], nan=0.0)          # [F, S, W]
  top = np.argsort(-win, axis=-1, kind="stable")[..., :ABL_POSITIONS]                  # [F, S, K]
  act = np.take_along_axis(win, top, -1)
  valid = (act > 0) & (seq[..., None] >= 0)
  off = np.where(valid, top, -1).astype(np.int8)
  flat = np.flatnonzero(valid.reshape(-1))
  F, S, K = valid.shape
  fi = flat // (S * K)
  p = np.broadcast_to(pos[..., None], valid.shape).reshape(-1)[flat] - stats.LEFT + top.reshape(-1)[flat]
  s = np.broadcast_to(seq[..., None], valid.shape).reshape(-1)[flat]
  return off, fi, s.astype(np.int64), p.astype(np.int64), act.reshape(-1)[flat], flat


def _final_residual_fn(run):
  graphdef = run.graphdef

  @jax.jit
  def resid(params, tokens):
    model = nnx.merge(graphdef, transformer.compute_params(params, jnp.float32))
    x = model._embed(tokens)
    for block in model.blocks:
      x, _ = block(x)
    return x.astype(jnp.float32)
  return resid


def _effects_fn(vocab: int):
  @jax.jit
  def effects(x, delta, nxt, ln_w, ln_b, W_U):
    def logp(h):
      z = jnp.dot(transformer.layer_norm(h, ln_w, ln_b), W_U, precision=jax.lax.Precision.HIGHEST)[:, :vocab]
      return jax.nn.log_softmax(z, axis=-1)
    clean, abl = logp(x), logp(x + delta)
    diff = abl - clean
    rows = jnp.arange(x.shape[0])
    dloss = -(abl[rows, jnp.maximum(nxt, 0)] - clean[rows, jnp.maximum(nxt, 0)])
    dloss = jnp.where(nxt >= 0, dloss, jnp.nan)
    up_v, up_i = jax.lax.top_k(diff, TOP_TOKENS)
    dn_v, dn_i = jax.lax.top_k(-diff, TOP_TOKENS)
    return dloss, up_i, up_v, dn_i, -dn_v
  return effects


def compute(run, sae, tokens, ex_seq, ex_pos, ex_win, *, batch: int = 64, log=print) -> dict | None:
  """The ablation arrays (module docstring) of one SAE's features, or None when they do not apply."""
  if not applies(run, sae):
    log(f"analyze: {sae.name}: ablation effects skipped (the SAE reads layer {sae.layer}, not the last one; "
        "BUILD_NOTES, known gaps)")
    return None
  t0 = time.time()
  off, fi, seq, pos, act, flat = _entries(ex_seq, ex_pos, ex_win)
  F, S, K = off.shape
  n = len(flat)
  tokens = np.asarray(tokens)
  T = tokens.shape[1]
  vocab = run.tokenizer.vocab_size
  model = nnx.merge(run.graphdef, run.params)
  W_out = jnp.asarray(model.blocks[sae.layer].mlp.W_out[...], jnp.float32)
  dirs = jnp.asarray(sae_core.decoder_directions(run.sae_state, sae), jnp.float32) @ W_out      # [width, d_model]
  # Final residuals at the entries' positions, one batch of sequences at a time.
  resid_fn = _final_residual_fn(run)
  x = np.zeros((n, W_out.shape[1]), np.float32)
  order = np.argsort(seq, kind="stable")
  useqs = np.unique(seq)
  for start in range(0, len(useqs), batch):
    chunk = useqs[start:start + batch]
    toks = np.zeros((batch, T), np.int32)
    toks[:len(chunk)] = tokens[chunk]
    r = np.asarray(jax.device_get(resid_fn(run.params, toks)))
    lo, hi = np.searchsorted(seq[order], [chunk[0], chunk[-1] + 1])
    sel = order[lo:hi]
    x[sel] = r[np.searchsorted(chunk, seq[sel]), pos[sel]]
  nxt = np.where(pos + 1 < T, tokens[seq, np.minimum(pos + 1, T - 1)], -1).astype(np.int32)
  effects = _effects_fn(vocab)
  ln_w = jnp.asarray(model.ln_final.w[...], jnp.float32)
  ln_b = jnp.asarray(model.ln_final.b[...], jnp.float32)
  W_U = jnp.asarray(model.unembed_weight(), jnp.float32)
  out = {"dloss": np.full(n, np.nan, np.float32), "up": np.zeros((n, TOP_TOKENS), np.int32),
         "up_val": np.zeros((n, TOP_TOKENS), np.float32), "down": np.zeros((n, TOP_TOKENS), np.int32),
         "down_val": np.zeros((n, TOP_TOKENS), np.float32)}
  for start in range(0, n, CHUNK):
    sl = slice(start, min(n, start + CHUNK))
    m = sl.stop - sl.start
    xb = np.zeros((CHUNK, x.shape[1]), np.float32)
    db_ = np.zeros_like(xb)
    nb = np.full(CHUNK, -1, np.int32)
    xb[:m], nb[:m] = x[sl], nxt[sl]
    db_[:m] = -act[sl, None] * np.asarray(dirs[jnp.asarray(fi[sl])])
    res = jax.device_get(effects(xb, db_, nb, ln_w, ln_b, W_U))
    for name, a in zip(("dloss", "up", "up_val", "down", "down_val"), res):
      out[name][sl] = np.asarray(a)[:m]
  arrays = {"abl_off": off, "abl_dloss": np.full((F * S * K,), np.nan, np.float32),
            "abl_up": np.zeros((F * S * K, TOP_TOKENS), np.int32), "abl_up_val": np.zeros((F * S * K, TOP_TOKENS), np.float32),
            "abl_down": np.zeros((F * S * K, TOP_TOKENS), np.int32),
            "abl_down_val": np.zeros((F * S * K, TOP_TOKENS), np.float32)}
  for name in ("dloss", "up", "up_val", "down", "down_val"):
    arrays[f"abl_{name}"][flat] = out[name]
  for name in list(arrays):
    if name != "abl_off":
      a = arrays[name]
      arrays[name] = a.reshape((F, S, K) + a.shape[1:])
  log(f"analyze: {sae.name}: ablation effects at {n:,} positions of {F:,} features in {time.time() - t0:.0f}s")
  return arrays
