"""The conversations autointerp has with a language model, and how their answers are read.

Every stage is one request per feature: a system prompt, the few-shot demonstrations (demos.py,
built by the same functions as the real prompt, so their format cannot drift) as earlier user and
assistant turns, then the feature's prompt. Token strings are JSON-quoted wherever a model must
echo or count them, so no token (a quote, "<<", a newline) can break the format. A reply that does
not parse is a parse failure, counted and reported, never a score of 0.
"""
from __future__ import annotations

import json
import re

import numpy as np

from monojax.autointerp.selection import Task, quantise
from monojax.autointerp.sources import Window

PROMPT_VERSION = "monojax-autointerp-prompts/1"

_INTRO = ("We are studying features of a small language model: each feature is a direction in its MLP layer that is "
          "active on some tokens of a text and off (0) on most. ")

EXPLAIN_SYSTEM = _INTRO + (
    "You will see text examples with the feature's activation on each token, as integers 0-9 (9 is the feature's "
    "strongest activation). Active tokens are marked <<like this>> and listed after the example with their values. "
    "Examples are grouped by how strongly the feature fires: the top activations, then lower intervals, then random "
    "text (where it is usually off), then its top tokens placed in other texts. You also see the tokens the feature "
    "most increases and most decreases in the model's next-token prediction. Think briefly about what the "
    "examples have in common, including what comes before the active token, then give a concise explanation of "
    "what the feature responds to. Do not list tokens; describe the pattern in a short phrase. Put the explanation, "
    "and nothing else, in <answer></answer> tags.")

SIMULATE_SYSTEM = _INTRO + (
    "Given an explanation of a feature, predict its activation on every token of each example below, as an "
    "integer 0-9 (0 = off, 9 = its strongest). Most tokens are 0. Each example is a JSON list of tokens. Reply with "
    "one line per example, `Example N: [v1, v2, ...]`, holding exactly one value per token, in order, and nothing else.")

DETECT_SYSTEM = _INTRO + (
    "Given an explanation of a feature, decide for each text example below whether the feature is active anywhere "
    "in it. Reply with one line per example, `Example N: 1` if it is active or `Example N: 0` if not, and nothing else.")

FUZZ_SYSTEM = _INTRO + (
    "Given an explanation of a feature, look at each text example below, in which some tokens are marked "
    "<<like this>>. Decide whether the marked tokens are exactly the ones where the feature (as explained) is active. "
    "Reply with one line per example, `Example N: 1` if the marks are right or `Example N: 0` if not, and nothing else.")

LOGITS_SYSTEM = _INTRO + (
    "When a feature is active, it makes the model more likely to predict some next tokens. Given an explanation of a "
    "feature, decide for each candidate token below whether it would plausibly come right after text where the "
    "feature is active. Reply with one line per token, `N: Y` or `N: N`, and nothing else.")

SYSTEMS = {"explain": EXPLAIN_SYSTEM, "simulation": SIMULATE_SYSTEM, "detection": DETECT_SYSTEM,
           "fuzzing": FUZZ_SYSTEM, "logits": LOGITS_SYSTEM}
MAX_TOKENS = {"explain": 600, "simulation": 2500, "detection": 300, "fuzzing": 300, "logits": 900}
MAX_EXPLANATION_CHARS = 400


class ParseError(ValueError):
  """A model's reply that does not have the asked format."""


def _q(s: str) -> str:
  return json.dumps(s, ensure_ascii=False)


def _kind_label(kind: str) -> str:
  return {"top": "top activations", "random": "random text"}.get(kind, kind)


# ------------------------------------------------------------------------------------ rendering

def marked_text(pieces: list[str], marked) -> str:
  """The example's text with the tokens at `marked` wrapped in << >>."""
  marked = {int(m) for m in marked}
  return "".join(f"<<{p}>>" if k in marked else p for k, p in enumerate(pieces))


def explain_example(n: int, w: Window, pieces: list[str], max_act: float) -> str:
  q = quantise(w.acts, max_act)
  active = [k for k in range(len(pieces)) if q[k] > 0]
  head = f"Example {n} ({_kind_label(w.kind)}): {marked_text(pieces, active)}"
  if not active:
    return head + "\n  activations: none"
  return head + "\n  activations: " + ", ".join(f"{_q(pieces[k])} {q[k]}" for k in active)


def explain_prompt(task: Task, pieces, vocab) -> str:
  """The feature's explanation prompt (the user turn)."""
  lines = ["Examples:"]
  lines += [explain_example(n + 1, w, pieces(w.tokens), task.max_act) for n, w in enumerate(task.explain)]
  lines.append("")
  lines.append("Tokens it most increases: " + ", ".join(_q(vocab[t]) for t in task.top_logits[:10]))
  lines.append("Tokens it most decreases: " + ", ".join(_q(vocab[t]) for t in task.bottom_logits[:10]))
  return "\n".join(lines)


def simulate_prompt(explanation: str, windows: list[Window], pieces) -> str:
  lines = [f"Explanation: {explanation}", ""]
  lines += [f"Example {n + 1}: [{', '.join(_q(p) for p in pieces(w.tokens))}]" for n, w in enumerate(windows)]
  return "\n".join(lines)


def detect_prompt(explanation: str, contexts: list[Window], pieces) -> str:
  lines = [f"Explanation: {explanation}", ""]
  lines += [f"Example {n + 1}: {_q(''.join(pieces(w.tokens)))}" for n, w in enumerate(contexts)]
  return "\n".join(lines)


def fuzz_prompt(explanation: str, items: list[tuple[Window, np.ndarray]], pieces) -> str:
  lines = [f"Explanation: {explanation}", ""]
  lines += [f"Example {n + 1}: {_q(marked_text(pieces(w.tokens), marks))}" for n, (w, marks) in enumerate(items)]
  return "\n".join(lines)


def logits_prompt(explanation: str, token_ids: list[int], vocab) -> str:
  lines = [f"Explanation: {explanation}", "", "Candidate next tokens:"]
  lines += [f"{n + 1}: {_q(vocab[t])}" for n, t in enumerate(token_ids)]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ parsing

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def parse_explanation(reply: str) -> str:
  """The text in the last <answer> tags, on one line; a missing or empty answer is a ParseError."""
  found = _ANSWER.findall(reply or "")
  if not found:
    raise ParseError("no <answer>…</answer> in the reply")
  text = " ".join(found[-1].split())
  if not text:
    raise ParseError("an empty <answer>")
  return text[:MAX_EXPLANATION_CHARS]


_EXAMPLE_LINE = re.compile(r"^\W*example\s+(\d+)\s*[:.)-]\s*(.*)$", re.IGNORECASE)


def _by_example(reply: str) -> dict[int, str]:
  out: dict[int, str] = {}
  for line in (reply or "").splitlines():
    m = _EXAMPLE_LINE.match(line.strip())
    if m and int(m.group(1)) not in out:
      out[int(m.group(1))] = m.group(2).strip()
  return out


def parse_simulation(reply: str, lengths: list[int]) -> list[np.ndarray | None]:
  """Per example, its predicted values (int 0-9) or None where that example's line is missing,
  not a list of integers, or of the wrong length."""
  lines = _by_example(reply)
  out: list[np.ndarray | None] = []
  for n, length in enumerate(lengths):
    body = lines.get(n + 1)
    vals = None
    if body is not None:
      m = re.search(r"\[([^\]]*)\]", body)
      items = (m.group(1) if m else body).replace(",", " ").split()
      try:
        nums = [round(float(x)) for x in items]
      except (ValueError, OverflowError):   # a word, or inf / 1e999
        nums = None
      if nums is not None and len(nums) == length:
        vals = np.clip(np.asarray(nums, np.int64), 0, 9)
    out.append(vals)
  return out


def parse_binary(reply: str, n: int) -> list[bool | None]:
  """Per example 1..n: True/False from `Example N: 1|0` (or yes/no), None where missing or unclear."""
  lines = _by_example(reply)
  return [_yes_no(lines.get(k + 1)) for k in range(n)]


_TOKEN_LINE = re.compile(r"^\W*(\d+)\s*[:.)-]\s*(.*)$")


def parse_yes_no_list(reply: str, n: int) -> list[bool | None]:
  """Per candidate 1..n: True/False from `N: Y|N`, None where missing or unclear."""
  got: dict[int, str] = {}
  for line in (reply or "").splitlines():
    m = _TOKEN_LINE.match(line.strip())
    if m and int(m.group(1)) not in got:
      got[int(m.group(1))] = m.group(2)
  return [_yes_no(got.get(k + 1)) for k in range(n)]


def _yes_no(body: str | None) -> bool | None:
  if body is None:
    return None
  word = body.strip().strip("*`'\".").split()
  if not word:
    return None
  w = word[0].strip("*`'\".,").lower()
  if w in ("1", "y", "yes", "true"):
    return True
  if w in ("0", "n", "no", "false"):
    return False
  return None
