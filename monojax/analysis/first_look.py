"""The first look at a run's features, from its feature database: a handful of features chosen to be
worth reading (live, not ultralow, fired often enough to judge, spread over the density range and,
within each third of it, the most specific ones), written to RUN/preview.md with their numbers,
top logit tokens and top contexts. Also the end-of-run step of a co-training run: the analysis
pass, the report and this preview (`end_of_run`)."""
from __future__ import annotations

import math
import os

import numpy as np

from monojax import errors, files, text
from monojax.analysis import database

MIN_FIRED = 20          # firings a feature needs before its examples say anything
TOP_EXAMPLES = database.N_TOP  # examples whose firing tokens measure a feature's token entropy
MIN_MAX_FRACTION = 0.1  # a max activation below this fraction of the unit's median max: near-zero noise
N_PICKS = 6
CONTEXTS = 3            # top contexts shown per feature
LEFT, RIGHT = 12, 4     # context tokens either side of the firing token
LOGIT_TOKENS = 5        # top logit-effect tokens shown per feature
BATCH_SIZE = 64         # sequences per batch of the end-of-run pass (rounded up to the device count)


def token_entropy(unit, rows: np.ndarray) -> np.ndarray:
  """Per feature of `rows`: the entropy (bits) of the token ids at its top examples (the firing
  tokens), how many examples there were and how many distinct tokens: (entropy, count, distinct),
  each [len(rows)]. 0 bits = one token."""
  seq = np.asarray(unit.array("ex_seq")[rows, :TOP_EXAMPLES], np.int64)
  pos = np.asarray(unit.array("ex_pos")[rows, :TOP_EXAMPLES], np.int64)
  ok = seq >= 0
  toks = unit.db.tokens
  ids = np.where(ok, np.asarray(toks[np.clip(seq, 0, toks.shape[0] - 1), pos]), -1).astype(np.int64)
  r = np.repeat(np.arange(len(rows)), ids.shape[1]).reshape(ids.shape)[ok]
  keys, counts = np.unique(r * (int(ids.max(initial=0)) + 1) + ids[ok], return_counts=True)
  n = ok.sum(1)
  owner = keys // (int(ids.max(initial=0)) + 1)
  p = counts / n[owner]
  h = np.zeros(len(rows))
  np.add.at(h, owner, -p * np.log2(p))
  return h, n, np.bincount(owner, minlength=len(rows))


def pick_interpretable(db, unit: str = "sae0", n: int = N_PICKS) -> list[dict]:
  """Up to n features of `unit`, rarest to densest: live, not ultralow, ≥ MIN_FIRED firings and a max
  activation ≥ MIN_MAX_FRACTION of the candidates' median; the candidates split into thirds of log
  density and from each third the most specific: score = max(best proxy correlation, 1 − token
  entropy / log2(examples)). Each pick: {"index", "density", "fired", "max", "score", "why",
  "proxy", "proxy_corr", "entropy", "examples", "distinct"}."""
  u = db.unit(unit)
  fired = np.asarray(u.array("fired"), np.int64)
  dens = np.asarray(u.array("density"), np.float64)
  mx = np.asarray(u.array("max"), np.float64)
  ok = (fired >= MIN_FIRED) & (dens >= database.ULTRALOW) & np.isfinite(mx) & (mx > 0)
  if ok.any():
    ok &= mx >= MIN_MAX_FRACTION * np.median(mx[ok])
  cand = np.flatnonzero(ok)
  if cand.size == 0 or n <= 0:
    return []
  ent, n_ex, distinct = token_entropy(u, cand)
  with np.errstate(divide="ignore", invalid="ignore"):
    tok_score = np.where(n_ex > 1, 1.0 - ent / np.log2(np.maximum(n_ex, 2)), 0.0)
  names = [p["name"] for p in db.meta.get("proxies") or []]
  prox_corr = np.full(cand.size, -np.inf)
  prox_id = np.full(cand.size, -1)
  if names:
    pc = np.asarray(u.array("proxy_corr")[cand], np.float64)
    pc = np.where(np.isfinite(pc), pc, -np.inf)
    prox_id = pc.argmax(1)
    prox_corr = pc[np.arange(cand.size), prox_id]
  score = np.maximum(prox_corr, tok_score)
  order = np.argsort(np.log10(dens[cand]), kind="stable")
  thirds = [t for t in np.array_split(order, min(3, cand.size)) if t.size]
  quota = [len(a) for a in np.array_split(np.arange(min(n, cand.size)), len(thirds))]
  chosen = []
  for t, q in zip(thirds, quota[::-1]):  # any extra pick goes to the densest thirds (more examples)
    best = t[np.lexsort((cand[t], -score[t]))][:q]
    chosen += [int(j) for j in best]
  rest = [int(j) for j in np.lexsort((cand, -score)) if int(j) not in set(chosen)]
  chosen += rest[:min(n, cand.size) - len(chosen)]  # a third with fewer candidates than its share
  picks = []
  for j in sorted(chosen, key=lambda j: (dens[cand[j]], cand[j])):
    i = int(cand[j])
    use_proxy = prox_corr[j] >= tok_score[j] and prox_id[j] >= 0 and np.isfinite(prox_corr[j])
    k = int(distinct[j])
    why = (f"proxy {names[prox_id[j]]} (corr {prox_corr[j]:.2f})" if use_proxy else
           f"its top {int(n_ex[j])} examples fire on {k} distinct token{'s' * (k != 1)} (entropy {ent[j]:.2f} bits)")
    picks.append({"index": i, "density": float(dens[i]), "fired": int(fired[i]), "max": float(mx[i]),
                  "score": float(score[j]), "why": why, "proxy": names[prox_id[j]] if use_proxy else None,
                  "proxy_corr": float(prox_corr[j]) if np.isfinite(prox_corr[j]) else math.nan,
                  "entropy": float(ent[j]), "examples": int(n_ex[j]), "distinct": int(distinct[j])})
  return picks


def context(tokenizer, ex: dict, left: int = LEFT, right: int = RIGHT) -> str:
  """One example's tokens around the firing token, which sits between « and », as visible text."""
  ids, c = ex["tokens"], ex["center"]
  dec = lambda a: tokenizer.decode([int(t) for t in a if t >= 0])
  return text.visible(dec(ids[max(0, c - left):c]) + "«" + dec(ids[c:c + 1]) + "»" + dec(ids[c + 1:c + 1 + right]))


def preview_lines(db, unit: str, tokenizer, picks: list[dict]) -> list[str]:
  u = db.unit(unit)
  info, n_tok = u.info, db.n_tokens
  fired = np.asarray(u.array("fired"))
  lines = [text.visible(f"# Feature preview: {unit} [{info.get('label', '')}]"), "",
           f"{int((fired > 0).sum()):,} of {u.width:,} features fire on the {n_tok:,} analysed tokens (the corpus's "
           f"{db.meta.get('source', {}).get('split', '?')} split). {len(picks)} features worth a first look, rarest to "
           f"densest: live, not ultralow, at least {MIN_FIRED} firings, and the most specific of each third of the "
           "density range (a text proxy they track, or few distinct tokens at their top examples). «» marks the "
           "token where the feature fires, with its activation. Every feature: RUN/report.md and RUN/analysis.", ""]
  for p in picks:
    i = p["index"]
    rec = u.feature(i)
    top_ids = [int(t) for t in rec["logit_top_ids"][:LOGIT_TOKENS]]
    lines.append(f"feature {i}: density {p['density']:.2e} ({p['fired']:,} of {n_tok:,} tokens), max activation "
                 f"{p['max']:.3g}; picked for: {p['why']}")
    lines.append("")
    lines.append("- top logit tokens: " + " ".join(text.markdown_code(tokenizer.decode([t])) for t in top_ids))
    for ex in [e for e in rec["examples"] if e["group"] == "top"][:CONTEXTS]:
      lines.append(f"- {ex['value']:.3f} " + text.markdown_code(context(tokenizer, ex)))
    lines.append("")
  return lines


def write_preview(run, db, log, unit: str | None = None) -> str:
  """Writes RUN/preview.md for `unit` (default: the database's first SAE) and logs it; returns its text."""
  unit = unit or next(u["name"] for u in db.meta["units"] if u["kind"] == "sae")
  picks = pick_interpretable(db, unit)
  out = "\n".join(preview_lines(db, unit, run.tokenizer, picks)).rstrip("\n") + "\n"
  path = os.path.join(run.workdir, "preview.md")
  files.atomic_write(path, out)
  log(text.console(out + f"(written to {path})"))
  return out


def end_of_run(run, log) -> bool:
  """After a co-training run with analysis.tokens > 0: the analysis pass over that many tokens of the
  corpus's analysis split, RUN/report.md and RUN/preview.md. Returns False (after one line saying
  why) when there is nothing to analyse, so the caller writes the quick val-split preview instead."""
  from monojax.analysis import report, scan
  from monojax.corpus import build_corpus
  from monojax.data import sources
  tokens = int(run.cfg.analysis.tokens)
  if tokens <= 0 or not run.saes:
    return False
  try:
    sources.split_files(run.cfg.data, build_corpus.ensure_data_root(run.cfg.data, log=log), sources.ANALYSIS)
  except errors.MissingInputError as e:
    log(f"analysis: skipped, the corpus has no analysis split ({e}); writing the quick preview of the val split")
    return False
  n_dev = run.mesh.devices.size
  opts = scan.Options(tokens=tokens, batch_size=-(-BATCH_SIZE // n_dev) * n_dev)
  try:
    path = scan.run_pass(run, opts, log=log)
  except errors.MissingInputError as e:  # e.g. an analysis split smaller than one batch
    log(f"analysis: skipped ({e}); writing the quick preview of the val split")
    return False
  report.write_report(run.workdir, log=log, tokenizer=run.tokenizer, db_path=path)
  write_preview(run, database.open_database(path), log)
  return True
