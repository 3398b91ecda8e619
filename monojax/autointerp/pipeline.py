"""Explain, then score, every chosen feature of a unit, and write the results.

A "judge" does the model's part of each stage for a batch of features: `OfflineJudge` (the
baseline, baseline.py) or `LLMJudge` (prompts.py through llm.LLMClient, all of a stage's requests
at once so they run concurrently and hit the cache). Both return raw predictions; the scores are
computed here, the same way for both (scoring.py).
"""
from __future__ import annotations

import math
import time

import numpy as np

from monojax.analysis import explanations as results_lib
from monojax.autointerp import baseline, demos, prompts, scoring
from monojax.autointerp.selection import Task, build_tasks, gather_pool
from monojax.autointerp.sources import UnitSource

SCORERS = ("simulation", "detection", "fuzzing", "logits")
CHUNK = 512   # features per batch: bounds memory, and results are written after each


class OfflineJudge:
  backend, model, baseline = "offline", "baseline", True

  def __init__(self, pieces, vocab):
    self.pieces, self.vocab = pieces, vocab

  def explain(self, tasks):
    return [(baseline.explain(t, self.pieces), None) for t in tasks]

  def stage(self, name, tasks, expls):
    out = []
    for t, e in zip(tasks, expls):
      if name == "simulation":
        out.append((baseline.simulate(e, t.simulate, self.pieces), None))
      elif name == "detection":
        out.append((baseline.detect(e, [w for w, _ in t.detect], self.pieces), None))
      elif name == "fuzzing":
        out.append((baseline.fuzz(e, [(w, m) for w, m, _ in t.fuzz], self.pieces), None))
      else:
        out.append((baseline.logits(e, [tok for tok, _ in t.logit_tokens], self.vocab), None))
    return out


class LLMJudge:
  baseline = False

  def __init__(self, client, pieces, vocab):
    self.client, self.pieces, self.vocab = client, pieces, vocab
    self.backend, self.model = client.backend, client.model

  def _ask(self, stage: str, users: list[str], label: str):
    from monojax.autointerp import llm
    shots = tuple(demos.TURNS[stage]())
    reqs = [llm.Request(system=prompts.SYSTEMS[stage], messages=shots + ({"role": "user", "content": u},),
                        max_tokens=prompts.MAX_TOKENS[stage], temperature=0.0, purpose=stage) for u in users]
    return self.client.complete_many(reqs, label=label)

  def explain(self, tasks):
    replies = self._ask("explain", [prompts.explain_prompt(t, self.pieces, self.vocab) for t in tasks], "explain")
    out = []
    for r in replies:
      if r.text is None:
        out.append((None, r.error or "no reply"))
        continue
      try:
        out.append((prompts.parse_explanation(r.text), None))
      except prompts.ParseError as e:
        out.append((None, f"parse: {e}"))
    return out

  def stage(self, name, tasks, expls):
    if name == "simulation":
      users = [prompts.simulate_prompt(e, t.simulate, self.pieces) for t, e in zip(tasks, expls)]
      parse = lambda text, t: prompts.parse_simulation(text, [len(w.tokens) for w in t.simulate])
    elif name == "detection":
      users = [prompts.detect_prompt(e, [w for w, _ in t.detect], self.pieces) for t, e in zip(tasks, expls)]
      parse = lambda text, t: prompts.parse_binary(text, len(t.detect))
    elif name == "fuzzing":
      users = [prompts.fuzz_prompt(e, [(w, m) for w, m, _ in t.fuzz], self.pieces) for t, e in zip(tasks, expls)]
      parse = lambda text, t: prompts.parse_binary(text, len(t.fuzz))
    else:
      users = [prompts.logits_prompt(e, [tok for tok, _ in t.logit_tokens], self.vocab) for t, e in zip(tasks, expls)]
      parse = lambda text, t: prompts.parse_yes_no_list(text, len(t.logit_tokens))
    replies = self._ask(name, users, name)
    return [((parse(r.text, t), None) if r.text is not None else (None, r.error or "no reply"))
            for r, t in zip(replies, tasks)]


# ------------------------------------------------------------------------------------ scores

def _r(x):
  return None if x is None or not math.isfinite(x) else round(float(x), 4)


def score_stage(name: str, task: Task, preds) -> tuple[dict | None, str | None]:
  """(the stage's score record, or None with why) from the judge's predictions for one feature."""
  if name == "simulation":
    if not task.simulate:
      return None, "no examples for this scorer"
    ok = [(p, np.nan_to_num(w.acts, nan=0.0)) for p, w in zip(preds, task.simulate) if p is not None]
    failed = len(preds) - len(ok)
    if len(ok) * 2 < len(preds) or not ok:
      return None, f"parse: {failed} of {len(preds)} examples unreadable"
    pred = np.concatenate([p for p, _ in ok])
    true = np.concatenate([t for _, t in ok])
    return {"spearman": _r(scoring.spearman(pred, true)), "pearson": _r(scoring.pearson(pred, true)),
            "tokens": int(pred.size), "examples": len(ok), "unreadable": failed}, None
  truth = {"detection": [y for _, y in task.detect], "fuzzing": [y for _, _, y in task.fuzz],
           "logits": [y for _, y in task.logit_tokens]}[name]
  if not truth:
    return None, "no examples for this scorer"
  answered = [(p, y) for p, y in zip(preds, truth) if p is not None]
  failed = len(truth) - len(answered)
  if len(answered) * 2 < len(truth) or not answered:
    return None, f"parse: {failed} of {len(truth)} answers unreadable"
  p, y = [a for a, _ in answered], [b for _, b in answered]
  value = scoring.accuracy(p, y) if name == "logits" else scoring.balanced_accuracy(p, y)
  key = "accuracy" if name == "logits" else "balanced_accuracy"
  if value is None:
    return None, "the answered examples hold one class only"
  return {key: _r(value), "n": len(answered), "unreadable": failed}, None


def _headline(rec: dict) -> float | None:
  sim = rec["scores"].get("simulation")
  return sim["spearman"] if sim else None


def run_unit(src: UnitSource, judge, features, *, scorers=SCORERS, seed: int = 0, on_chunk=None,
             log=print) -> dict[int, dict]:
  """Results {feature: record} for `features` of the unit, chunk by chunk (on_chunk(records) after each)."""
  features = sorted({int(i) for i in features})
  out: dict[int, dict] = {}
  t0 = time.time()
  pool = gather_pool(src, features, seed=seed)
  log(f"autointerp: {src.name}: contexts for {len(features):,} features from the run ({time.time() - t0:.0f}s)")
  for start in range(0, len(features), CHUNK):
    chunk = features[start:start + CHUNK]
    tasks = build_tasks(src, chunk, pool, seed=seed)
    recs = {t.index: {"explanation": None, "score": None, "scores": {}, "single_token": t.single_token,
                      "excluded": t.excluded, "errors": {}} for t in tasks}
    todo = [t for t in tasks if t.excluded is None]
    for t, (expl, err) in zip(todo, judge.explain(todo)):
      recs[t.index]["explanation"] = expl
      if err:
        recs[t.index]["errors"]["explain"] = err
    explained = [t for t in todo if recs[t.index]["explanation"]]
    expls = [recs[t.index]["explanation"] for t in explained]
    for name in scorers:
      for t, (preds, err) in zip(explained, judge.stage(name, explained, expls)):
        score, why = score_stage(name, t, preds) if preds is not None else (None, err)
        recs[t.index]["scores"][name] = score
        if why:
          recs[t.index]["errors"][name] = why
    for rec in recs.values():
      rec["score"] = _headline(rec)
    out.update(recs)
    if on_chunk:
      on_chunk(recs)
    log(f"autointerp: {src.name}: {len(out):,} of {len(features):,} features ({time.time() - t0:.0f}s)")
  return out


def summarize(records: dict[int, dict], scorers=SCORERS) -> dict:
  """Counts and score distributions of a unit's results."""
  recs = list(records.values())
  out = {"features": len(recs), "excluded": sum(1 for r in recs if r.get("excluded")),
         "explained": sum(1 for r in recs if r.get("explanation")),
         "single_token": sum(1 for r in recs if r.get("single_token")),
         "errors": {}}
  for r in recs:
    for stage, why in (r.get("errors") or {}).items():
      kind = "parse" if str(why).startswith("parse") else "no examples" if "examples for" in str(why) or "one class" in str(why) else "request"
      out["errors"].setdefault(stage, {}).setdefault(kind, 0)
      out["errors"][stage][kind] += 1
  for name in scorers:
    key = {"simulation": "spearman", "logits": "accuracy"}.get(name, "balanced_accuracy")
    vals = [r["scores"][name][key] for r in recs if (r.get("scores") or {}).get(name)
            and r["scores"][name].get(key) is not None]
    out[name] = {"n": len(vals), "mean": _r(float(np.mean(vals))) if vals else None,
                 "median": _r(float(np.median(vals))) if vals else None}
  return out


def header(judge, src: UnitSource, scorers, usage: dict | None, job: str | None = None) -> dict:
  return {"job": job, "backend": judge.backend, "model": judge.model, "baseline": bool(judge.baseline),
          "prompt_version": prompts.PROMPT_VERSION if not judge.baseline else "offline-baseline/1",
          "analysis": {"step": src.db.meta.get("step"), "n_tokens": src.db.n_tokens},
          "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "scorers": list(scorers),
          "usage": usage or {}}


def write(workdir: str, judge, src: UnitSource, records: dict[int, dict], scorers, usage=None, job=None) -> str:
  label = results_lib.label_for(judge.backend, judge.model)
  return results_lib.merge_write(workdir, label, src.name, header(judge, src, scorers, usage, job), records)
