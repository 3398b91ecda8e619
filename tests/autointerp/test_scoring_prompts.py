"""Pure unit tests of autointerp (no run, no model): the scorers against hand-computed values and a
naive reference, quantisation, the prompt builders (JSON quoting of hostile tokens, marks), the
parsers on well-formed and malformed replies, the few-shot demonstrations (their answers are in the
format each stage asks for), the offline baseline, a stage's score record, --features, and the
results files (merge, labels)."""
import json
import re
import signal

import numpy as np
import pytest

from monojax import errors
from monojax.analysis import explanations
from monojax.autointerp import baseline, demos, pipeline, prompts, runner, scoring, selection
from monojax.autointerp.sources import Window

# ------------------------------------------------------------------------------------ scoring


def naive_ranks(x):
  """O(n²) average ranks: 1 + (values below) + (ties − 1) / 2."""
  x = list(x)
  return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]


def naive_pearson(a, b):
  n = len(a)
  ma, mb = sum(a) / n, sum(b) / n
  cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
  va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
  return cov / (va * vb) ** 0.5


def test_pearson_spearman_hand_computed():
  assert scoring.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert scoring.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # means 2 and 13/3: cov 5, var 2 and 114/9
  assert scoring.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / 228 ** 0.5)
  assert scoring.spearman([1, 2, 3], [2, 4, 7]) == pytest.approx(1.0)
  assert scoring.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)   # 1 - 6·2/(4·15)
  # ties: ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4] → 4.5 / √(4.5 · 5) = 3/√10
  assert scoring.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / 10 ** 0.5)
  want = naive_pearson([2, 2, 4, 2], [1.5, 3, 4, 1.5])
  assert scoring.spearman([0, 0, 9, 0], [0.0, 0.1, 5.0, 0.0]) == pytest.approx(want)


def test_spearman_against_naive_reference_with_ties():
  rng = np.random.default_rng(0)
  for n in (2, 3, 7, 30, 101):
    for _ in range(5):
      pred = rng.integers(0, 10, n)                   # 0-9 predictions: many ties
      true = np.round(rng.exponential(1.0, n) * (rng.random(n) < 0.4), 1)  # mostly 0: ties in the truth too
      if len(set(pred)) < 2 or len(set(true)) < 2:
        continue
      want = naive_pearson(naive_ranks(pred), naive_ranks(true))
      assert scoring.spearman(pred, true) == pytest.approx(want, abs=1e-12)
      assert scoring.pearson(pred, true) == pytest.approx(naive_pearson(list(pred), list(true)), abs=1e-12)
  assert list(scoring._ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))) == naive_ranks([3, 1, 3, 2, 3]) == [4, 1, 4, 2, 4]


def test_constant_prediction_or_truth_scores_zero():
  for s in (scoring.spearman, scoring.pearson):
    assert s([0, 0, 0, 0], [0.0, 1.0, 2.0, 0.5]) == 0.0    # "all zeros" scores 0, as in the paper
    assert s([3, 1, 2, 0], [0.0, 0.0, 0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
      s([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
      s([1], [1])


def test_balanced_accuracy_and_accuracy():
  pred, truth = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
  # TPR 2/2, TNR 2/3
  assert scoring.balanced_accuracy(pred, truth) == pytest.approx((1 + 2 / 3) / 2)
  assert scoring.accuracy(pred, truth) == pytest.approx(4 / 5)
  # imbalanced: always "yes" is chance (0.5) in balanced accuracy, 0.9 in accuracy
  truth = [True] * 9 + [False]
  assert scoring.balanced_accuracy([True] * 10, truth) == 0.5
  assert scoring.accuracy([True] * 10, truth) == pytest.approx(0.9)
  assert scoring.balanced_accuracy([False, True, False], [False, True, True]) == pytest.approx(0.75)
  assert scoring.balanced_accuracy([True, False], [True, True]) is None     # one class
  assert scoring.balanced_accuracy([True, False], [False, False]) is None
  assert scoring.accuracy([True, False], [True, True]) == 0.5               # accuracy needs no second class
  assert scoring.accuracy([], []) is None


def test_quantise():
  got = selection.quantise([10.0, 5.0, 0.0, np.nan, 2.5, -1.0, 12.0, 6.1], 10.0)
  # 9·a/10 = 9, 4.5 (half to even: 4), 0, NaN → 0, 2.25, −0.9 (clipped), 10.8 (clipped), 5.49
  assert got.tolist() == [9, 4, 0, 0, 2, 0, 9, 5] and got.dtype == np.int64
  assert selection.quantise([1.0], 2.0).tolist() == [4]                      # 4.5 → 4
  assert selection.quantise([11.0], 18.0).tolist() == [6]                    # 5.5 → 6 (half to even)
  assert selection.quantise([np.nan, np.nan], 3.0).tolist() == [0, 0]
  for bad_max in (0.0, -1.0, np.nan):
    assert selection.quantise([1.0, 2.0, np.nan], bad_max).tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------------ prompts

HOSTILE_PIECES = ['"', "<<", ">>", "\n", "</answer>", 'a"b\\', "<answer>x</answer>", '", "', "] [", "Example 2: [0]",
                  "\\u0041", " plain", "Привет", "}{"]


def table_pieces(table):
  return lambda ids: [table[int(t)] if int(t) >= 0 else "" for t in ids]


def win(ids, acts, kind="top", seq=-1, pos=-1, center=None):
  ids = np.asarray(ids, np.int64)
  return Window(ids, np.asarray(acts, np.float32), kind, seq, pos, len(ids) // 2 if center is None else center)


def example_lines(prompt):
  """{N: the rest of the line} of `Example N: ...` lines (split on \\n only, as a model reads lines)."""
  out = {}
  for line in prompt.split("\n"):
    m = re.match(r"^Example (\d+): (.*)$", line)
    if m:
      out[int(m.group(1))] = m.group(2)
  return out


def test_marked_text_marks_exactly_the_given_positions():
  pieces = ["a", "b", "c", "d"]
  assert prompts.marked_text(pieces, [1, 3]) == "a<<b>>c<<d>>"
  assert prompts.marked_text(pieces, np.array([0])) == "<<a>>bcd"
  assert prompts.marked_text(pieces, []) == "abcd"
  assert prompts.marked_text(pieces, [0, 1, 2, 3]) == "<<a>><<b>><<c>><<d>>"


def test_explain_example_quantises_and_lists_active_tokens():
  w = win([0, 1, 2, 3], [0.0, 5.0, 10.0, np.nan], kind="top")
  got = prompts.explain_example(1, w, ["a", "b", "c", "d"], 10.0)
  assert got == 'Example 1 (top activations): a<<b>><<c>>d\n  activations: "b" 4, "c" 9'
  got = prompts.explain_example(7, win([0, 1], [0.0, 0.0], kind="random"), ["x", "y"], 10.0)
  assert got == "Example 7 (random text): xy\n  activations: none"
  got = prompts.explain_example(2, win([0], [0.4], kind="interval 3"), ["z"], 10.0)
  assert got == "Example 2 (interval 3): z\n  activations: none"


def test_builders_json_quote_hostile_tokens():
  table = HOSTILE_PIECES
  pieces = table_pieces(table)
  n = len(table)
  windows = [win(np.arange(n), np.linspace(0, 9, n)), win(np.arange(n)[::-1], np.zeros(n)),
             win([4, 3, 0], [1.0, 0.0, 2.0])]
  # simulation: each example is a JSON list of exactly its tokens
  p = prompts.simulate_prompt("expl", windows, pieces)
  lines = example_lines(p)
  assert sorted(lines) == [1, 2, 3]
  for k, w in enumerate(windows):
    assert json.loads(lines[k + 1]) == pieces(w.tokens)
  # detection: each example is one JSON string of its text
  lines = example_lines(prompts.detect_prompt("expl", windows, pieces))
  assert [json.loads(lines[k + 1]) for k in range(3)] == ["".join(pieces(w.tokens)) for w in windows]
  # fuzzing: each example is one JSON string of its marked text
  items = [(windows[0], np.array([0, 4])), (windows[2], np.array([1]))]
  lines = example_lines(prompts.fuzz_prompt("expl", items, pieces))
  assert json.loads(lines[1]) == prompts.marked_text(pieces(windows[0].tokens), [0, 4])
  assert json.loads(lines[2]) == '</answer><<\n>>"'
  # logits: `N: "token"`
  p = prompts.logits_prompt("expl", list(range(n)), table)
  got = {int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^(\d+): (.*)$", p, re.MULTILINE)}
  assert got == {k + 1: t for k, t in enumerate(table)}
  # explanation: the activation list and the logit tokens parse back
  task = selection.Task("sae0", 0, 9.0, windows, [], [], [], [], list(range(10)), list(range(4, 14)), False)
  p = prompts.explain_prompt(task, pieces, table)
  acts_lines = [line for line in p.split("\n") if line.startswith("  activations: ") and not line.endswith("none")]
  assert len(acts_lines) == 2
  dec = json.JSONDecoder()
  body, listed, i = acts_lines[0][len("  activations: "):], [], 0
  while i < len(body):
    s, i = dec.raw_decode(body, i)
    m = re.match(r" (\d)(, )?", body[i:])
    listed.append((s, int(m.group(1))))
    i += m.end()
  q = selection.quantise(windows[0].acts, 9.0)
  assert listed == [(table[t], int(q[k])) for k, t in enumerate(windows[0].tokens) if q[k] > 0]
  inc = next(line for line in p.split("\n") if line.startswith("Tokens it most increases: "))
  dec_line = next(line for line in p.split("\n") if line.startswith("Tokens it most decreases: "))
  assert json.loads("[" + inc.split(": ", 1)[1] + "]") == table[:10]
  assert json.loads("[" + dec_line.split(": ", 1)[1] + "]") == table[4:14]


def test_parse_explanation():
  assert prompts.parse_explanation("thinking...\n<answer>closing parens</answer>") == "closing parens"
  assert prompts.parse_explanation("<ANSWER> Years \n\t in   citations </Answer>") == "Years in citations"
  reply = "<answer>a draft</answer> no wait <answer>the final one</answer> ok"
  assert prompts.parse_explanation(reply) == "the final one"
  assert prompts.parse_explanation("<answer>multi\nline\nanswer</answer>") == "multi line answer"
  long = prompts.parse_explanation("<answer>" + "word " * 300 + "</answer>")
  assert len(long) == prompts.MAX_EXPLANATION_CHARS and long.startswith("word word")
  for bad in ("closing parentheses", "", None, "<answer>unclosed", "<answer>  \n </answer>", "<answer></answer>"):
    with pytest.raises(prompts.ParseError):
      prompts.parse_explanation(bad)


def test_parse_simulation():
  reply = "Example 1: [0, 0, 9]\nExample 2: [1,2]\nExample 3: 4 5 6 7"
  got = prompts.parse_simulation(reply, [3, 2, 4])
  assert [g.tolist() for g in got] == [[0, 0, 9], [1, 2], [4, 5, 6, 7]]
  assert all(g.dtype == np.int64 for g in got)
  # chatter lines are ignored; markdown around the label is fine
  reply = "Sure! Here are my predictions.\n\n**Example 1:** [0, 3]\n- Example 2: [9, 0, 0]\nHope this helps."
  assert [g.tolist() for g in prompts.parse_simulation(reply, [2, 3])] == [[0, 3], [9, 0, 0]]
  # per example: wrong length, missing, not numbers → None; the others still parse
  reply = "Example 1: [0, 0]\nExample 3: [a, b, c]\nExample 4: [1, 2, 3]\nExample 5: []"
  got = prompts.parse_simulation(reply, [3, 2, 3, 3, 1])
  assert got[0] is None and got[1] is None and got[2] is None and got[3].tolist() == [1, 2, 3] and got[4] is None
  # clipped to 0..9 and rounded
  got = prompts.parse_simulation("Example 1: [-3, 12, 4.6, 0.2, 9]", [5])
  assert got[0].tolist() == [0, 9, 5, 0, 9]
  # the first line for an example counts
  assert prompts.parse_simulation("Example 1: [1]\nExample 1: [2]", [1])[0].tolist() == [1]
  assert prompts.parse_simulation("", [2, 2]) == [None, None]
  assert prompts.parse_simulation(None, [1]) == [None]


def test_parse_simulation_infinite_values_are_unreadable():
  assert prompts.parse_simulation("Example 1: [inf, 0]\nExample 2: [0, 1]", [2, 2])[0] is None
  assert prompts.parse_simulation("Example 1: [1e999, 0]", [2]) == [None]


def test_parse_simulation_nan_is_unreadable():
  got = prompts.parse_simulation("Example 1: [nan, 0]\nExample 2: [0, 1]", [2, 2])
  assert got[0] is None and got[1].tolist() == [0, 1]


def test_parse_binary_and_yes_no_list():
  reply = "Example 1: 1\nExample 2: 0\nExample 3: yes\nExample 4: No.\nexample 5: Y\nExample 6: n\nExample 7: **1**"
  assert prompts.parse_binary(reply, 7) == [True, False, True, False, True, False, True]
  reply = "Let me look.\nExample 1: maybe\nExample 3: 1 (the marks are right)\nExample 4: true\nExample 5:\nthanks"
  assert prompts.parse_binary(reply, 6) == [None, None, True, True, None, None]
  assert prompts.parse_binary("Example 1: 2\nExample 2: 10\nExample 3: [1]", 3) == [None, None, None]
  assert prompts.parse_binary("", 2) == [None, None]
  assert prompts.parse_binary(None, 1) == [None]
  reply = "1: Y\n2: N\n3: yes\n4: no\n5. Y\n6) N\n7: 1\n8: 0\n9: perhaps\n11: Y\nsome chatter 12: Y"
  assert prompts.parse_yes_no_list(reply, 12) == [True, False, True, False, True, False, True, False, None, None, True,
                                                  None]
  assert prompts.parse_yes_no_list("1: Y\n1: N", 1) == [True]
  assert prompts.parse_yes_no_list("garbage", 2) == [None, None]
  assert prompts.parse_yes_no_list("", 0) == []


# ------------------------------------------------------------------------------------ few-shot demonstrations

def _json_lists(user):
  return [json.loads(v) for _, v in sorted(example_lines(user).items())]


@pytest.mark.parametrize("stage", sorted(demos.TURNS))
def test_demos_alternate_and_answers_parse(stage):
  turns = demos.TURNS[stage]()
  assert stage in prompts.SYSTEMS and stage in prompts.MAX_TOKENS
  assert len(turns) >= 2 and len(turns) % 2 == 0
  assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
  assert all(isinstance(t["content"], str) and t["content"].strip() for t in turns)
  for user, answer in zip(turns[::2], turns[1::2]):
    user, answer = user["content"], answer["content"]
    if stage == "explain":
      assert user.startswith("Examples:\nExample 1 (") and "Tokens it most increases: " in user
      assert prompts.parse_explanation(answer)
    elif stage == "simulation":
      lists = _json_lists(user)
      got = prompts.parse_simulation(answer, [len(x) for x in lists])
      assert all(g is not None for g in got) and any(g.max() > 0 for g in got)
    elif stage in ("detection", "fuzzing"):
      lines = example_lines(user)
      assert sorted(lines) == list(range(1, len(lines) + 1))
      for v in lines.values():
        json.loads(v)
      got = prompts.parse_binary(answer, len(lines))
      assert None not in got and True in got and False in got
      assert prompts.parse_binary(answer, len(lines) + 1)[-1] is None   # no answer for an example not shown
    else:
      cands = re.findall(r"^(\d+): (.*)$", user, re.MULTILINE)
      for _, v in cands:
        json.loads(v)
      got = prompts.parse_yes_no_list(answer, len(cands))
      assert None not in got and True in got and False in got


def test_demo_answers_match_their_examples():
  # simulation: the demo answer's values are its examples' activations; detection: 1 ⇔ an active token
  [user, answer] = [t["content"] for t in demos.simulate_turns()]
  lists = _json_lists(user)
  specs = [demos._YEARS[2], demos._YEARS[4], demos._YEARS[0]]
  assert lists == [[p for p, _ in t] for _, t in specs]
  assert [g.tolist() for g in prompts.parse_simulation(answer, [len(x) for x in lists])] == \
      [[a for _, a in t] for _, t in specs]
  [user, answer] = [t["content"] for t in demos.detect_turns()]
  specs = [demos._CYRILLIC[3], demos._CYRILLIC[0], demos._PARENS[4], demos._CYRILLIC[1]]
  assert prompts.parse_binary(answer, 4) == [any(a > 0 for _, a in t) for _, t in specs]


# ------------------------------------------------------------------------------------ offline baseline

def test_script_of():
  assert baseline.script_of(" the") == "LATIN"
  assert baseline.script_of("Привет") == "CYRILLIC"
  assert baseline.script_of("漢字") == "CJK"
  assert baseline.script_of("ひらがな") == "CJK" and baseline.script_of("カタ") == "CJK"
  assert baseline.script_of("مرحبا") == "ARABIC"
  assert baseline.script_of("1998") == "digits"
  assert baseline.script_of("(),!") == "punctuation"
  assert baseline.script_of(" ") == baseline.script_of("⏎⇥") == baseline.script_of("") == "space"
  assert baseline.script_of("a1") == "LATIN" and baseline.script_of("x мир") == "CYRILLIC"   # most letters win


def _task(explain, max_act=9.0):
  return selection.Task("sae0", 3, max_act, explain, [], [], [], [], [], [], False)


def test_baseline_explain_read_round_trip():
  table = ["The", 'до"м', " мир", " of", ".", " x"]
  pieces = table_pieces(table)
  ws = [win([0, 3, 1, 4], [0, 0, 9, 0]), win([3, 2, 5], [0, 9, 0]), win([5, 5], [0, 0], kind="random")]
  expl = baseline.explain(_task(ws), pieces)
  assert expl == 'offline baseline: active on ["до\\"м", " мир"]; mostly Cyrillic text; often right after [" of"]'
  assert baseline.read(expl) == {"tokens": ['до"м', " мир"], "script": "CYRILLIC", "after": [" of"]}
  # Latin is never named; a token list that stops at 60 % of the activation mass
  table = ["a", " b", " c", "1", "\\", '"']
  ws = [win([0, 1, 2], [9, 4, 1]), win([5, 4, 1], [0, 9, 2])]
  expl = baseline.explain(_task(ws), table_pieces(table))
  spec = baseline.read(expl)
  assert spec["tokens"] == ["a", "\\"] and spec["script"] is None and spec["after"] == []
  assert "mostly" not in expl and "after" not in expl
  # digits are named as such
  expl = baseline.explain(_task([win([3, 3, 0], [0, 9, 0])]), table_pieces(table))
  assert baseline.read(expl) == {"tokens": ["1"], "script": "digits", "after": ["1"]}
  # a piece with no text of its own (the first bytes of a split character) is not named
  expl = baseline.explain(_task([win([0, 1, 2], [0, 9, 9])]), table_pieces(["x", "", "мир"]))
  assert baseline.read(expl)["tokens"] == ["мир"]
  # nothing active
  expl = baseline.explain(_task([win([0, 1], [0, 0])]), table_pieces(table))
  assert expl == "offline baseline: active on []" and baseline.read(expl) == {"tokens": [], "script": None, "after": []}


def test_baseline_predictions():
  spec = {"tokens": ["a", "b", "c", "d", "e", "f"], "script": "CYRILLIC", "after": [" of"]}
  ps = ["a", "b", "x", "мир", " of", "y", "f"]
  assert baseline.predict(spec, ps).tolist() == [9, 8, 0, 3, 0, 2, 4]
  expl = 'offline baseline: active on ["q\\"t", "z"]; often right after ["<<"]'
  pieces = table_pieces(['q"t', "z", "<<", "k"])
  ws = [win([3, 0, 3], [0, 0, 0]), win([3, 3], [0, 0]), win([2, 3], [0, 0])]
  assert [p.tolist() for p in baseline.simulate(expl, ws, pieces)] == [[0, 9, 0], [0, 0], [0, 2]]
  assert baseline.detect(expl, ws, pieces) == [True, False, True]
  items = [(ws[0], np.array([1])), (ws[0], np.array([0, 1])), (ws[1], np.array([], int))]
  assert baseline.fuzz(expl, items, pieces) == [True, False, False]
  assert baseline.logits(expl, [0, 1, 2, 3], ['q"t', "z", "<<", "k"]) == [True, True, False, False]


# ------------------------------------------------------------------------------------ a stage's score

def test_score_stage():
  sims = [win([0, 1, 2], [0.0, 1.0, 3.0]), win([0, 1], [2.0, np.nan]), win([0, 1, 2, 3], [0, 0, 0, 0])]
  task = selection.Task("sae0", 0, 3.0, [], sims, [(sims[0], True), (sims[1], False), (sims[2], False)],
                        [(sims[0], np.array([2]), True), (sims[1], np.array([1]), False)],
                        [(5, True), (6, False), (7, True), (8, False)], [], [], False)
  preds = [np.array([0, 5, 9]), np.array([1, 0]), np.array([0, 0, 0, 1])]
  rec, why = pipeline.score_stage("simulation", task, preds)
  pred, true = [0, 5, 9, 1, 0, 0, 0, 0, 1], [0, 1, 3, 2, 0, 0, 0, 0, 0]    # NaN truth counts as 0
  assert why is None and rec["tokens"] == 9 and rec["examples"] == 3 and rec["unreadable"] == 0
  assert rec["spearman"] == pytest.approx(naive_pearson(naive_ranks(pred), naive_ranks(true)), abs=1e-4)
  assert rec["pearson"] == pytest.approx(naive_pearson(pred, true), abs=1e-4)
  # one unreadable example of three: scored on the rest, and counted
  rec, why = pipeline.score_stage("simulation", task, [preds[0], None, preds[2]])
  assert why is None and rec["unreadable"] == 1 and rec["examples"] == 2 and rec["tokens"] == 7
  # most unreadable: not scored (never a 0)
  rec, why = pipeline.score_stage("simulation", task, [None, None, preds[2]])
  assert rec is None and why == "parse: 2 of 3 examples unreadable"
  rec, why = pipeline.score_stage("detection", task, [True, True, False])
  assert rec == {"balanced_accuracy": 0.75, "n": 3, "unreadable": 0} and why is None
  rec, why = pipeline.score_stage("detection", task, [True, None, None])
  assert rec is None and why == "parse: 2 of 3 answers unreadable"
  rec, why = pipeline.score_stage("detection", task, [None, True, False])   # the answered ones are one class
  assert rec is None and why == "the answered examples hold one class only"
  assert pipeline.score_stage("fuzzing", task, [True, True])[0] == {"balanced_accuracy": 0.5, "n": 2, "unreadable": 0}
  rec, why = pipeline.score_stage("logits", task, [True, True, None, False])
  assert rec == {"accuracy": pytest.approx(2 / 3, abs=1e-4), "n": 3, "unreadable": 1} and why is None
  empty = selection.Task("sae0", 1, 1.0, [], [], [], [], [], [], [], False)
  for name in pipeline.SCORERS:
    assert pipeline.score_stage(name, empty, []) == (None, "no examples for this scorer")


def test_summarize_counts_errors_by_kind():
  recs = {0: {"explanation": "x", "scores": {"simulation": {"spearman": 0.5}, "logits": {"accuracy": 0.7}},
              "single_token": True, "excluded": None,
              "errors": {"detection": "the answered examples hold one class only"}},
          1: {"explanation": None, "scores": {}, "single_token": False, "excluded": None,
              "errors": {"explain": "parse: no <answer>…</answer> in the reply"}},
          2: {"explanation": "y", "scores": {"simulation": {"spearman": -0.1}, "logits": None}, "single_token": False,
              "excluded": None, "errors": {"logits": "HTTP 500: boom"}},
          3: {"explanation": None, "scores": {}, "single_token": False,
              "excluded": "fewer than 20 distinct examples (3)", "errors": {}}}
  s = pipeline.summarize(recs)
  assert (s["features"], s["excluded"], s["explained"], s["single_token"]) == (4, 1, 2, 1)
  assert s["errors"] == {"detection": {"no examples": 1}, "explain": {"parse": 1}, "logits": {"request": 1}}
  assert s["simulation"] == {"n": 2, "mean": 0.2, "median": 0.2}
  assert s["logits"] == {"n": 1, "mean": 0.7, "median": 0.7}
  assert s["fuzzing"] == {"n": 0, "mean": None, "median": None}


# ------------------------------------------------------------------------------------ --features, results files

def test_parse_features():
  fired = np.array([0, 3, 0, 1, 5])
  assert runner.parse_features("live", 5, fired) == [1, 3, 4]
  assert runner.parse_features("all", 5, fired) == [0, 1, 2, 3, 4]
  assert runner.parse_features("1:3", 5, fired) == [1, 2]
  assert runner.parse_features(":2", 5, fired) == [0, 1]
  assert runner.parse_features("3:", 5, fired) == [3, 4]
  assert runner.parse_features("2:99", 5, fired) == [2, 3, 4]
  assert runner.parse_features(" 4,1, 1 ", 5, fired) == [1, 4]
  for bad in ("3:1", "2:2", "-1:3", "a:b", "x", "1,x", "5", "-1", "", ",", "1.5"):
    with pytest.raises(errors.UserInputError, match="--features="):
      runner.parse_features(bad, 5, fired)


def test_merge_write_load_and_labels(tmp_path):
  wd = str(tmp_path)
  assert explanations.labels(wd) == [] and explanations.load(wd, "sae0") is None
  head = {"backend": "offline", "model": "baseline", "baseline": True, "prompt_version": "v1",
          "analysis": {"step": 8, "n_tokens": 100}}
  rec = lambda e: {"explanation": e, "score": 0.1, "scores": {}, "single_token": False, "excluded": None, "errors": {}}
  path = explanations.merge_write(wd, "offline-baseline", "sae0", head, {0: rec("a"), 2: rec("b")})
  assert path == explanations.results_path(wd, "offline-baseline", "sae0")
  explanations.merge_write(wd, "offline-baseline", "sae0", head, {1: rec("c"), 2: rec("B")})
  doc = explanations.load(wd, "sae0")
  assert doc["schema"] == explanations.SCHEMA and doc["unit"] == "sae0" and doc["label"] == "offline-baseline"
  assert {i: r["explanation"] for i, r in doc["features"].items()} == {0: "a", 1: "c", 2: "B"}
  with open(path) as f:
    assert list(json.load(f)["features"]) == ["0", "1", "2"]
  # a new prompt version (or analysis) replaces the old features instead of mixing them
  explanations.merge_write(wd, "offline-baseline", "sae0", dict(head, prompt_version="v2"), {5: rec("d")})
  assert list(explanations.load(wd, "sae0")["features"]) == [5]
  # a model's results are preferred over the baseline; the baseline is still there by label
  assert explanations.label_for("openai", "gpt-4o-mini") == "openai-gpt-4o-mini"
  assert explanations.label_for("anthropic", "a/b c") == "anthropic-a-b-c"
  assert explanations.label_for("offline", None) == "offline-baseline"
  explanations.merge_write(wd, "offline-baseline", "sae0", dict(head, prompt_version="v2"), {6: rec("e"), 8: rec("f")})
  failed = dict(rec(None), score=None, errors={"explain": "HTTP 500: boom"})
  explanations.merge_write(wd, "openai-m", "sae0", dict(head, backend="openai", baseline=False),
                           {7: rec("m"), 6: rec("n"), 8: failed})
  assert explanations.labels(wd) == ["openai-m", "offline-baseline"]
  assert list(explanations.load(wd, "sae0", "openai-m")["features"]) == [6, 7, 8]
  assert list(explanations.load(wd, "sae0", "offline-baseline")["features"]) == [5, 6, 8]
  # without a label: feature by feature, the model's where it explained, else the baseline's
  doc = explanations.load(wd, "sae0")
  assert doc["label"] == "openai-m" and doc["labels"] == ["openai-m", "offline-baseline"]
  got = {i: (r["explanation"], r["label"], r["baseline"]) for i, r in doc["features"].items()}
  assert got == {5: ("d", "offline-baseline", True), 6: ("n", "openai-m", False), 7: ("m", "openai-m", False),
                 8: ("f", "offline-baseline", True)}
  assert explanations.load(wd, "sae1") is None and explanations.load(wd, "sae0", "nope") is None


# ------------------------------------------------------------------------------------ logit tokens, small vocab

def _timeout(*_):
  raise TimeoutError("build_tasks did not finish in 0.5 s")


def test_logit_tokens_with_a_small_vocab_do_not_hang(monkeypatch):
  # a fake source of one feature over a 70-token vocabulary: its 60 top ids leave 10 others to draw
  class Unit:
    width = 1

    def array(self, name):
      return {"max": np.ones(1, np.float32), "logit_top_ids": np.zeros((1, 10), np.int64),
              "logit_bottom_ids": np.zeros((1, 10), np.int64)}[name]

  class Src:
    unit, name = Unit(), "sae0"
    random_at, pool_seqs = np.array([[0, 12], [1, 12]]), np.arange(4)
    run = type("Run", (), {"tokenizer": type("Tok", (), {"vocab_size": 70})()})()

    def window_tokens(self, r, p):
      return np.arange(16) + r

  examples = [win(np.arange(16), np.r_[np.zeros(12), 1.0, np.zeros(3)], kind="top", seq=s, pos=12) for s in range(4)]
  monkeypatch.setattr(selection, "db_windows", lambda unit, i: examples)
  pool = selection.Pool(excluded={}, single={0: False}, row={0: 0}, random_acts=np.zeros((1, 2, 16), np.float32),
                        elsewhere={0: ([], np.zeros((0, 16), np.float32))}, logit_ids=np.arange(60)[None, :])
  old = signal.signal(signal.SIGALRM, _timeout)
  signal.setitimer(signal.ITIMER_REAL, 0.5)
  try:
    [task] = selection.build_tasks(Src(), [0], pool)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
  assert sorted(t for t, y in task.logit_tokens if y) == list(range(10, 60))
  assert sorted(t for t, y in task.logit_tokens if not y) == list(range(60, 70))
