"""The analysis split (data.analysis_files): the flag, a fixed and resumable batch order, its size."""
import shutil

import grain
import numpy as np
import pytest

from monojax import errors
from monojax.data import pile_io, pipeline, sources, tokenizer as tk


@pytest.fixture
def analysis_cfg(data_cfg, tiny_corpus, pydoc_texts, tmp_path):
  """data_cfg on a copy of the tiny corpus with analysis/{a,b}.jsonl.zst (two sets, one per shard)."""
  root = tmp_path / "corpus"
  shutil.copytree(tiny_corpus, root)
  recs = [{"text": t, "meta": {"pile_set_name": "Set A" if i < 30 else "Set B"}} for i, t in enumerate(pydoc_texts)]
  pile_io.write_shard(root / "analysis" / "a.jsonl.zst", recs[:30])
  pile_io.write_shard(root / "analysis" / "b.jsonl.zst", recs[30:])
  data_cfg.path = str(root)
  return data_cfg


def _mesh():
  from monojax import sharding
  from monojax.config import base_config
  mesh_cfg = base_config().mesh
  mesh_cfg.shape = (4, 2)
  return sharding.make_mesh(mesh_cfg)


def _batches(cfg_data, mesh, **kw):
  from monojax.config import base_config
  cfg = base_config()
  cfg.data = cfg_data
  tok = tk.TextTokenizer(cfg_data.tokenizer)
  return [np.asarray(b["tokens"]) for b in pipeline.analysis_batches(cfg, tok, cfg_data.path, mesh, **kw)]


def _analysis_docs(data_cfg):
  return [r["text"] for f in sources.split_files(data_cfg, data_cfg.path, "analysis") for _, r in pile_io.read_records(f)]


def test_analysis_files_is_a_config_field_and_its_error_names_it(data_cfg):
  from monojax import config
  assert config.base_config().data.analysis_files == "analysis/*.jsonl.zst"
  assert config.ADDED_FIELDS["data.analysis_files"] == "analysis/*.jsonl.zst"  # runs written before it
  assert "analysis" in sources.ALL_SPLITS and "analysis" not in sources.SPLITS  # training never reads it
  with pytest.raises(errors.MissingInputError, match=r"^data\.analysis_files: no files match 'analysis/\*\.jsonl\.zst'"):
    sources.split_files(data_cfg, data_cfg.path, "analysis")  # the tiny corpus has none
  with pytest.raises(errors.ConfigError, match="split must be one of"):
    sources.split_files(data_cfg, data_cfg.path, "test")


def test_analysis_batches_are_the_packed_split_in_a_fixed_document_order(analysis_cfg):
  mesh = _mesh()
  got = _batches(analysis_cfg, mesh, batch_size=8)
  assert got and all(b.shape == (8, 33) and b.dtype == np.int32 for b in got)
  # The whole split, read once: documents in grain's seed-ANALYSIS_SEED permutation, EOS after each,
  # packed into full windows; the last partial batch is dropped.
  docs = _analysis_docs(analysis_cfg)
  order = [int(i) for i in grain.MapDataset.range(len(docs)).shuffle(seed=pipeline.ANALYSIS_SEED)]
  assert sorted(order) == list(range(len(docs))) and order != list(range(len(docs)))
  stream = tk.TextTokenizer(analysis_cfg.tokenizer).encode_documents([docs[i] for i in order])
  L = analysis_cfg.seq_len + 1
  assert len(got) == len(stream) // L // 8
  np.testing.assert_array_equal(np.concatenate(got).reshape(-1), stream[:len(got) * 8 * L])
  # The same batches on every call, whatever the training-side data fields say.
  analysis_cfg.seed = 7
  analysis_cfg.shuffle_windows = 0
  analysis_cfg.tokenize_batch_docs = 3
  analysis_cfg.format = "packed"
  again = _batches(analysis_cfg, mesh, batch_size=8)
  assert len(again) == len(got) and all(np.array_equal(a, b) for a, b in zip(got, again))
  # batch_size defaults to data.global_batch
  assert _batches(analysis_cfg, mesh, n_batches=1)[0].shape == (analysis_cfg.global_batch, 33)


def test_analysis_batches_resume_at_start_batch(analysis_cfg):
  mesh = _mesh()
  full = _batches(analysis_cfg, mesh, batch_size=8)
  assert len(full) >= 6
  for k in (0, 1, 5, len(full), len(full) + 3):
    rest = _batches(analysis_cfg, mesh, batch_size=8, start_batch=k)
    assert len(rest) == max(0, len(full) - k) and all(np.array_equal(a, b) for a, b in zip(rest, full[k:]))
  part = _batches(analysis_cfg, mesh, batch_size=8, start_batch=2, n_batches=3)
  assert len(part) == 3 and all(np.array_equal(a, b) for a, b in zip(part, full[2:5]))
  assert _batches(analysis_cfg, mesh, batch_size=8, n_batches=0) == []
  with pytest.raises(errors.ConfigError):
    _batches(analysis_cfg, mesh, batch_size=8, start_batch=-1)


def test_two_hosts_read_disjoint_shares_of_the_analysis_split(analysis_cfg):
  tok = tk.TextTokenizer(analysis_cfg.tokenizer)
  docs = _analysis_docs(analysis_cfg)
  order = [int(i) for i in grain.MapDataset.range(len(docs)).shuffle(seed=pipeline.ANALYSIS_SEED)]
  L = analysis_cfg.seq_len + 1
  for pi in range(2):
    got = np.concatenate([b["tokens"] for b in pipeline._analysis_host_batches(
        analysis_cfg, tok, analysis_cfg.path, host_batch=1, process_index=pi, process_count=2)]).reshape(-1)
    stream = tok.encode_documents([docs[i] for i in order[pi::2]])
    np.testing.assert_array_equal(got, stream[:len(stream) // L * L])


def test_processes_stop_together_when_one_runs_out(analysis_cfg, monkeypatch):
  """With several processes, the iteration ends at the first batch that any process lacks."""
  import jax
  from jax.experimental import multihost_utils
  asked = []

  def allgather(x):  # this process, and another one that has only two batches
    asked.append(int(x))
    return np.array([int(x), int(len(asked) <= 2)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(pipeline, "_ToGlobal", lambda sharding: (lambda batch: batch))  # host batches as they are
  got = _batches(analysis_cfg, _mesh(), batch_size=8)
  assert len(got) == 2 and asked == [1, 1, 1]
  assert all(b.shape == (4, 33) for b in got)
  # process 0 of 2 reads its share (every other document) in host batches of 8 / 2
  mine = pipeline._analysis_host_batches(analysis_cfg, tk.TextTokenizer(analysis_cfg.tokenizer), analysis_cfg.path,
                                         host_batch=4, process_index=0, process_count=2)
  assert all(np.array_equal(a, b["tokens"]) for a, b in zip(got, mine))


def test_split_token_estimate(analysis_cfg):
  tok = tk.TextTokenizer(analysis_cfg.tokenizer)
  docs = _analysis_docs(analysis_cfg)
  exact = pipeline.split_token_estimate(analysis_cfg, tok, analysis_cfg.path)
  assert exact == {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs),
                   "tokens": len(tok.encode_documents(docs)), "estimated": False}
  est = pipeline.split_token_estimate(analysis_cfg, tok, analysis_cfg.path, sample_mb=0.1)
  assert est["estimated"] and est["documents"] == exact["documents"] and est["bytes"] == exact["bytes"]
  assert 0.8 * exact["tokens"] < est["tokens"] < 1.2 * exact["tokens"]
  assert pipeline.split_token_estimate(analysis_cfg, tok, analysis_cfg.path, "val")["tokens"] == len(
      tok.encode_documents([r["text"] for f in sources.split_files(analysis_cfg, analysis_cfg.path, "val")
                            for _, r in pile_io.read_records(f)]))


def test_other_splits_and_the_source_record(analysis_cfg):
  mesh = _mesh()
  tok = tk.TextTokenizer(analysis_cfg.tokenizer)
  val = _batches(analysis_cfg, mesh, batch_size=4, split="val")
  docs = [r["text"] for f in sources.split_files(analysis_cfg, analysis_cfg.path, "val") for _, r in pile_io.read_records(f)]
  order = [int(i) for i in grain.MapDataset.range(len(docs)).shuffle(seed=pipeline.ANALYSIS_SEED)]
  stream = tok.encode_documents([docs[i] for i in order])
  np.testing.assert_array_equal(np.concatenate(val).reshape(-1), stream[:len(val) * 4 * 33])
  from monojax.config import base_config
  cfg = base_config()
  cfg.data = analysis_cfg
  rec = pipeline.analysis_source(cfg, analysis_cfg.path)
  assert rec["split"] == "analysis" and rec["flag"] == "data.analysis_files"
  assert rec["files"] == ["analysis/a.jsonl.zst", "analysis/b.jsonl.zst"]
  assert rec["documents"] == len(_analysis_docs(analysis_cfg)) and rec["bytes"] > 0
  import json
  assert json.loads(json.dumps(rec)) == rec
