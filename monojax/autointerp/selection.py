"""Which examples each stage sees, following the paper's protocol (Towards Monosemanticity,
appendix "Automated interpretability"; ../shared/docs/paper-spec.md §7) on this database's layout
(top 20, 10 intervals of 5, bottom 20 — the paper had 11 intervals, so 11 "other" groups here, not 12):

  explain   10 top, 2 from each other group, 5 random, 10 top tokens out of context  (≤ 47)
  simulate  6 top, 2 from each other group, 10 random, 20 top tokens out of context  (≤ 58),
            shuffled, 9-token windows (6 before, 2 after), disjoint from the explain examples
  detection 10 activating contexts not shown to the explainer + 10 random contexts where it is off
  fuzzing   10 activating contexts with their active tokens marked + 10 with as many other tokens marked
  logits    100 tokens: the 10th-60th largest positive logit effects + 50 random tokens

A feature with fewer than MIN_EXAMPLES distinct activating examples (repeats dropped) is excluded,
as the paper does; it is a single-token feature when every top example peaks on the same token.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from monojax.autointerp.sources import CTX_LEFT, UnitSource, Window, db_windows

MIN_EXAMPLES = 20
EXPLAIN = {"top": 10, "other": 2, "random": 5, "elsewhere": 10}
SIMULATE = {"top": 6, "other": 2, "random": 10, "elsewhere": 20}
SIM_LEFT, SIM_RIGHT = 6, 2         # the paper's 9-token simulation windows
N_DETECT, N_FUZZ, N_LOGIT = 10, 10, 50
ELSEWHERE = "top token elsewhere"


def quantise(acts, max_act: float) -> np.ndarray:
  """Activations → integers 0-9 relative to the feature's maximum (NaN → 0)."""
  a = np.nan_to_num(np.asarray(acts, np.float64), nan=0.0)
  if not max_act > 0:
    return np.zeros(a.shape, np.int64)
  return np.clip(np.rint(9.0 * a / float(max_act)), 0, 9).astype(np.int64)


@dataclasses.dataclass
class Task:
  """Everything the stages need for one feature."""
  unit: str
  index: int
  max_act: float
  explain: list[Window]
  simulate: list[Window]
  detect: list[tuple[Window, bool]]              # (context, the feature is active in it)
  fuzz: list[tuple[Window, np.ndarray, bool]]    # (context, marked positions, marks are the active tokens)
  logit_tokens: list[tuple[int, bool]]           # (token id, one of its top logit effects)
  top_logits: list[int]
  bottom_logits: list[int]
  single_token: bool
  excluded: str | None = None


def _take(rng, items: list, n: int) -> tuple[list, list]:
  idx = rng.permutation(len(items))
  return [items[i] for i in idx[:n]], [items[i] for i in idx[n:]]


def _elsewhere(src: UnitSource, i: int, top: list[Window], own_seqs: set, rng, n: int) -> list[tuple[int, int]]:
  """Up to n pool positions (row, pos) holding the feature's top tokens in sequences none of its
  examples come from, spread over its distinct top tokens (most frequent first)."""
  peaks = [int(w.tokens[int(np.nanargmax(w.acts))]) for w in top if np.isfinite(w.acts).any()]
  ids, counts = np.unique(peaks, return_counts=True) if peaks else (np.zeros(0, int), np.zeros(0, int))
  order = ids[np.argsort(-counts, kind="stable")]
  pools = []
  for t in order[:10]:
    occ = src.occurrences(int(t))
    occ = occ[[int(src.pool_seqs[r]) not in own_seqs for r in occ[:, 0]]] if len(occ) else occ
    pools.append(list(map(tuple, occ[rng.permutation(len(occ))])))
  out: list[tuple[int, int]] = []
  while len(out) < n and any(pools):
    for p in pools:
      if p and len(out) < n:
        out.append(p.pop())
  return out


@dataclasses.dataclass
class Pool:
  """What one pass of the run over the pool gave for a unit's features: the random contexts'
  activations, each feature's top tokens in other contexts, and its 60 largest logit effects."""
  excluded: dict           # feature → why it is not scored
  single: dict             # feature → single-token feature
  row: dict                # live feature → its row in the arrays below
  random_acts: np.ndarray  # f32[live, R, CTX]
  elsewhere: dict          # live feature → (positions [(pool row, pos)], f32[n, CTX])
  logit_ids: np.ndarray    # int[live, LOGIT_K]


def _groups(wins: list[Window]) -> dict[str, list[Window]]:
  groups: dict[str, list[Window]] = {}
  for w in wins:
    groups.setdefault(w.kind, []).append(w)
  return groups


def gather_pool(src: UnitSource, features, *, seed: int = 0) -> Pool:
  """One batched pass of the run over the pool for all of `features` (so a unit costs one pass,
  however many chunks its tasks are built in)."""
  unit = src.unit
  features = sorted({int(i) for i in features})
  excluded, single, plans, requests = {}, {}, {}, []
  for i in features:
    wins = db_windows(unit, i)
    top = [w for w in wins if w.kind == "top"]
    single[i] = len(top) >= MIN_EXAMPLES and len({int(w.tokens[int(np.nanargmax(w.acts))]) for w in top}) == 1
    activating = sum(1 for w in wins if np.nanmax(w.acts) > 0)
    if activating < MIN_EXAMPLES:
      excluded[i] = f"fewer than {MIN_EXAMPLES} distinct examples ({activating})"
      continue
    at = _elsewhere(src, i, top, {w.seq for w in wins}, np.random.default_rng([seed, i, 1]),
                    EXPLAIN["elsewhere"] + SIMULATE["elsewhere"])
    plans[i] = (len(requests), at)
    requests += [(r, p, i) for r, p in at]
  live = [i for i in features if i not in excluded]
  row = {f: k for k, f in enumerate(live)}
  # The random contexts and the elsewhere contexts in one pass over the pool.
  R = len(src.random_at)
  rand_req = np.zeros((len(live) * R, 3), np.int64)
  if live:
    rand_req[:, :2] = np.tile(src.random_at, (len(live), 1))
    rand_req[:, 2] = np.repeat(np.asarray(live, np.int64), R)
  acts = src.pool_activations(np.concatenate([rand_req, np.asarray(requests, np.int64).reshape(-1, 3)]))
  random_acts = acts[:len(rand_req)].reshape(len(live), R, acts.shape[-1])
  elsewhere = {i: (at, acts[len(rand_req) + start:len(rand_req) + start + len(at)]) for i, (start, at) in plans.items()}
  ids = src.top_logits(np.asarray(live, np.int64))[0] if live else np.zeros((0, 0), np.int64)
  return Pool(excluded, single, row, random_acts, elsewhere, ids)


def build_tasks(src: UnitSource, features, pool: Pool | None = None, *, seed: int = 0) -> list[Task]:
  """One Task per feature (features excluded from scoring carry `excluded` and no examples)."""
  unit = src.unit
  features = sorted({int(i) for i in features})
  pool = pool or gather_pool(src, features, seed=seed)
  max_acts = np.asarray(unit.array("max"), np.float32)
  random_tokens = [src.window_tokens(r, p) for r, p in src.random_at]
  n_rand = EXPLAIN["random"] + SIMULATE["random"]
  vocab = src.run.tokenizer.vocab_size
  tasks = []
  for i in features:
    rng = np.random.default_rng([seed, i])
    single, why = pool.single[i], pool.excluded.get(i)
    rec_logits = (np.asarray(unit.array("logit_top_ids")[i]).tolist(), np.asarray(unit.array("logit_bottom_ids")[i]).tolist())
    if why is not None:
      tasks.append(Task(src.name, i, float(max_acts[i]), [], [], [], [], [], *rec_logits, single, why))
      continue
    groups = _groups(db_windows(unit, i))
    k = pool.row[i]
    at, at_acts = pool.elsewhere[i]
    elsewhere = [Window(src.window_tokens(r, p), at_acts[j], ELSEWHERE, int(src.pool_seqs[r]), int(p))
                 for j, (r, p) in enumerate(at)]
    random_acts = pool.random_acts
    # Random contexts: never one of the feature's own examples or its top tokens elsewhere.
    taken = {(w.seq, w.pos) for ws in groups.values() for w in ws} | {(int(src.pool_seqs[r]), int(p)) for r, p in at}
    perm = np.asarray([j for j in rng.permutation(len(src.random_at))
                       if (int(src.pool_seqs[src.random_at[j, 0]]), int(src.random_at[j, 1])) not in taken], np.int64)
    off = ~(np.nan_to_num(random_acts[k]).max(1) > 0)
    rest = perm[n_rand:]
    picked = list(perm[:n_rand]) + list(rest[off[rest]][:N_DETECT])
    randoms = [Window(random_tokens[j], random_acts[k, j], "random", int(src.pool_seqs[src.random_at[j, 0]]),
                      int(src.random_at[j, 1])) for j in picked]
    explain, simulate = [], []
    for kind, ws in groups.items():
      per = "top" if kind == "top" else "other"
      e, rest = _take(rng, ws, EXPLAIN[per])
      s, _ = _take(rng, rest, SIMULATE[per])
      explain += e
      simulate += s
    explain += randoms[:EXPLAIN["random"]]
    simulate += randoms[EXPLAIN["random"]:n_rand]
    explain += elsewhere[:EXPLAIN["elsewhere"]]
    simulate += elsewhere[EXPLAIN["elsewhere"]:]
    explain = _order(explain)
    simulate = [w.cut(SIM_LEFT, SIM_RIGHT) for w in simulate]
    simulate = [simulate[j] for j in rng.permutation(len(simulate))]
    # Detection and fuzzing: activating contexts the explainer did not see.
    shown = {(w.seq, w.pos) for w in explain}
    unseen = [w for ws in groups.values() for w in ws if (w.seq, w.pos) not in shown and np.nanmax(w.acts) > 0]
    unseen = [unseen[j] for j in rng.permutation(len(unseen))]
    negatives = randoms[n_rand:]
    detect = [(w, True) for w in unseen[:N_DETECT]] + [(w, False) for w in negatives]
    detect = [detect[j] for j in rng.permutation(len(detect))]
    fuzz = []
    for j, w in enumerate(unseen[:2 * N_FUZZ]):
      active = np.nonzero(np.nan_to_num(w.acts) > 0)[0]
      if j % 2 == 0:
        fuzz.append((w, active, True))
      else:
        quiet = np.nonzero((np.nan_to_num(w.acts) <= 0) & (w.tokens >= 0))[0]
        if len(quiet) >= len(active):
          fuzz.append((w, np.sort(rng.choice(quiet, size=len(active), replace=False)), False))
    fuzz = [fuzz[j] for j in rng.permutation(len(fuzz))]
    top_ids = [int(t) for t in pool.logit_ids[k][10:10 + N_LOGIT]]
    allowed = np.setdiff1d(np.arange(vocab), pool.logit_ids[k])
    rand_ids = [int(t) for t in rng.permutation(allowed)[:N_LOGIT]]
    logit_tokens = [(t, True) for t in top_ids] + [(t, False) for t in rand_ids]
    logit_tokens = [logit_tokens[j] for j in rng.permutation(len(logit_tokens))]
    tasks.append(Task(src.name, i, float(max_acts[i]), explain, simulate, detect, fuzz, logit_tokens, *rec_logits,
                      single))
  return tasks


_ORDER = {"top": 0, "bottom": 90, "random": 95, ELSEWHERE: 99}


def _order(ws: list[Window]) -> list[Window]:
  """Explanation examples in the paper's reading order: top, intervals high to low, bottom, random,
  then the top tokens elsewhere."""
  def key(w):
    if w.kind.startswith("interval "):
      return int(w.kind.split()[1])
    return _ORDER.get(w.kind, 98)
  return sorted(ws, key=key)


__all__ = ["CTX_LEFT", "Task", "build_tasks", "quantise"]
