"""autointerp on one tiny real run (tests/autointerp/conftest.py: 768 analysed tokens, sae0 and the
neurons): which examples each stage sees (selection), the offline pipeline end to end, the LLM path
end to end against the local fake server (tests/autointerp/fake_llm_server.py: cost, cache, resume,
malformed answers, the key), and the command line's refusals."""
import json
import logging
import os
import re
import threading

import numpy as np
import pytest
from fake_llm_server import Error, FakeLLMServer, Text

from monojax.analysis import database, explanations
from monojax.autointerp import __main__ as cli_main
from monojax.autointerp import pipeline, prompts, runner, selection
from monojax.autointerp.sources import CTX, CTX_LEFT, LOGIT_K, Window

KEY = "sk-test-SECRET-autointerp-key-456"
POOL_SEQUENCES = 48   # as tests/autointerp/conftest.py's sources: every analysed sequence
UNITS = ("sae0", "neurons")
OTHER = ("interval", "bottom")


def _key(w):
  return (int(w.seq), int(w.pos))


def _db_kind(kind):
  return kind == "top" or kind.startswith(OTHER)


def _reading_order(kind):
  """top, interval 1..10, bottom, random, top tokens elsewhere"""
  if kind.startswith("interval "):
    return int(kind.split()[1])
  return {"top": 0, "bottom": 11, "random": 12, selection.ELSEWHERE: 13}[kind]


def _direct_acts(run, unit, seq_tokens):
  """The unit's activations [T, width] on one sequence, computed here without the pool."""
  toks = np.asarray(seq_tokens, np.int32)[None]
  acts = run.mlp_acts(toks) if unit == "neurons" else run.features(toks, unit)
  return np.asarray(acts)[0]


def _window(row_acts, pos):
  T = len(row_acts)
  out = np.full(CTX, np.nan, np.float32)
  for k, t in enumerate(range(pos - CTX_LEFT, pos - CTX_LEFT + CTX)):
    if 0 <= t < T:
      out[k] = row_acts[t]
  return out


# ------------------------------------------------------------------------------------ selection

@pytest.mark.parametrize("unit", UNITS)
def test_counts_windows_and_order_follow_the_protocol(tasks, feature_db, unit):
  toks = np.asarray(feature_db.tokens)
  live = [t for t in tasks[unit] if t.excluded is None]
  assert len(live) >= 10   # several scored features in both an SAE and the neurons
  n_elsewhere = 0
  for t in live:
    for ws, limits, total in ((t.explain, selection.EXPLAIN, 47), (t.simulate, selection.SIMULATE, 58)):
      assert 0 < len(ws) <= total
      kinds = {}
      for w in ws:
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
      assert kinds.get("top", 0) <= limits["top"]
      assert all(n <= limits["other"] for k, n in kinds.items() if k.startswith(OTHER))
      assert kinds.get("random", 0) <= limits["random"] and kinds.get(selection.ELSEWHERE, 0) <= limits["elsewhere"]
      assert set(kinds) <= {"top", "random", selection.ELSEWHERE, "bottom"} | {f"interval {i}" for i in range(1, 11)}
    n_elsewhere += sum(w.kind == selection.ELSEWHERE for w in t.explain + t.simulate)
    # explanation windows: 16 tokens around the example's token, in the paper's reading order
    for w in t.explain:
      assert len(w.tokens) == CTX and w.center == CTX_LEFT and toks[w.seq, w.pos] == w.tokens[CTX_LEFT]
      assert np.isfinite(w.acts[w.tokens >= 0]).all() and np.isnan(w.acts[w.tokens < 0]).all()
    order = [_reading_order(w.kind) for w in t.explain]
    assert order == sorted(order)
    # simulation windows: ≤ 9 valid tokens (6 before, 2 after), the example's token among them
    for w in t.simulate:
      assert 1 <= len(w.tokens) <= selection.SIM_LEFT + 1 + selection.SIM_RIGHT
      assert (w.tokens >= 0).all() and np.isfinite(w.acts).all()
      assert toks[w.seq, w.pos] == w.tokens[w.center] and w.center <= selection.SIM_LEFT
  assert n_elsewhere > 0
  assert max(sum(w.kind == "top" for w in t.explain) for t in live) == selection.EXPLAIN["top"]


@pytest.mark.parametrize("unit", UNITS)
def test_windows_hold_the_units_activations(tasks, opened_run, feature_db, unit):
  """Database, random and elsewhere windows carry the unit's real activations on their tokens."""
  toks = np.asarray(feature_db.tokens)
  cache = {}
  checked = {"db": 0, "random": 0, selection.ELSEWHERE: 0}
  for t in [t for t in tasks[unit] if t.excluded is None][:4]:
    for w in t.explain:
      if w.seq not in cache:
        cache[w.seq] = _direct_acts(opened_run, unit, toks[w.seq])
      np.testing.assert_allclose(w.acts, _window(cache[w.seq][:, t.index], w.pos), rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(w.tokens[w.tokens >= 0], toks[w.seq, max(0, w.pos - CTX_LEFT):w.pos + 4])
      checked["db" if _db_kind(w.kind) else w.kind] += 1
    assert t.max_act == pytest.approx(float(feature_db.unit(unit).array("max")[t.index]))
  assert all(checked.values()), checked


@pytest.mark.parametrize("unit", UNITS)
def test_explanation_and_simulation_examples_are_disjoint(tasks, unit):
  for t in [t for t in tasks[unit] if t.excluded is None]:
    shown = [_key(w) for w in t.explain]
    scored = [_key(w) for w in t.simulate]
    assert len(set(shown)) == len(shown) and len(set(scored)) == len(scored)
    assert not set(shown) & set(scored), (t.index, sorted(set(shown) & set(scored)))


@pytest.mark.parametrize("unit", UNITS)
def test_disjoint_within_each_group(tasks, unit):
  """What holds today: no database slot, random context or elsewhere position is drawn for both stages."""
  for t in [t for t in tasks[unit] if t.excluded is None]:
    for kind in {w.kind for w in t.explain + t.simulate}:
      e = {_key(w) for w in t.explain if w.kind == kind}
      s = {_key(w) for w in t.simulate if w.kind == kind}
      assert not e & s, (t.index, kind)
    rand = [_key(w) for w in t.explain + t.simulate if w.kind == "random"]   # distinct pool positions
    assert len(set(rand)) == len(rand)
    els = [_key(w) for w in t.explain + t.simulate if w.kind == selection.ELSEWHERE]
    assert len(set(els)) == len(els)
    # elsewhere contexts come from sequences none of the feature's examples come from
    own = {w.seq for w in t.explain + t.simulate if _db_kind(w.kind)}
    assert not {s for s, _ in els} & own


@pytest.mark.parametrize("unit", UNITS)
def test_detection_and_fuzzing_labels(tasks, unit):
  n_neg = n_false_fuzz = 0
  for t in [t for t in tasks[unit] if t.excluded is None]:
    shown = {_key(w) for w in t.explain}
    pos = [w for w, y in t.detect if y]
    neg = [w for w, y in t.detect if not y]
    assert 0 < len(pos) <= selection.N_DETECT and len(neg) <= selection.N_DETECT
    for w, y in t.detect:   # True ⇔ the feature is active somewhere in the context
      assert y == bool(np.nanmax(np.nan_to_num(w.acts, nan=0.0)) > 0)
    assert all(_key(w) not in shown for w in pos)   # activating contexts the explainer did not see
    assert all(w.kind == "random" for w in neg)
    n_neg += len(neg)
    assert len(t.fuzz) <= 2 * selection.N_FUZZ
    for w, marks, right in t.fuzz:
      active = np.nonzero(np.nan_to_num(w.acts, nan=0.0) > 0)[0]
      assert _key(w) not in shown and len(active) > 0
      if right:   # the marks are exactly the active tokens
        assert marks.tolist() == active.tolist()
      else:       # as many marks, all on valid inactive tokens
        n_false_fuzz += 1
        assert len(marks) == len(active) and len(set(marks.tolist())) == len(marks)
        assert (w.tokens[marks] >= 0).all() and not (np.nan_to_num(w.acts[marks], nan=0.0) > 0).any()
  assert n_neg > 0 and n_false_fuzz > 0


@pytest.mark.parametrize("unit", UNITS)
def test_logit_tokens(tasks, unit_sources, opened_run, feature_db, unit):
  src = unit_sources[unit]
  live = [t for t in tasks[unit] if t.excluded is None]
  ids, vals = src.top_logits(np.asarray([t.index for t in live]))
  assert ids.shape == (len(live), LOGIT_K) and (np.diff(vals, axis=1) <= 0).all()
  vocab = opened_run.tokenizer.vocab_size
  for k, t in enumerate(live):
    # the database's top 10 are the first 10 of the 60
    assert ids[k, :10].tolist() == np.asarray(feature_db.unit(unit).array("logit_top_ids")[t.index]).tolist() == \
        t.top_logits
    yes = [tok for tok, y in t.logit_tokens if y]
    no = [tok for tok, y in t.logit_tokens if not y]
    assert sorted(yes) == sorted(ids[k, 10:10 + selection.N_LOGIT].tolist()) and len(yes) == selection.N_LOGIT
    assert len(no) == len(set(no)) == selection.N_LOGIT
    assert not set(no) & set(ids[k].tolist()) and all(0 <= tok < vocab for tok in no)
    assert [tok for tok, _ in t.logit_tokens] != yes + no   # shuffled


@pytest.mark.parametrize("unit", UNITS)
def test_single_token_flag(tasks, unit_sources, unit):
  from monojax.autointerp.sources import db_windows
  for t in tasks[unit]:
    top = [w for w in db_windows(unit_sources[unit].unit, t.index) if w.kind == "top"]
    peaks = {int(w.tokens[int(np.nanargmax(w.acts))]) for w in top}
    assert t.single_token == (len(top) >= selection.MIN_EXAMPLES and len(peaks) == 1)


def _activating(unit, i):
  """The database's slots of feature i (repeats dropped) whose autointerp window holds an activation > 0, as
  Windows (straight from the database: one per slot, so the same (seq, pos) may come twice)."""
  from monojax.analysis import stats
  lo = stats.LEFT - CTX_LEFT
  out = []
  for ex in unit.examples(i):
    acts = np.asarray(ex["acts"][lo:lo + CTX], np.float32)
    if not ex["repeated"] and np.nanmax(np.where(np.asarray(ex["tokens"][lo:lo + CTX]) >= 0, acts, np.nan)) > 0:
      out.append(Window(np.asarray(ex["tokens"][lo:lo + CTX]), acts, ex["group"], ex["seq"], ex["pos"]))
  return out


def _examples(unit, i):
  """How many examples selection counts for feature i: its activating database windows (selection.db_windows)."""
  return sum(1 for w in selection.db_windows(unit, i) if np.nanmax(w.acts) > 0)


def test_exclusion_below_min_examples(unit_sources, monkeypatch):
  src = unit_sources["sae0"]
  feats = list(range(16))
  counts = {i: _examples(src.unit, i) for i in feats}
  m = int(np.median(list(counts.values())))
  monkeypatch.setattr(selection, "MIN_EXAMPLES", m)
  tasks = selection.build_tasks(src, feats)
  for t in tasks:
    if counts[t.index] < m:
      assert t.excluded == f"fewer than {m} distinct examples ({counts[t.index]})"
      assert (t.explain, t.simulate, t.detect, t.fuzz, t.logit_tokens) == ([], [], [], [], [])
      assert len(t.top_logits) == 10   # the database's logits are still recorded
    else:
      assert t.excluded is None and t.explain and t.simulate and t.logit_tokens
  assert any(t.excluded for t in tasks) and not all(t.excluded for t in tasks)


def test_every_feature_excluded(unit_sources, monkeypatch):
  monkeypatch.setattr(selection, "MIN_EXAMPLES", 10_000)
  for t in selection.build_tasks(unit_sources["sae0"], [0, 1]):
    assert re.fullmatch(r"fewer than 10000 distinct examples \(\d+\)", t.excluded)


def test_min_examples_counts_distinct_examples(unit_sources, monkeypatch):
  src = unit_sources["sae0"]
  feats = list(range(16))
  slots = {i: len(_activating(src.unit, i)) for i in feats}
  distinct = {i: len({_key(w) for w in _activating(src.unit, i)}) for i in feats}
  assert any(distinct[i] < slots[i] for i in feats)
  threshold = int(np.median([distinct[i] for i in feats])) + 1
  monkeypatch.setattr(selection, "MIN_EXAMPLES", threshold)
  for t in selection.build_tasks(src, feats):
    assert (t.excluded is not None) == (distinct[t.index] < threshold), (t.index, distinct[t.index], slots[t.index])


def _summary(t):
  return ([(_key(w), w.kind, w.tokens.tolist()) for w in t.explain], [(_key(w), w.kind) for w in t.simulate],
          [(_key(w), y) for w, y in t.detect], [(_key(w), m.tolist(), y) for w, m, y in t.fuzz], t.logit_tokens)


def test_tasks_are_deterministic_per_feature_and_seed(tasks, unit_sources):
  src = unit_sources["sae0"]
  again = selection.build_tasks(src, [0, 1, 2], seed=0)   # another chunk of features: the same draws
  assert [_summary(t) for t in again] == [_summary(t) for t in tasks["sae0"][:3]]
  other = selection.build_tasks(src, [0, 1, 2], seed=1)
  for a, b in zip(again, other):
    assert _summary(a)[0] != _summary(b)[0] and _summary(a)[4] != _summary(b)[4]


# ------------------------------------------------------------------------------------ offline, end to end

def _check_records(doc, features, judge_baseline=True):
  assert doc["schema"] == explanations.SCHEMA and doc["baseline"] is judge_baseline
  for i in features:
    rec = doc["features"][i]
    assert set(rec) == {"explanation", "score", "scores", "single_token", "excluded", "errors"}
    if rec["excluded"]:
      assert rec["explanation"] is None and rec["score"] is None and rec["scores"] == {}
      assert rec["excluded"].startswith("fewer than")
      continue
    assert rec["explanation"], (i, rec)
    assert set(rec["scores"]) == set(pipeline.SCORERS)
    for name, s in rec["scores"].items():
      if s is None:   # not scored: always with a reason, never a silent 0
        assert rec["errors"].get(name), (i, name, rec)
        continue
      assert name not in rec["errors"]
      if name == "simulation":
        assert -1 <= s["spearman"] <= 1 and -1 <= s["pearson"] <= 1 and s["tokens"] > 0
      else:
        assert 0 <= s["balanced_accuracy" if name != "logits" else "accuracy"] <= 1 and s["n"] > 0
    assert rec["score"] == (rec["scores"]["simulation"] or {}).get("spearman")


def test_offline_end_to_end_and_merge(analysed_copy, opened_run, monkeypatch):
  wd = analysed_copy
  db = database.open_database(wd)
  # a threshold that excludes some of the first 12 features of each unit and scores the others
  counts = sorted(_examples(db.unit(u), i) for u in UNITS for i in range(12))
  monkeypatch.setattr(selection, "MIN_EXAMPLES", counts[4])
  logs = []
  out = runner.run_autointerp(wd, backend="offline", features="0:12", units="sae0", neurons=True, site=False,
                              report=False, pool_sequences=POOL_SEQUENCES, progress=False, run=opened_run,
                              log=logs.append)
  assert out["label"] == "offline-baseline" and out["usage"] is None
  assert sorted(out["paths"]) == sorted(explanations.results_path(wd, "offline-baseline", u) for u in UNITS)
  assert sorted(os.listdir(os.path.join(wd, "autointerp", "offline-baseline"))) == ["neurons.json", "sae0.json"]
  excluded = 0
  for u in UNITS:
    doc = explanations.load(wd, u, "offline-baseline")
    assert doc["label"] == "offline-baseline" and doc["backend"] == "offline" and doc["unit"] == u
    assert doc["prompt_version"] == "offline-baseline/1" and doc["analysis"]["n_tokens"] == db.n_tokens
    assert sorted(doc["features"]) == list(range(12))
    _check_records(doc, range(12))
    excluded += sum(1 for r in doc["features"].values() if r["excluded"])
    assert all(r["explanation"].startswith("offline baseline: active on ") for r in doc["features"].values()
               if not r["excluded"])
    s = out["units"][u]
    assert s["features"] == 12 and s["explained"] + s["excluded"] == 12 and s["simulation"]["n"] == s["explained"]
    assert any(line.startswith(f"autointerp [offline baseline]: {u}: ") for line in logs)
  assert 0 < excluded < 24
  # the database shows the results (a fresh reader); a reader without a label names each record's source
  rec = database.open_database(wd).unit("sae0").feature(3)
  assert rec["autointerp"]["label"] == "offline-baseline" and rec["autointerp"]["baseline"] is True
  merged = explanations.load(wd, "sae0")
  assert all(r["label"] == "offline-baseline" and r["baseline"] is True for r in merged["features"].values())
  # another range merges into the same files
  monkeypatch.setattr(selection, "MIN_EXAMPLES", 20)
  before = explanations.load(wd, "sae0", "offline-baseline")["features"]
  runner.run_autointerp(wd, backend="offline", features="12:16", units="sae0", site=False, report=False,
                        pool_sequences=POOL_SEQUENCES, progress=False, run=opened_run, log=logs.append)
  doc = explanations.load(wd, "sae0", "offline-baseline")
  assert sorted(doc["features"]) == list(range(16))
  assert {i: doc["features"][i] for i in range(12)} == before
  _check_records(doc, range(16))
  assert sorted(explanations.load(wd, "neurons", "offline-baseline")["features"]) == list(range(12))


# ------------------------------------------------------------------------------------ the LLM path

def _stage(body):
  system = body.get("system") or next(m["content"] for m in body["messages"] if m["role"] == "system")
  return next(k for k, v in prompts.SYSTEMS.items() if v == system)


def _example_lines(user):
  return {int(m.group(1)): m.group(2) for m in re.finditer(r"^Example (\d+): (.*)$", user, re.MULTILINE)}


def well_formed(body):
  """Answers in the asked format, built from the request; usage 1000 in, 100 out."""
  stage, user = _stage(body), body["messages"][-1]["content"]
  if stage == "explain":
    text = "The examples share a pattern.\n<answer>the letter x in code</answer>"
  elif stage == "simulation":
    text = "\n".join(f"Example {n}: [{', '.join(str((3 * k + n) % 10) for k in range(len(json.loads(v))))}]"
                     for n, v in sorted(_example_lines(user).items()))
  elif stage in ("detection", "fuzzing"):
    text = "\n".join(f"Example {n}: {n % 2}" for n in sorted(_example_lines(user)))
  else:
    text = "\n".join(f"{n}: {'Y' if int(n) % 2 else 'N'}" for n in re.findall(r"^(\d+): ", user, re.MULTILINE))
  return Text(text, input_tokens=1000, output_tokens=100)


def api_requests(fake):
  return [r for r in fake.requests if r.path.endswith(("/messages", "/completions"))]


def assert_no_key(wd, *texts):
  for root, _, names in os.walk(os.path.join(wd, "autointerp")):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        assert KEY.encode() not in f.read(), os.path.join(root, name)
  for t in texts:
    assert KEY not in t


def _run_llm(wd, run, fake, backend="openai", model="fake-model", features="0:4", **kw):
  url = fake.anthropic_url if backend == "anthropic" else fake.openai_url
  logs = []
  out = runner.run_autointerp(wd, backend=backend, model=model, base_url=url, features=features, units="sae0",
                              site=False, report=False, pool_sequences=POOL_SEQUENCES, progress=False, run=run,
                              log=logs.append, **kw)
  return out, logs


def test_openai_cli_cost_then_cache(analysed_copy, monkeypatch, capsys, caplog):
  wd = analysed_copy
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  caplog.set_level(logging.INFO)
  argv = [f"--workdir={wd}", "--backend=openai", "--model=fake-model", "--features=0:4", "--units=sae0",
          "--price_in=2", "--price_out=4", "--no_site", "--no_report", "--no_progress"]
  with FakeLLMServer(responder=well_formed, expected_key=KEY) as fake:
    argv.append(f"--base_url={fake.openai_url}")
    assert cli_main.main(argv) == 0
    sent = api_requests(fake)
    assert len(sent) == 4 * (1 + len(pipeline.SCORERS)) and all(r.path == "/v1/chat/completions" for r in sent)
    path = explanations.results_path(wd, "openai-fake-model", "sae0")
    assert os.path.isfile(path)
    doc = explanations.load(wd, "sae0", "openai-fake-model")
    assert doc["label"] == "openai-fake-model" and doc["baseline"] is False
    assert doc["prompt_version"] == prompts.PROMPT_VERSION and doc["model"] == "fake-model"
    _check_records(doc, range(4), judge_baseline=False)
    assert all(r["explanation"] == "the letter x in code" for r in doc["features"].values())
    assert all(r["scores"]["simulation"] is not None and r["scores"]["logits"]["accuracy"] is not None
               for r in doc["features"].values())
    n = len(sent)
    u = doc["usage"]
    assert (u["requests"], u["sent"], u["cache_hits"], u["failures"]) == (n, n, 0, 0)
    assert (u["input_tokens"], u["output_tokens"]) == (1000 * n, 100 * n)
    assert u["cost_usd"] == pytest.approx(n * (1000 * 2.0 + 100 * 4.0) / 1e6)
    assert (u["price_in"], u["price_out"], u["max_cost"]) == (2.0, 4.0, 10.0)   # the default cap once priced
    assert u["by_purpose"]["explain"]["requests"] == 4
    line = (f"autointerp: openai fake-model: {n} requests (0 from the cache), 20k tokens in, 2.0k out, "
            "$0.05 (max $10.00)")
    assert line in caplog.text
    first = doc["features"]
    # the same command again: every reply from the cache, no HTTP request, the same results
    caplog.clear()
    assert cli_main.main(argv) == 0
    assert len(api_requests(fake)) == n
    doc = explanations.load(wd, "sae0", "openai-fake-model")
    assert doc["features"] == first
    assert (doc["usage"]["cache_hits"], doc["usage"]["sent"], doc["usage"]["cost_usd"]) == (n, 0, 0.0)
    assert f"{n} requests ({n} from the cache)" in caplog.text
  out = capsys.readouterr()
  assert_no_key(wd, out.out, out.err, caplog.text)


def test_anthropic_backend(analysed_copy, opened_run, monkeypatch):
  wd = analysed_copy
  monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
  with FakeLLMServer(responder=well_formed, expected_key=KEY) as fake:
    out, logs = _run_llm(wd, opened_run, fake, backend="anthropic", model="claude-fake", features="0:2",
                         price_in=1.0, price_out=5.0)
    sent = api_requests(fake)
  assert len(sent) == 2 * (1 + len(pipeline.SCORERS)) and all(r.path == "/v1/messages" for r in sent)
  assert {_stage(r.body) for r in sent} == {"explain", *pipeline.SCORERS}
  assert all(r.body["messages"][-1]["role"] == "user" and r.body["system"] in prompts.SYSTEMS.values() for r in sent)
  doc = explanations.load(wd, "sae0", "anthropic-claude-fake")
  _check_records(doc, range(2), judge_baseline=False)
  assert all(r["explanation"] == "the letter x in code" for r in doc["features"].values())
  assert out["usage"]["cost_usd"] == pytest.approx(len(sent) * (1000 * 1.0 + 100 * 5.0) / 1e6)
  assert_no_key(wd, "\n".join(logs), repr(out))


def test_malformed_answers_are_counted_parse_failures(analysed_copy, opened_run, monkeypatch):
  wd = analysed_copy
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  lock, seen = threading.Lock(), []

  def malformed(body):
    stage = _stage(body)
    if stage == "explain":
      with lock:
        seen.append(1)
        first = len(seen) == 1
      # the first explanation has no <answer> tags; the others are fine
      return "It is about x." if first else "<answer>x</answer>"
    # every scorer's answer is unreadable: wrong counts, words, nothing
    return {"simulation": "Example 1: [1, 2]\nExample 2: lots", "detection": "I am not sure about these.",
            "fuzzing": "Example 1: maybe", "logits": "1: perhaps"}[stage]

  with FakeLLMServer(responder=malformed, expected_key=KEY) as fake:
    out, logs = _run_llm(wd, opened_run, fake, features="0:4")
  doc = explanations.load(wd, "sae0", "openai-fake-model")
  recs = doc["features"]
  unexplained = [i for i, r in recs.items() if r["explanation"] is None]
  assert len(unexplained) == 1
  r = recs[unexplained[0]]
  assert r["errors"] == {"explain": "parse: no <answer>…</answer> in the reply"} and r["score"] is None
  assert r["scores"] == {}
  for i, r in recs.items():
    if i in unexplained:
      continue
    assert r["explanation"] == "x" and r["score"] is None
    for name in pipeline.SCORERS:
      assert r["scores"][name] is None and r["errors"][name].startswith("parse: "), (name, r["errors"])
  s = out["units"]["sae0"]
  assert s["errors"]["explain"] == {"parse": 1}
  assert all(s["errors"][name] == {"parse": 3} for name in pipeline.SCORERS)
  assert all(s[name]["n"] == 0 for name in pipeline.SCORERS)
  assert any(re.search(r"not scored: .*explain: 1 parse", line) for line in logs)
  assert out["usage"]["failures"] == 0   # the requests themselves succeeded


def test_resume_after_the_server_dies(analysed_copy, opened_run, monkeypatch):
  wd = analysed_copy
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  lock, count, ok_bodies = threading.Lock(), [0], []

  def dying(body):
    with lock:
      count[0] += 1
      alive = count[0] <= 7
      if alive:
        ok_bodies.append(json.dumps(body, sort_keys=True))
    return well_formed(body) if alive else Error(500, "the server is gone")

  with FakeLLMServer(responder=dying, expected_key=KEY) as fake:
    out, logs = _run_llm(wd, opened_run, fake, max_retries=0)
    assert len(api_requests(fake)) == 4 * (1 + len(pipeline.SCORERS))   # max_retries 0: each sent once
  assert out["usage"]["failures"] == 4 * (1 + len(pipeline.SCORERS)) - 7
  doc = explanations.load(wd, "sae0", "openai-fake-model")
  failed = [(i, name) for i, r in doc["features"].items() for name, s in r["scores"].items() if s is None]
  assert failed and all(doc["features"][i]["errors"][name].startswith("HTTP 500") for i, name in failed)
  assert out["units"]["sae0"]["errors"]["logits"] == {"request": 4}
  # a healthy rerun sends only what did not succeed
  with FakeLLMServer(responder=well_formed, expected_key=KEY) as fake:
    out2, logs2 = _run_llm(wd, opened_run, fake, max_retries=0)
    resent = [json.dumps(r.body, sort_keys=True) for r in api_requests(fake)]
  n = out2["usage"]["requests"]
  assert n == 4 * (1 + len(pipeline.SCORERS)) and out2["usage"]["cache_hits"] == 7
  assert len(resent) == n - 7 and not set(resent) & set(ok_bodies)
  doc = explanations.load(wd, "sae0", "openai-fake-model")
  _check_records(doc, range(4), judge_baseline=False)
  assert not any(why.startswith("HTTP") for r in doc["features"].values() for why in r["errors"].values())
  assert_no_key(wd, "\n".join(logs + logs2))


# ------------------------------------------------------------------------------------ the command line

def _cli(argv, capsys):
  try:
    rc = cli_main.main(argv)
  except SystemExit as e:
    rc = e.code
  err = capsys.readouterr().err
  return rc, err


@pytest.mark.parametrize("args,needle", [
    (["--features=5:3"], "--features=5:3"),
    (["--features=abc"], "--features=abc"),
    (["--features=999"], "--features=999"),
    (["--units=sae9"], "--units=sae9"),
    (["--scorers=simulation,vibes"], "--scorers"),
    (["--backend=openai"], "--model"),
    (["--backend=anthropic", "--model=claude-haiku-4-5"], "ANTHROPIC_API_KEY"),
    (["--max_retries=-1"], "--max_retries"),
    (["--price_in=-1"], "--price_in"),
    (["--backend=gemini"], "--backend"),
])
def test_cli_refusals(analysed_copy, monkeypatch, capsys, args, needle):
  monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  rc, err = _cli([f"--workdir={analysed_copy}", "--no_site", "--no_report", "--no_progress", *args], capsys)
  assert rc == 2, err
  assert err.startswith("monojax.autointerp: ") and err.count("\n") == 1 and needle in err, err
  assert not os.path.exists(os.path.join(analysed_copy, "autointerp"))


def test_cli_refuses_what_is_not_an_analysed_run(tmp_path, capsys):
  rc, err = _cli([], capsys)
  assert rc == 2 and err.count("\n") == 1 and "--workdir" in err
  empty = tmp_path / "empty"
  empty.mkdir()
  rc, err = _cli([f"--workdir={empty}"], capsys)
  assert rc == 2 and err.count("\n") == 1 and f"--workdir={empty}: no config.json there; not a monojax run" in err
  rc, err = _cli([f"--workdir={tmp_path / 'missing'}"], capsys)
  assert rc == 2 and err.count("\n") == 1 and "--workdir=" in err
  (empty / "config.json").write_text("{}")
  rc, err = _cli([f"--workdir={empty}"], capsys)
  assert rc == 2 and err.count("\n") == 1 and "no feature database" in err
  assert not os.path.exists(empty / "autointerp")
