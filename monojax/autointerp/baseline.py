"""The offline baseline: autointerp with no language model, so the whole pipeline runs (and is
tested) on a machine without API access, and every model's score has a floor to beat.

Its explanation is built from the statistics of the examples an explainer would see: the tokens
carrying most of the (quantised) activation, the script they are written in when one dominates, and
the token that most often comes right before them. It is written in a fixed form that names it,
  offline baseline: active on [" the", " a"]; mostly Cyrillic text; often right after [" of"]
and its simulator, detector and logit judge read only that sentence (as a model would), never the
examples. It is weak on purpose — a lookup table — and is named a baseline wherever it appears.
"""
from __future__ import annotations

import collections
import json
import re
import unicodedata

import numpy as np

from monojax.autointerp.selection import Task, quantise

PREFIX = "offline baseline: "
MAX_TOKENS = 8
TOKEN_MASS = 0.6      # list tokens until they carry this share of the activation
SCRIPT_SHARE = 0.8    # name a script when this share of the activation is on it (Latin is never named: too common)
AFTER_SHARE = 0.5


def script_of(s: str) -> str:
  """The writing system of a token string: the script of most of its letters (LATIN, CYRILLIC, CJK,
  ...), else "digits", "punctuation" or "space"."""
  counts: collections.Counter = collections.Counter()
  digits = punct = 0
  for ch in s:
    if ch.isalpha():
      name = unicodedata.name(ch, "")
      word = name.split(" ")[0] if name else "OTHER"
      counts["CJK" if word in ("CJK", "HIRAGANA", "KATAKANA") else word] += 1
    elif ch.isdigit():
      digits += 1
    elif not ch.isspace() and ch not in "⏎⇥":
      punct += 1
  if counts:
    return counts.most_common(1)[0][0]
  if digits:
    return "digits"
  return "punctuation" if punct else "space"


def explain(task: Task, pieces) -> str:
  """The baseline's explanation of a feature from its explanation examples."""
  mass: collections.Counter = collections.Counter()
  scripts: collections.Counter = collections.Counter()
  before: collections.Counter = collections.Counter()
  for w in task.explain:
    q = quantise(w.acts, task.max_act)
    ps = pieces(w.tokens)
    for k in np.nonzero(q > 0)[0]:
      if not ps[k]:   # the first bytes of a character split over tokens: no text of its own
        continue
      mass[ps[k]] += int(q[k])
      scripts[script_of(ps[k])] += int(q[k])
      if k > 0:
        before[ps[k - 1]] += int(q[k])
  total = sum(mass.values())
  if not total:
    return PREFIX + "active on []"
  toks, got = [], 0
  for tok, m in mass.most_common(MAX_TOKENS):
    if got >= TOKEN_MASS * total:
      break
    toks.append(tok)
    got += m
  out = PREFIX + "active on " + json.dumps(toks, ensure_ascii=False)
  script, share = scripts.most_common(1)[0]
  if share >= SCRIPT_SHARE * total and script not in ("LATIN", "space"):
    out += f"; mostly {script.capitalize() if script.isupper() else script} text"
  if before:
    prev, share = before.most_common(1)[0]
    if share >= AFTER_SHARE * total:
      out += "; often right after " + json.dumps([prev], ensure_ascii=False)
  return out


_SCRIPT = re.compile(r"; mostly (\S+) text")


def read(explanation: str) -> dict:
  """The baseline sentence's parts: {"tokens": [...], "script": str | None, "after": [...]}."""
  dec = json.JSONDecoder()
  out = {"tokens": [], "script": None, "after": []}
  i = explanation.find("active on ")
  if i >= 0:
    out["tokens"], _ = dec.raw_decode(explanation, i + len("active on "))
  m = _SCRIPT.search(explanation)
  if m:
    out["script"] = m.group(1).upper() if m.group(1) not in ("digits", "punctuation") else m.group(1)
  j = explanation.rfind("; often right after ")
  if j >= 0:
    out["after"], _ = dec.raw_decode(explanation, j + len("; often right after "))
  return out


def predict(spec: dict, ps: list[str]) -> np.ndarray:
  """Predicted activations 0-9 on the tokens `ps` from the explanation's parts."""
  rank = {t: k for k, t in enumerate(spec["tokens"])}
  after = set(spec["after"])
  out = np.zeros(len(ps), np.int64)
  for k, p in enumerate(ps):
    v = 0
    if p in rank:
      v = max(4, 9 - rank[p])
    if spec["script"] and script_of(p) == spec["script"]:
      v = max(v, 3)
    if k > 0 and ps[k - 1] in after:
      v = max(v, 2)
    out[k] = v
  return out


def simulate(explanation: str, windows, pieces) -> list[np.ndarray]:
  spec = read(explanation)
  return [predict(spec, pieces(w.tokens)) for w in windows]


def detect(explanation: str, windows, pieces) -> list[bool]:
  spec = read(explanation)
  return [bool(predict(spec, pieces(w.tokens)).max(initial=0) > 0) for w in windows]


def fuzz(explanation: str, items, pieces) -> list[bool]:
  spec = read(explanation)
  return [bool(len(marks) and (predict(spec, pieces(w.tokens))[np.asarray(marks, int)] > 0).all()) for w, marks in items]


def logits(explanation: str, token_ids, vocab) -> list[bool]:
  spec = read(explanation)
  toks = set(spec["tokens"])
  return [vocab[t] in toks or (spec["script"] is not None and script_of(vocab[t]) == spec["script"]) for t in token_ids]
