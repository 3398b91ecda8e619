"""Test setup: CPU with 8 virtual devices, absl flags parsed (grain reads them), a persistent
compile cache, and a small real-text corpus built from Python's own docs (no network)."""
import os

import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Most test time on 2 cores is XLA compiling the same tiny programs again in each subprocess run of
# the main entry: share one persistent compile cache per test session (inherited by subprocesses)
# and compile tiny models at LLVM -O0. Neither changes the HLO, so results are unchanged.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="monojax-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402
from run_fixtures import HOSTILE, analysis_options, copy_run, tiny_config, train_in_process  # noqa: E402 (tests/run_fixtures.py)


@pytest.fixture(scope="session")
def pydoc_texts():
  """~80 real English documents (0.7 MB) from pydoc_data.topics."""
  from pydoc_data.topics import topics
  return [topics[k] for k in sorted(topics) if len(topics[k]) > 200]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, pydoc_texts):
  """A Pile-format corpus dir: train/{a,b}.jsonl.zst, val/val.jsonl.zst; returns its path."""
  from monojax.data import pile_io
  root = tmp_path_factory.mktemp("corpus")
  recs = [{"text": t, "meta": {"pile_set_name": "Docs: Python" if i % 3 else "Docs: Python (odd)", "id": i}}
          for i, t in enumerate(pydoc_texts)]
  val = recs[::10]
  train = [r for i, r in enumerate(recs) if i % 10]
  pile_io.write_shard(root / "train" / "a.jsonl.zst", train[: len(train) // 2])
  pile_io.write_shard(root / "train" / "b.jsonl.zst", train[len(train) // 2:])
  pile_io.write_shard(root / "val" / "val.jsonl.zst", val)
  return str(root)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory, pydoc_texts):
  """A 512-token byte-level BPE trained on the pydoc texts (~0.1 s)."""
  from monojax.data import tokenizer
  path = tmp_path_factory.mktemp("tok") / "bpe512.json"
  tokenizer.train_bpe(pydoc_texts, 512, path)
  return str(path)


@pytest.fixture
def data_cfg(tiny_corpus, tiny_tokenizer_path, tmp_path):
  from monojax.config import base_config
  c = base_config().data
  c.path = tiny_corpus
  c.tokenizer = tiny_tokenizer_path
  c.seq_len = 32
  c.global_batch = 4
  c.index_dir = str(tmp_path / "index")
  c.packed_dir = str(tmp_path / "packed")
  c.prefetch = 4
  c.tokenize_batch_docs = 4
  c.shuffle_windows = 16  # small, so the resume tests cross a shuffle-block boundary
  return c


@pytest.fixture(scope="session")
def analysis_corpus(tmp_path_factory, pydoc_texts):
  """train/val/analysis splits of the pydoc texts; the analysis split also holds hostile HTML, a URL,
  hex, Cyrillic and Arabic (documents of the sets "Hostile" and "Multilingual")."""
  from monojax.data import pile_io
  root = tmp_path_factory.mktemp("acorpus")
  recs = [{"text": t, "meta": {"pile_set_name": "Docs: Python", "id": i}} for i, t in enumerate(pydoc_texts)]
  hostile = " ".join(HOSTILE)
  extra = [{"text": (hostile + " see https://example.org/a?b=1 and 0xDEADBEEF12 and Привет мир, как дела? ") * 6,
            "meta": {"pile_set_name": "Hostile", "id": -1}},
           {"text": ("مرحبا بالعالم " + hostile) * 4, "meta": {"pile_set_name": "Multilingual", "id": -2}}]
  pile_io.write_shard(root / "train" / "a.jsonl.zst", [r for i, r in enumerate(recs) if i % 10 > 1] + extra)
  pile_io.write_shard(root / "val" / "val.jsonl.zst", recs[::10])
  pile_io.write_shard(root / "analysis" / "an.jsonl.zst", extra + recs[1::10])
  return str(root)


@pytest.fixture(scope="session")
def cotrained_run_template(analysis_corpus, tmp_path_factory):
  """A finished tiny co-trained run (d_model 32, d_mlp 64, 2 SAEs of 64 and 96 features, seq_len 16,
  8 steps, no analysis), trained once per session. Tests copy it (copy_run) and own their copy."""
  base = tmp_path_factory.mktemp("template")
  workdir = str(base / "run")
  train_in_process(tiny_config(analysis_corpus, str(base / "idx")), workdir)
  return workdir


@pytest.fixture(scope="session")
def analysed_run_template(cotrained_run_template, tmp_path_factory):
  """The session's tiny co-trained run with RUN/analysis (run_fixtures.analysis_options: 768 tokens of
  its analysis split, which holds the hostile text), analysed ONCE per session: the analysis pass is
  what costs, copying the run (~1 MB) is cheap. Shared by tests/analysis, tests/inspector and
  tests/autointerp; nobody writes into it: tests copy it (copy_run) and own their copy."""
  from monojax.analysis import scan
  from monojax.run import Run
  workdir = copy_run(cotrained_run_template, str(tmp_path_factory.mktemp("analysed") / "run"))
  scan.run_pass(Run.open(workdir, log=lambda *a, **k: None), analysis_options(), log=lambda *a, **k: None)
  assert os.path.isdir(os.path.join(workdir, "analysis"))
  return workdir
