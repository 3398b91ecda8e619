"""The end of a co-training run with analysis.tokens > 0 (train/loop._finish → analysis/first_look.end_of_run):
the analysis pass, RUN/report.md and the new preview.md; the report's numbers against values
recomputed from the database and metrics.jsonl; hostile token text in the report only as code; the
universality section from its files; and the fall-back when the corpus has no analysis split."""
import html.parser
import json
import math
import os
import pathlib
import re
import shutil
import types

import numpy as np
import pytest

from monojax import text
from monojax.analysis import database, first_look, report
from monojax.train import loop
from run_fixtures import tiny_config

HOSTILE = json.loads((pathlib.Path(__file__).parent.parent / "fixtures" / "hostile.json").read_text(encoding="utf-8"))
TOKENS = 2048


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pydoc_texts, analysis_corpus):
  """The train and val splits of the session's analysis corpus (tests/conftest.py), so the same BPE as
  the session's template run, and an analysis split of this module's: tests/fixtures/hostile.json."""
  from monojax.data import pile_io
  root = tmp_path_factory.mktemp("rcorpus")
  for split in ("train", "val"):
    shutil.copytree(os.path.join(analysis_corpus, split), root / split)
  recs = [{"text": t, "meta": {"pile_set_name": "Docs: Python", "id": i}} for i, t in enumerate(pydoc_texts)]
  hostile = {"text": " ".join(HOSTILE.values()) * 8, "meta": {"pile_set_name": "Docs: Python", "id": -1}}
  pile_io.write_shard(root / "analysis" / "an.jsonl.zst", [hostile] + recs[1::10])
  return str(root)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """A run trained by the main loop (loop.run) with analysis.tokens = TOKENS: its end-of-run step
  writes the database, report and preview. Returns (workdir, log lines). Its model, SAEs (64 and 96
  features) and tokenizer (the step holds its token byte lengths) are those of the session's template
  run (tests/conftest.py): the same programs, so its training compiles nothing new once that run has
  trained (persistent-cache hits)."""
  base = tmp_path_factory.mktemp("rrun")
  c = tiny_config(corpus, str(base / "idx"), **{
      "train.eval_every": 4, "train.log_every": 2, "sae.min_ablation_gap": 0.0, "analysis.tokens": TOKENS})
  logged = []
  loop.run(c, str(base / "run"), log=logged.append)
  return str(base / "run"), [str(x) for x in logged]


def test_end_of_run_writes_database_report_and_preview(trained):
  wd, logged = trained
  db = database.open_database(wd)
  assert db.meta["source"]["split"] == "analysis" and db.n_tokens >= TOKENS
  assert [u["name"] for u in db.meta["units"]] == ["neurons", "sae0", "sae1"]
  md = _read(os.path.join(wd, "report.md"))
  assert md.startswith("# Run report") and len(md.splitlines()) > 30
  for png in ("loss.png", "l0_loss_recovered.png", "sae0_density.png", "sae1_density.png"):
    assert os.path.getsize(os.path.join(wd, report.PLOTS, png)) > 1000, png
  preview = _read(os.path.join(wd, "preview.md"))
  assert preview.startswith("# Feature preview: sae0") and "picked for:" in preview and "«" in preview
  assert "top logit tokens:" in preview
  assert any("(written to" in line and "picked for" in line for line in logged)
  assert not os.path.exists(os.path.join(wd, "plots"))  # not the quick val-split preview
  # the offline autointerp baseline (analysis.autointerp), in its folder and the report, named as such
  for unit in ("neurons", "sae0", "sae1"):
    assert os.path.exists(os.path.join(wd, "autointerp", "offline-baseline", f"{unit}.json")), unit
  assert "### offline-baseline: the offline baseline" in _section(md, "Automated interpretability")
  # then the inspector site, and the page to open is the last thing said
  index = os.path.join(wd, "inspector", "index.html")
  assert os.path.exists(index) and os.path.exists(os.path.join(wd, "inspector", "data", "sae1", "index.js"))
  assert logged[-1].endswith(f"open file://{index}")


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _section(md, title):
  return md.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def _row(md, first_cell):
  """The cells of the (first) Markdown table row starting with `| first_cell |`."""
  for line in md.splitlines():
    if line.startswith(f"| {first_cell} |"):
      return [c.strip() for c in line.strip("|").split(" | ")]
  raise AssertionError(f"no row {first_cell!r}")


def test_report_numbers_are_the_database_and_metrics(trained):
  wd, _ = trained
  md = _read(os.path.join(wd, "report.md"))
  db = database.open_database(wd)
  n = db.n_tokens
  assert f"**{n:,} tokens**" in md and "analysis split" in md
  assert f"{db.meta['source']['documents']:,} documents" in md
  # dead / ultralow / dense / live / median, recomputed from each unit's firing counts
  for u in db.meta["units"]:
    fired = np.asarray(db.unit(u["name"]).array("fired"), np.int64)
    d = fired / n
    live = d[fired > 0]
    want = [u["name"], u["kind"], f"{fired.size:,}", f"{int((fired == 0).sum()):,}",
            f"{int(((fired > 0) & (d < database.ULTRALOW)).sum()):,}", f"{int((d > database.DENSE).sum()):,}",
            f"{live.size:,}", f"{np.median(live):.2e}"]
    assert _row(_section(md, "Feature density"), u["name"]) == want
  # the density histograms: counts of log10 density of the live features, dead apart
  for name in ("sae0", "sae1"):
    h = json.loads(_read(os.path.join(wd, report.PLOTS, f"{name}_density.json")))
    fired = np.asarray(db.unit(name).array("fired"), np.int64)
    ref, _ = np.histogram(np.log10(fired[fired > 0] / n), bins=np.asarray(h["log10_bin_edges"]))
    assert h["counts"] == ref.tolist() and h["dead"] == int((fired == 0).sum()) and h["n_tokens"] == n
  # loss and the SAEs' last eval, from metrics.jsonl
  rows = [json.loads(line) for line in _read(os.path.join(wd, "metrics.jsonl")).splitlines()]
  train = [r for r in rows if "loss" in r][-1]
  ev = [r for r in rows if "eval/loss" in r][-1]
  assert f"Last train loss {train['loss']:.4f} (step {train['step']})" in md
  assert f"last held-out eval loss {ev['eval/loss']:.4f} (step {ev['step']})" in md
  for name in ("sae0", "sae1"):
    last = [r for r in rows if f"{name}_eval/l0" in r][-1]
    cells = _row(_section(md, "SAEs"), name)
    assert cells[2:] == [str(last["step"]), f"{last[f'{name}_eval/l0']:.2f}",
                         f"{last[f'{name}_eval/loss_recovered']:.4f}", f"{last[f'{name}_eval/fvu']:.4f}"]
  # proxies: per unit, the best feature by correlation and its precision and recall
  present = [(p, q["name"]) for p, q in enumerate(db.meta["proxies"]) if q["share"] > 0]
  assert present, "the analysis split holds proxy text (code keywords, a URL)"
  for u in db.meta["units"]:
    unit = db.unit(u["name"])
    section = md.split(f"**{u['name']}**", 1)[1].split("\n\n", 2)[1]
    for p, name in present:
      corr = np.asarray(unit.array("proxy_corr"), np.float64)[:, p]
      best = int(np.nanargmax(corr))
      line = next(l for l in section.splitlines() if l.startswith(f"| {name} |"))
      cells = [c.strip() for c in line.strip("|").split(" | ")][:6]
      assert cells == [name, f"{db.meta['proxies'][p]['share']:.2%}", str(best), f"{corr[best]:.3f}",
                       f"{unit.array('proxy_precision')[best, p]:.3f}", f"{unit.array('proxy_recall')[best, p]:.3f}"]
  # feature splitting: sae0 (64) → sae1 (96) from the stored families table
  fam = db.families("sae0", "sae1")
  cos = np.asarray(fam["cos"], np.float64)
  cells = _row(_section(md, "Feature splitting"), "sae0 (64) → sae1 (96)")
  assert cells[1:5] == ["64", f"{int((cos[:, 0] >= report.MATCH_COS).sum()):,}",
                        f"{int(((cos >= report.SPLIT_COS).sum(1) >= 2).sum()):,}", f"{np.median(cos[:, 0]):.3f}"]
  assert "## Universality" not in md  # no RUN/universality


class _Elements(html.parser.HTMLParser):
  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.code, self._in = [], [], False

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, attrs))
    if tag == "code":
      self._in = True
      self.code.append("")

  handle_startendtag = handle_starttag

  def handle_endtag(self, tag):
    if tag == "code":
      self._in = False

  def handle_data(self, data):
    if self._in:
      self.code[-1] += data


def test_hostile_token_text_renders_as_code(trained, tmp_path):
  """Every token string decodes to a hostile string: the rendered report has no element or
  attribute from them (images only from the report's own plots), and each shows inside code."""
  markdown_it = pytest.importorskip("markdown_it")
  wd, _ = trained
  vocab = [HOSTILE[k] for k in sorted(HOSTILE)]
  tok = types.SimpleNamespace(decode=lambda ids: "".join(vocab[int(i) % len(vocab)] for i in ids))
  path = report.write_report(wd, log=lambda *a: None, tokenizer=tok)
  md = _read(path)
  rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
  low = rendered.lower()
  for bad in ("<script", "<svg", "<iframe", "<a ", 'href="javascript:', "<img src=\"x"):
    assert bad not in low, bad
  parsed = _Elements()
  parsed.feed(rendered)
  assert {t for t, _ in parsed.tags} <= {"h1", "h2", "h3", "p", "ul", "li", "code", "strong", "img", "table", "thead",
                                        "tbody", "tr", "th", "td"}
  allowed = {"img": {"src", "alt"}, "th": {"style"}, "td": {"style"}}
  assert all({k for k, _ in a} <= allowed.get(t, set()) for t, a in parsed.tags), "no attribute from corpus text"
  imgs = [dict(a)["src"] for t, a in parsed.tags if t == "img"]
  assert imgs and all(re.fullmatch(r"report/[a-z0-9_]+\.png", s) for s in imgs), imgs
  shown = "".join(parsed.code)
  assert any(s in shown for s in vocab if "<" in s)  # the token text is there, as text
  assert "\x1b" not in md and "\u202e" not in md
  report.write_report(wd, log=lambda *a: None)  # leave the real report for the other tests


def test_universality_section_from_its_files(trained):
  wd, _ = trained
  u = os.path.join(wd, "universality")
  os.makedirs(u)
  try:
    summary = {"run_b": "/runs/b <script>", "sae_a": "sae0", "sae_b": "sae0", "n_tokens": 4096,
               "features": {"median_max_corr": 0.61234, "mean_max_corr": 0.5, "n": 64, "excluded": 2,
                            "hist_counts": [1, 2], "hist_edges": [0, 0.5, 1]},
               "neurons": {"median_max_corr": 0.9, "mean_max_corr": 0.8, "n": 64, "excluded": 0,
                           "hist_counts": [1, 2], "hist_edges": [0, 0.5, 1]}}
    with open(os.path.join(u, "summary.json"), "w") as f:
      json.dump(summary, f)
    md = _read(report.write_report(wd, log=lambda *a: None))
    assert "## Universality" in md and text.markdown_code("/runs/b <script>") in md and "4,096 tokens" in md
    uni = _section(md, "Universality")
    assert _row(uni, "features") == ["features", "64", "0.612", "0.500", "2"]
    assert _row(uni, "neurons") == ["neurons", "64", "0.900", "0.800", "0"]
    assert "universality/hist.png" not in md  # no plot there
  finally:
    import shutil
    shutil.rmtree(u)
    report.write_report(wd, log=lambda *a: None)


def test_no_analysis_split_falls_back_in_one_line(trained):
  from monojax.run import Run
  wd, _ = trained
  run = Run.open(wd)
  run.cfg.data.analysis_files = "nothing/*.jsonl.zst"
  logged = []
  assert first_look.end_of_run(run, logged.append) is False
  assert len(logged) == 1 and "no analysis split" in logged[0] and "data.analysis_files" in logged[0]
  assert math.isfinite(run.cfg.analysis.tokens)
