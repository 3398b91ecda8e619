"""Autointerp results of a run, beside its feature database: what python -m monojax.autointerp wrote
and what the database records, the inspector and the report read.

Layout: RUN/autointerp/<label>/<unit>.json, one file per (backend and model, unit), where label is
"offline-baseline" or "<backend>-<model>" (e.g. "anthropic-claude-haiku-4-5"). A file:
  {"schema": "monojax-autointerp/1", "unit", "label", "backend", "model", "baseline": bool,
   "prompt_version", "analysis": {"step", "n_tokens"}, "updated", "scorers": [...], "usage": {...}
   (the last job's), "jobs": [{"job", "updated", "usage"}, ...] (every job's),
   "features": {"<i>": {"explanation": str | None, "score": float | None (the simulation's
                        Spearman: the paper's score), "scores": {scorer: {...} | None},
                        "single_token": bool, "excluded": str | None, "errors": {stage: str}}}}
RUN/autointerp/cache.sqlite is the LLM reply cache (no keys in it). Readers (the database record,
the inspector) take each feature from the preferred label that has it: the newest model's results
over the offline baseline, which is only the floor; the report shows every label apart.
"""
from __future__ import annotations

import json
import os
import re

from monojax import errors, files

SCHEMA = "monojax-autointerp/1"
DIRNAME = "autointerp"
BASELINE = "offline-baseline"


def autointerp_dir(workdir: str) -> str:
  return os.path.join(workdir, DIRNAME)


def label_for(backend: str, model: str | None) -> str:
  if backend == "offline":
    return BASELINE
  slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(model or "default")).strip("-.") or "default"
  return f"{backend}-{slug[:80]}"


def results_path(workdir: str, label: str, unit: str) -> str:
  return os.path.join(autointerp_dir(workdir), label, f"{unit}.json")


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("features"), dict):
    return None
  return doc


def labels(workdir: str) -> list[str]:
  """The labels with results in this run, preferred first: model results newest first, then the
  offline baseline."""
  root = autointerp_dir(workdir)
  if not os.path.isdir(root):
    return []
  found = []
  for name in os.listdir(root):
    d = os.path.join(root, name)
    if os.path.isdir(d) and any(f.endswith(".json") for f in os.listdir(d)):
      newest = max(os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".json"))
      found.append((name == BASELINE, -newest, name))
  return [name for _, _, name in sorted(found)]


def load(workdir: str, unit: str, label: str | None = None) -> dict | None:
  """A unit's results document (features keyed by int) from `label`; None when there are none.
  Without a label, every label's results merged feature by feature in preference order (a model's
  explanation where it ran, else the baseline's): the header is the preferred label's, and each
  feature record says its own "label" and "baseline"."""
  docs = []
  for lab in ([label] if label else labels(workdir)):
    doc = _read(results_path(workdir, lab, unit))
    if doc is not None:
      docs.append(dict(doc, features={int(k): v for k, v in doc["features"].items() if isinstance(v, dict)}))
  if not docs:
    return None
  if label:
    return docs[0]
  merged: dict[int, dict] = {}
  for doc in reversed(docs):   # preferred last, so it wins (unless its request failed: no explanation)
    for i, rec in doc["features"].items():
      if i not in merged or rec.get("explanation") or rec.get("excluded"):
        merged[i] = dict(rec, label=doc.get("label"), baseline=bool(doc.get("baseline")))
  return dict(docs[0], features=merged, labels=[d.get("label") for d in docs])


def merge_write(workdir: str, label: str, unit: str, header: dict, features: dict[int, dict]) -> str:
  """Writes (atomically) the unit's results under `label`, keeping features of an earlier call with
  the same prompt version and analysis (a run over 0:200, then 200:400, fills one file)."""
  path = results_path(workdir, label, unit)
  old = _read(path)
  merged: dict[str, dict] = {}
  if old and old.get("prompt_version") == header.get("prompt_version") and old.get("analysis") == header.get("analysis"):
    merged.update(old["features"])
  merged.update({str(int(i)): rec for i, rec in features.items()})
  # Every job's usage is kept (a re-run from the cache costs 0 and must not hide what the first paid).
  jobs = [j for j in ((old or {}).get("jobs") or []) if j.get("job") != header.get("job")]
  jobs.append({"job": header.get("job"), "updated": header.get("updated"), "usage": header.get("usage") or {}})
  doc = dict(header, schema=SCHEMA, unit=unit, label=label, jobs=jobs,
             features=dict(sorted(merged.items(), key=lambda kv: int(kv[0]))))
  if os.path.exists(path) and not os.path.isfile(path):
    raise errors.UserInputError(f"{path}: exists and is not a file")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.atomic_write_json(path, doc)
  return path


def total_cost(doc: dict) -> float | None:
  """USD spent by every job that wrote this file (None when a job's price was unknown)."""
  total = 0.0
  for j in doc.get("jobs") or [{"usage": doc.get("usage") or {}}]:
    u = j.get("usage") or {}
    if u and not u.get("cost_known", True):
      return None
    total += float(u.get("cost_usd") or 0.0)
  return total


def feature_summary(rec: dict) -> dict:
  """The part of a feature's record the inspector and the database show."""
  return {k: rec.get(k) for k in ("explanation", "score", "scores", "single_token", "excluded", "errors", "label",
                                  "baseline")}
