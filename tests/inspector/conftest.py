"""One tiny co-trained run with a feature database, shared by the inspector tests (the build, the
server, the browser). Its analysis split holds hostile text: HTML, script tags, event handlers, quote
breaks, `javascript:` links and template-injection strings, which every page must show as text."""
import os

import pytest

from monojax.analysis import scan
from monojax.config import base_config
from monojax.run import Run
from monojax.train import job as job_lib, loop

quiet = lambda *a, **k: None  # noqa: E731

# Each string must reach the page as written and execute nothing.
HOSTILE = [
    "<script>window.__pwned=1</script>",
    "</script><script>window.__pwned=2</script>",
    "<img src=x onerror=\"window.__pwned=3\">",
    "\"><svg onload=window.__pwned=4>",
    "' onmouseover='window.__pwned=5' x='",
    "<a href=\"javascript:window.__pwned=6\">click</a>",
    "{{constructor.constructor('window.__pwned=7')()}}",
    "${window.__pwned=8}",
    "<iframe srcdoc=\"<script>parent.__pwned=9</script>\"></iframe>",
    "<style>body{display:none}</style>",
]


@pytest.fixture(scope="session")
def hostile():
  return list(HOSTILE)


@pytest.fixture(scope="session")
def inspector_corpus(tmp_path_factory, pydoc_texts):
  from monojax.data import pile_io
  root = tmp_path_factory.mktemp("icorpus")
  recs = [{"text": t, "meta": {"pile_set_name": "Docs: Python", "id": i}} for i, t in enumerate(pydoc_texts)]
  hostile = " ".join(HOSTILE)
  extra = [{"text": (hostile + " Привет мир, как дела? ") * 6, "meta": {"pile_set_name": "Hostile", "id": -1}},
           {"text": ("مرحبا بالعالم " + hostile) * 4, "meta": {"pile_set_name": "Multilingual", "id": -2}}]
  pile_io.write_shard(root / "train" / "a.jsonl.zst", [r for i, r in enumerate(recs) if i % 10 > 1] + extra)
  pile_io.write_shard(root / "val" / "val.jsonl.zst", recs[::10])
  pile_io.write_shard(root / "analysis" / "an.jsonl.zst", extra + recs[1::10])
  return str(root)


@pytest.fixture(scope="session")
def inspector_run(inspector_corpus, tmp_path_factory):
  """A finished run (2 SAEs, 64 and 96 features) with RUN/analysis written over its analysis split."""
  base = tmp_path_factory.mktemp("irun")
  c = base_config()
  c.data.path, c.data.tokenizer, c.data.index_dir = inspector_corpus, "bpe:400", str(base / "idx")
  c.data.seq_len, c.data.global_batch, c.data.count_tokens, c.preview_batches = 16, 8, False, 0
  c.model.d_model, c.model.d_mlp, c.model.n_heads, c.model.d_head = 32, 64, 2, 16
  c.train.steps, c.train.ckpt_every, c.train.eval_every, c.train.eval_batches = 8, 8, 0, 1
  c.train.log_every, c.train.warmup_steps, c.train.async_checkpoints = 4, 2, False
  c.sae.saes = "64:0.004:2023,96:0.004:2023"
  c.sae.start_step, c.sae.buffer_steps, c.sae.positions_per_context, c.sae.batch_size = 1, 1, 8, 32
  c.analysis.tokens = 0
  workdir = str(base / "run")
  job = job_lib.setup(c, workdir, quiet)
  preempt = loop._Preemption(quiet)
  try:
    loop._steps(job, preempt, quiet)
  finally:
    preempt.restore()
    job.close()
  run = Run.open(workdir)
  scan.run_pass(run, scan.Options(tokens=8 * 16 * 6, batch_size=8, flush_every=2, save_every_s=0.0), log=quiet)
  assert os.path.isdir(os.path.join(workdir, "analysis"))
  return workdir


@pytest.fixture(scope="session")
def inspector_site(inspector_run):
  """RUN/inspector/ of the tiny run; returns its folder."""
  from monojax.inspector import site
  index = site.build(inspector_run, log=quiet)
  return os.path.dirname(index)


CHROMIUM = os.environ.get("MONOJAX_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser():
  """Headless Chromium (Debian's package, driven by pip playwright: no browser download). CI sets
  MONOJAX_REQUIRE_BROWSER=1, so a missing browser fails there instead of skipping."""
  required = os.environ.get("MONOJAX_REQUIRE_BROWSER") == "1"
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    if required:
      raise
    pytest.skip("playwright is not installed (pip install -e '.[test]')")
  if not os.path.exists(CHROMIUM):
    if required:
      raise FileNotFoundError(f"{CHROMIUM}: no Chromium (apt-get install chromium, or set MONOJAX_CHROMIUM)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield b
    b.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
  """Where the browser tests save screenshots (MONOJAX_TEST_ARTIFACTS, else a temporary folder)."""
  path = os.environ.get("MONOJAX_TEST_ARTIFACTS") or str(tmp_path_factory.mktemp("artifacts"))
  os.makedirs(path, exist_ok=True)
  return path
