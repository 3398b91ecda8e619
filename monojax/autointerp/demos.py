"""Few-shot demonstrations: made-up features (not from any run, so no feature is explained by its
own answer), written by hand, rendered by the same prompt builders as real features. The paper used
8 human demonstrations with chain-of-thought; these are 3 for explaining and 1-2 per scorer.

Each demo example is a list of (token string, activation 0-9)."""
from __future__ import annotations

import numpy as np

from monojax import text as text_lib
from monojax.autointerp import prompts
from monojax.autointerp.sources import Window

# (kind, [(piece, activation 0-9), ...])
_PARENS = [
    ("top", [("    ", 0), ("return", 0), (" f", 0), ("(", 0), ("x", 0), (",", 0), (" y", 0), (")", 9), ("\n", 0)]),
    ("top", [("print", 0), ("(", 0), ("len", 0), ("(", 0), ("items", 0), (")", 8), (")", 9), ("\n", 0)]),
    ("interval 4", [("if", 0), (" ok", 0), (" and", 0), (" check", 0), ("(", 0), ("a", 0), (")", 6), (":", 0)]),
    ("interval 9", [("The", 0), (" result", 0), (" (", 0), ("see", 0), (" below", 0), (")", 1), (" is", 0)]),
    ("random", [("The", 0), (" river", 0), (" flows", 0), (" north", 0), (" through", 0), (" the", 0), (" valley", 0)]),
]
_CYRILLIC = [
    ("top", [("Это", 9), (" был", 8), (" очень", 9), (" тих", 7), ("ий", 6), (" вечер", 8), (".", 2)]),
    ("interval 3", [("He", 0), (" said", 0), (" \"", 0), ("да", 6), ("\"", 1), (" and", 0), (" left", 0)]),
    ("interval 8", [("Moscow", 0), (" (", 0), ("Моск", 2), ("ва", 2), (")", 0), (" is", 0)]),
    ("random", [("int", 0), (" main", 0), ("(", 0), ("void", 0), (")", 0), (" {", 0)]),
]
_YEARS = [
    ("top", [("Smith", 0), (" et", 0), (" al", 0), (".", 0), (" (", 0), ("19", 8), ("98", 9), (")", 0), (" showed", 0)]),
    ("top", [("as", 0), (" reported", 0), (" by", 0), (" Lee", 0), (" (", 0), ("20", 7), ("03", 9), (")", 0)]),
    ("interval 5", [("In", 0), (" ", 0), ("17", 4), ("89", 5), (",", 0), (" the", 0), (" revolution", 0)]),
    ("interval 10", [("page", 0), (" ", 0), ("12", 1), (" of", 0), (" the", 0), (" manual", 0)]),
    ("random", [("She", 0), (" opened", 0), (" the", 0), (" door", 0), (" and", 0), (" smiled", 0)]),
]

_EXPLAIN_DEMOS = [
    (_PARENS, ['"a"', '"b"', '"c"'], ['"("', '" the"', '" of"'],
     ("The strongest activations are on a closing parenthesis that ends a call's argument list in code; prose "
      "parentheses barely fire and plain text does not.\n<answer>closing parentheses ending function calls in "
      "code</answer>")),
    (_CYRILLIC, ['" и"', '" в"', '"ы"'], ['" the"', '" and"', '"."'],
     ("Every active token is Cyrillic, in full Russian sentences or single words inside English text; Latin text "
      "and code are off.\n<answer>Russian (Cyrillic) text</answer>")),
    (_YEARS, ['")"', '","', '" and"'], ['" the"', '" a"', '" of"'],
     ("It fires on digits that form a year, most strongly in parenthesised citations, weakly on other numbers.\n"
      "<answer>years in citations and dates</answer>")),
]


def _window(spec) -> tuple[Window, list[str]]:
  kind, toks = spec
  pieces = [text_lib.visible(p) for p, _ in toks]
  acts = np.asarray([a for _, a in toks], np.float32)
  return Window(np.arange(len(pieces)), acts, kind, center=int(np.argmax(acts))), pieces


def _render_explain(examples, increases, decreases) -> str:
  lines = ["Examples:"]
  for n, spec in enumerate(examples):
    w, pieces = _window(spec)
    lines.append(prompts.explain_example(n + 1, w, pieces, 9.0))
  lines += ["", "Tokens it most increases: " + ", ".join(increases),
            "Tokens it most decreases: " + ", ".join(decreases)]
  return "\n".join(lines)


def explain_turns() -> list[dict]:
  turns = []
  for examples, inc, dec, answer in _EXPLAIN_DEMOS:
    turns += [{"role": "user", "content": _render_explain(examples, inc, dec)},
              {"role": "assistant", "content": answer}]
  return turns


def _demo(specs) -> tuple[list[Window], callable]:
  """The demo contexts as Windows whose token ids index one list of the demo's own pieces, and the
  pieces function the prompt builders call with them."""
  pieces, windows = [], []
  for kind, toks in specs:
    ids = np.arange(len(pieces), len(pieces) + len(toks))
    pieces += [text_lib.visible(p) for p, _ in toks]
    windows.append(Window(ids, np.asarray([a for _, a in toks], np.float32), kind))
  return windows, lambda ids: [pieces[int(i)] for i in ids]


def simulate_turns() -> list[dict]:
  specs = [_YEARS[2], _YEARS[4], _YEARS[0]]
  windows, pieces = _demo(specs)
  user = prompts.simulate_prompt("years in citations and dates", windows, pieces)
  answer = "\n".join(f"Example {n + 1}: [{', '.join(str(a) for _, a in t)}]" for n, (_, t) in enumerate(specs))
  return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def detect_turns() -> list[dict]:
  specs = [_CYRILLIC[3], _CYRILLIC[0], _PARENS[4], _CYRILLIC[1]]
  windows, pieces = _demo(specs)
  user = prompts.detect_prompt("Russian (Cyrillic) text", windows, pieces)
  answer = "\n".join(f"Example {n + 1}: {int(any(a > 0 for _, a in t))}" for n, (_, t) in enumerate(specs))
  return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def fuzz_turns() -> list[dict]:
  specs = [(_PARENS[0], [7], 1), (_PARENS[1], [1, 2], 0), (_PARENS[2], [6], 1), (_PARENS[1], [5, 6], 1)]
  windows, pieces = _demo([spec for spec, _, _ in specs])
  user = prompts.fuzz_prompt("closing parentheses ending function calls in code",
                             [(w, np.asarray(m)) for w, (_, m, _) in zip(windows, specs)], pieces)
  answer = "\n".join(f"Example {n + 1}: {ok}" for n, (_, _, ok) in enumerate(specs))
  return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def logits_turns() -> list[dict]:
  cands = [(" и", "Y"), (" the", "N"), ("ого", "Y"), (" function", "N"), (" что", "Y"), (";", "N")]
  vocab = [c for c, _ in cands]
  user = prompts.logits_prompt("Russian (Cyrillic) text", list(range(len(cands))), vocab)
  answer = "\n".join(f"{n + 1}: {a}" for n, (_, a) in enumerate(cands))
  return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


TURNS = {"explain": explain_turns, "simulation": simulate_turns, "detection": detect_turns, "fuzzing": fuzz_turns,
         "logits": logits_turns}
