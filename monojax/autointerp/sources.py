"""What autointerp shows a model about one feature (or neuron), read from the feature database and,
for what the database does not hold, from the run itself:

  database (RUN/analysis)  top, interval and bottom examples with activations; top/bottom logits
  run (one forward pass)   a shared pool of random contexts, and each feature's top tokens placed
                           in other contexts ("top tokens out of context"), with their activations
  run (weights)            the 60 largest logit effects (the logit scorer's tokens 10-60)

`UnitSource(run, db, unit).pool(features)` computes the pool's activations for a set of features in
one batched pass; `Selection` (selection.py) then picks each feature's examples.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monojax.analysis import database, logit_effects, stats
from monojax.sae import core as sae_core

NEURONS = "neurons"
# Every window autointerp shows is cut from [pos − CTX_LEFT, pos + CTX_RIGHT] around its token.
CTX_LEFT, CTX_RIGHT = 12, 3
CTX = CTX_LEFT + 1 + CTX_RIGHT
LOGIT_K = 60


@dataclasses.dataclass
class Window:
  """A context: token ids (−1 outside the sequence) and the feature's activations (NaN outside), the
  token of interest at `center`; `kind` is an example group ("top", "interval 3", "bottom"),
  "random" or "top token elsewhere"."""
  tokens: np.ndarray
  acts: np.ndarray
  kind: str
  seq: int = -1
  pos: int = -1
  center: int = CTX_LEFT

  def cut(self, left: int, right: int) -> Window:
    """The valid tokens of [center − left, center + right]."""
    lo, hi = max(0, self.center - left), min(len(self.tokens), self.center + right + 1)
    keep = np.arange(lo, hi)
    keep = keep[self.tokens[keep] >= 0]
    return Window(self.tokens[keep], self.acts[keep], self.kind, self.seq, self.pos,
                  int(np.searchsorted(keep, self.center)))


def db_windows(unit: database.Unit, i: int) -> list[Window]:
  """Feature i's distinct database examples (repeated contexts and duplicate slots dropped), cut to
  the autointerp context."""
  lo = stats.LEFT - CTX_LEFT
  out, seen = [], set()
  for ex in unit.examples(i):
    # A repeated context, or the same token again in another slot (a top example is often also an
    # interval-1 sample): one example, in its first group.
    if ex["repeated"] or (ex["seq"], ex["pos"]) in seen:
      continue
    seen.add((ex["seq"], ex["pos"]))
    toks = np.asarray(ex["tokens"][lo:lo + CTX], np.int64)
    acts = np.asarray(ex["acts"][lo:lo + CTX], np.float32)
    out.append(Window(toks, np.where(toks >= 0, acts, np.nan), ex["group"], ex["seq"], ex["pos"]))
  return out


class UnitSource:
  """One unit's data for autointerp: the database's unit plus the run to compute what it lacks."""

  def __init__(self, run, db: database.FeatureDatabase, unit: str, *, pool_sequences: int = 1024,
               pool_random: int = 256, seed: int = 0):
    self.run, self.db, self.name = run, db, unit
    self.unit = db.unit(unit)
    toks = db.tokens
    rng = np.random.default_rng(seed)
    n_seq = toks.shape[0]
    self.pool_seqs = np.sort(rng.choice(n_seq, size=min(int(pool_sequences), n_seq), replace=False))
    self.pool_tokens = np.asarray(toks[self.pool_seqs], np.int32)          # [P, T]
    P, T = self.pool_tokens.shape
    # Random contexts: full windows only, so each shows CTX tokens.
    n_rand = min(int(pool_random), P * max(1, T - CTX))
    flat = rng.choice(P * max(1, T - CTX), size=n_rand, replace=False)
    self.random_at = np.stack([flat // max(1, T - CTX), CTX_LEFT + flat % max(1, T - CTX)], 1)  # [R, 2] (row, pos)
    # Where each token id occurs in the pool (for "top tokens out of context").
    order = np.argsort(self.pool_tokens.reshape(-1), kind="stable")
    self._occ_order = order
    self._occ_sorted = self.pool_tokens.reshape(-1)[order]

  @property
  def width(self) -> int:
    return self.unit.width

  def occurrences(self, token: int) -> np.ndarray:
    """[n, 2] (pool row, pos) of every occurrence of `token` in the pool."""
    lo, hi = np.searchsorted(self._occ_sorted, [token, token + 1])
    flat = self._occ_order[lo:hi]
    T = self.pool_tokens.shape[1]
    return np.stack([flat // T, flat % T], 1)

  def window_tokens(self, row: int, pos: int) -> np.ndarray:
    T = self.pool_tokens.shape[1]
    out = np.full(CTX, -1, np.int64)
    lo, hi = pos - CTX_LEFT, pos + CTX_RIGHT + 1
    out[max(0, -lo):CTX - max(0, hi - T)] = self.pool_tokens[row, max(0, lo):min(T, hi)]
    return out

  def pool_activations(self, requests: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """f32[n, CTX]: the unit's activations of feature requests[k, 2] on the window around pool
    position (requests[k, 0], requests[k, 1]) (NaN outside the sequence), in one pass over the pool
    rows the requests touch; only the requested windows leave the device."""
    requests = np.asarray(requests, np.int64).reshape(-1, 3)   # (row, pos, feature)
    out = np.full((len(requests), CTX), np.nan, np.float32)
    if not len(requests):
      return out
    rows = np.unique(requests[:, 0])
    fn = self._acts_fn()
    for start in range(0, len(rows), batch):
      chunk = rows[start:start + batch]
      toks = np.zeros((batch, self.pool_tokens.shape[1]), np.int32)
      toks[:len(chunk)] = self.pool_tokens[chunk]
      sel = np.nonzero(np.isin(requests[:, 0], chunk))[0]
      local = np.searchsorted(chunk, requests[sel, 0])
      # Fixed shapes per call: the requests are padded to a power of two.
      n = len(sel)
      cap = 1 << max(6, (n - 1).bit_length())
      b = np.zeros(cap, np.int32)
      p = np.zeros(cap, np.int32)
      f = np.zeros(cap, np.int32)
      b[:n], p[:n], f[:n] = local, requests[sel, 1], requests[sel, 2]
      got = np.asarray(jax.device_get(fn(toks, b, p, f)))
      out[sel] = got[:n]
    return out

  def _acts_fn(self):
    run, name = self.run, self.name

    def acts_at(toks, b, p, f):
      acts = run.mlp_acts(toks) if name == NEURONS else run.features(toks, name)
      return _gather_windows(acts, b, p, f)
    return acts_at

  def random_windows(self, features: np.ndarray) -> np.ndarray:
    """f32[len(features), R, CTX]: every random context's activations for each feature (shared contexts)."""
    R = len(self.random_at)
    req = np.concatenate([np.column_stack([self.random_at, np.full(R, f)]) for f in np.asarray(features)]) \
        if len(features) else np.zeros((0, 3), np.int64)
    return self.pool_activations(req).reshape(len(features), R, CTX)

  def top_logits(self, features) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[n, LOGIT_K], values f32[n, LOGIT_K]): the largest centred logit effects of each
    of `features`, largest first (the database keeps 10)."""
    run = self.run
    model = nnx.merge(run.graphdef, run.params)
    layer = int(self.db.meta.get("layer", run.cfg.sae.layer))
    w = logit_effects.lm_weights(model, layer)
    if self.name == NEURONS:
      dirs = logit_effects.neuron_directions(w["W_out"])
    else:
      dec = sae_core.decoder_directions(run.sae_state, run.sae(self.name))
      dirs = logit_effects.resid_directions(dec, w["W_out"])
    dirs = jnp.asarray(dirs)[jnp.asarray(np.asarray(features, np.int32))]
    s = logit_effects.logit_effect_summary(dirs, w["ln_gamma"], w["W_U"], run.tokenizer.vocab_size, k=LOGIT_K)
    return s["top_ids"], s["top_values"]


@jax.jit
def _gather_windows(acts, b, p, f):
  """acts [B, T, W] → f32[n, CTX]: feature f[k]'s activations around (b[k], p[k]), NaN outside."""
  acts = jnp.pad(acts.astype(jnp.float32), ((0, 0), (CTX_LEFT, CTX_RIGHT), (0, 0)), constant_values=jnp.nan)
  return acts[b[:, None], p[:, None] + jnp.arange(CTX)[None, :], f[:, None]]
