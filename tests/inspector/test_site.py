"""The static site as files: every data file decodes to the feature database's numbers, dead
features have none, the build replaces only its own folder and never half-writes it, the pages
load nothing from the network and never build HTML from strings, and the verb's bad input."""
import glob
import json
import os
import re

import numpy as np
import pytest

from monojax import errors, inspect as inspect_cli, text
from monojax.analysis import database, stats
from monojax.inspector import export, live, site
from monojax.run import Run


def _data(site_dir, key):
  k, obj = export.read_script(os.path.join(site_dir, "data", key + ".js"))
  assert k == key
  return obj


def test_pack_round_trip_and_no_markup_in_payload(hostile):
  obj = {"s": hostile, "u": "\u2028\u2029</script>", "n": [1.5, None]}
  body = export.script("x/1", obj)
  assert "<" not in body and "\n" not in body.rstrip("\n")   # base64: nothing can end the script
  key_json, payload = body[len("monojax.data("):-4].split(',"', 1)
  assert json.loads(key_json) == "x/1" and export.unpack(payload) == obj


@pytest.mark.parametrize("unit", ["sae0", "sae1", "neurons"])
def test_feature_files_hold_the_database(inspector_run, inspector_site, unit):
  db = database.open_database(inspector_run)
  u = db.unit(unit)
  fired = np.asarray(u.array("fired"))
  index = _data(inspector_site, f"{unit}/index")
  assert index["n"] == u.width and index["fired"] == fired.tolist()
  np.testing.assert_allclose(np.array(index["density"], float), u.array("density"), rtol=1e-5)
  vocab = _data(inspector_site, "vocab")
  tb = live.token_bytes(Run.open(inspector_run).tokenizer)
  files = sorted(int(os.path.basename(p)[:-3]) for p in glob.glob(os.path.join(inspector_site, "data", unit, "f", "*.js")))
  assert files == list(range(u.width))                  # one file per feature
  for i in np.flatnonzero(fired == 0)[:3]:
    assert _data(inspector_site, f"{unit}/f/{i}") == {"i": int(i), "dead": True, "fired": 0}
  for i in np.flatnonzero(fired > 0)[:6]:
    i = int(i)
    f = _data(inspector_site, f"{unit}/f/{i}")
    rec = u.feature(i)
    assert f["i"] == i and f["fired"] == int(rec["fired"]) and f["hist"] == rec["hist"].tolist()
    assert f["max"] == pytest.approx(float(rec["max"]), rel=1e-5)
    assert f["logit"]["top"] == rec["logit_top_ids"].tolist()
    np.testing.assert_allclose(f["logit"]["top_v"], rec["logit_top_values"], rtol=1e-5, atol=1e-7)
    assert f["logit"]["bottom"] == rec["logit_bottom_ids"].tolist()
    assert f["logit"]["hist"] == rec["logit_hist"].tolist()
    if unit != "neurons":
      assert [n for n, _ in f["neurons"]] == rec["top_neurons"].tolist()
      assert f["corr_neuron"][0] == int(rec["corr_neuron"])
    examples = [e for g in f["groups"] for e in g["ex"]]
    assert len(examples) == len(rec["examples"])
    for ex, want in zip(examples, rec["examples"]):
      value, seq, pos, rep, ids, acts = ex[:6]
      shown = dict(map(tuple, ex[6])) if len(ex) > 6 else {}
      pieces = [shown.get(o, vocab[t]) for o, t in enumerate(ids) if t >= 0]   # the window's text, as drawn
      assert "".join(pieces) == text.visible(tb.pieces_text(ids))
      assert (seq, pos, bool(rep)) == (want["seq"], want["pos"], want["repeated"])
      assert value == pytest.approx(want["value"], rel=1e-5)
      assert ids == want["tokens"].tolist()
      dense = np.zeros(stats.WINDOW)
      for o, a in acts:
        dense[o] = a
      np.testing.assert_allclose(dense, np.nan_to_num(want["acts"]), rtol=1e-5, atol=1e-9)
    assert [g["name"] for g in f["groups"]][0] == "top"


def test_site_json_vocab_and_samples(inspector_run, inspector_site):
  meta = json.load(open(os.path.join(inspector_site, "site.json")))
  assert meta["schema"] == site.SCHEMA and meta["run"] == inspector_run
  s = _data(inspector_site, "site")
  assert [u["name"] for u in s["units"]] == ["neurons", "sae0", "sae1"]
  assert s["units"][1]["families"] == ["sae1"]          # feature splitting links between the two SAEs
  vocab = _data(inspector_site, "vocab")
  assert len(vocab) == s["vocab_size"] and all("\n" not in v for v in vocab)
  sets = {x["set"] for x in s["samples"]}
  assert {"Hostile", "Multilingual", "Docs: Python"} <= sets
  doc = _data(inspector_site, f"samples/{s['samples'][0]['k']}")
  assert set(doc["units"]) == {"neurons", "sae0", "sae1"}
  assert len(doc["pieces"]) == len(doc["tokens"]) == len(doc["units"]["sae0"]["features"])


def test_pages_load_nothing_from_the_network_and_never_parse_html_strings():
  static = site.STATIC
  for path in glob.glob(os.path.join(static, "**", "*"), recursive=True):
    if os.path.isdir(path):
      continue
    body = open(path, encoding="utf-8").read()
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", body.replace("http://www.w3.org/2000/svg", "")), path
    if path.endswith(".js"):
      code = re.sub(r"(?m)^\s*//.*$|\s//\s.*$", "", body)   # comments may name what the code avoids
      for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                   "setAttribute(\"style\"", "srcdoc"):
        assert sink not in code, (path, sink)
    if path.endswith(".html"):
      assert "Content-Security-Policy" in body and "script-src 'self'" in body, path
      assert not re.search(r"<script>(?!</script>)|\son[a-z]+=|style=", body), path   # no inline script or handler


def test_build_replaces_only_its_own_folder(inspector_run, tmp_path, monkeypatch):
  foreign = tmp_path / "somebody"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(errors.UserInputError, match="not an inspector site"):
    site.build(inspector_run, out=str(foreign), samples=False, log=lambda *_: None)
  assert (foreign / "notes.txt").read_text() == "keep me"
  out = tmp_path / "site"
  site.build(inspector_run, out=str(out), samples=False, log=lambda *_: None)
  before = sorted(os.listdir(out / "data" / "sae0" / "f"))
  # a build that fails half way leaves the previous site as it was, and no temporary folder
  def boom(*a, **k):
    raise RuntimeError("disk full")
  monkeypatch.setattr(export, "feature_record", boom)
  with pytest.raises(RuntimeError):
    site.build(inspector_run, out=str(out), samples=False, log=lambda *_: None)
  assert sorted(os.listdir(out / "data" / "sae0" / "f")) == before
  assert sorted(os.listdir(tmp_path)) == ["site", "somebody"]


def test_autointerp_results_reach_the_index_and_the_feature(inspector_run, tmp_path):
  """A model's results (RUN/autointerp/<label>/<unit>.json) where it ran, the baseline's elsewhere."""
  import shutil
  from monojax.analysis import explanations
  work = str(tmp_path / "run")
  shutil.copytree(inspector_run, work, ignore=shutil.ignore_patterns("inspector*"))
  fired = np.asarray(database.open_database(work).unit("sae0").array("fired"))
  live = [int(i) for i in np.flatnonzero(fired > 0)[:2]]
  head = {"backend": "openai", "model": "m", "baseline": False, "prompt_version": "p", "analysis": {}}
  explanations.merge_write(work, "openai-m", "sae0", head, {live[0]: {"explanation": "<b>Python</b> keywords",
                                                                     "score": 0.42, "scores": {}}})
  explanations.merge_write(work, "offline-baseline", "sae0", dict(head, backend="offline", baseline=True),
                           {i: {"explanation": f"offline baseline: active on [{i}]", "score": 0.1} for i in live})
  out = tmp_path / "site"
  site.build(work, out=str(out), samples=False, log=lambda *_: None)
  index = _data(str(out), "sae0/index")
  assert index["explanation"][live[0]] == "<b>Python</b> keywords" and index["score"][live[0]] == 0.42
  assert index["explanation_baseline"][live[0]] == 0 and index["explanation_baseline"][live[1]] == 1
  assert index["score"][live[1]] == 0.1
  rec = _data(str(out), f"sae0/f/{live[0]}")["autointerp"]
  assert rec["score"] == 0.42 and rec["label"] == "openai-m" and rec["baseline"] is False
  assert _data(str(out), f"sae0/f/{live[1]}")["autointerp"]["baseline"] is True
  assert database.open_database(work).feature(live[1])["autointerp"]["label"] == "offline-baseline"


@pytest.mark.parametrize("argv,needle", [
    (["build"], "--workdir"),
    (["serve", "--workdir=/nonexistent/run"], "not a directory"),
    (["build", "--workdir=/"], "no config.json"),
    (["serve", "--workdir=X", "--port=70000"], "port"),
    (["serve", "--workdir=X", "--port=abc"], "port"),
    ([], "build or serve"),
    (["paint", "--workdir=X"], "invalid choice"),
])
def test_bad_command_lines_say_one_line(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    rc = inspect_cli.main(argv)
    raise SystemExit(rc)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1 and err.startswith("monojax.inspect: ")


def test_a_run_without_analysis_is_told_what_to_run(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  for verb in ("build", "serve"):
    assert inspect_cli.main([verb, f"--workdir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "python -m monojax.analyze" in err and len(err.splitlines()) == 1
  assert sorted(os.listdir(run)) == ["config.json"]
