"""The grain pipeline: both readers, packing, host slicing, resume, global arrays, bad input."""
import json

import numpy as np
import pytest
import zstandard

from monojax.data import pipeline, pile_io, sources, tokenizer as tk


def _tok(data_cfg):
  return tk.TextTokenizer(data_cfg.tokenizer)


def _batches(data_cfg, split="train", **kw):
  args = dict(tokenizer=_tok(data_cfg), root=data_cfg.path, host_batch=data_cfg.global_batch, seed=0,
              process_index=0, process_count=1)
  args.update(kw)
  return pipeline.host_batches(data_cfg, split, **args)


def _docs(data_cfg, split):
  return [r["text"] for f in sources.split_files(data_cfg, data_cfg.path, split)
          for _, r in pile_io.read_records(f)]


def test_raw_batches_have_the_right_shape(data_cfg):
  it = iter(_batches(data_cfg))
  for _ in range(3):
    b = next(it)
    assert b["tokens"].shape == (4, 33) and b["tokens"].dtype == np.int32
    assert b["tokens"].max() < 512


@pytest.mark.parametrize("fmt", ["raw", "packed"])
def test_packing_loses_and_duplicates_nothing(data_cfg, fmt):
  """One pass, in order: windows concatenate to exactly the EOS-joined token stream."""
  data_cfg.format = fmt
  tok = _tok(data_cfg)
  stream = tok.encode_documents(_docs(data_cfg, "val"))
  windows = np.concatenate([b["tokens"] for b in _batches(data_cfg, "val", host_batch=1, repeat=False)])
  L = data_cfg.seq_len + 1
  assert windows.shape == (len(stream) // L, L)
  np.testing.assert_array_equal(windows.reshape(-1), stream[:windows.size])


def test_two_hosts_see_disjoint_data_that_covers_everything(data_cfg):
  tok = _tok(data_cfg)
  docs = _docs(data_cfg, "val")
  L = data_cfg.seq_len + 1
  for pi in range(2):
    got = np.concatenate([b["tokens"] for b in _batches(data_cfg, "val", host_batch=1, repeat=False,
                                                        process_index=pi, process_count=2)]).reshape(-1)
    stream = tok.encode_documents(docs[pi::2])
    np.testing.assert_array_equal(got, stream[:len(stream) // L * L])


def _global_order(n, seed, positions):
  """Document index at each global position of the shuffled, repeating training stream, computed
  from grain's index permutation alone: shuffle a range of n with the seed, repeat (reshuffled each
  epoch), read position j."""
  import grain
  order = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
  return [int(order[j]) % n for j in range(positions)]


def _host_windows(data_cfg, n_windows, **kw):
  it = iter(_batches(data_cfg, host_batch=32, **kw))
  got = []
  while sum(len(b) for b in got) < n_windows:
    got.append(next(it)["tokens"])
  return np.concatenate(got)[:n_windows]


def test_two_hosts_shuffled_training_differs_and_matches_the_global_order(data_cfg):
  """The training path (repeat, shuffle; window shuffle off): host i of 2 reads the documents at
  global shuffled positions i, i+2, i+4, ..., tokenized with EOS after each and packed, through
  the first epoch and into the second (reshuffled). So the hosts are disjoint and together cover
  each epoch, and the data seed picks the order."""
  data_cfg.shuffle_windows = 0
  tok = _tok(data_cfg)
  src = pipeline.text_source(data_cfg, data_cfg.path, "train")
  n = len(src)
  docs = [src[i] for i in range(n)]
  assert docs == _docs(data_cfg, "train")  # index i -> the i-th document of the shards, in order
  L = data_cfg.seq_len + 1
  orders = {}
  for seed in (0, 7):
    order = orders[seed] = _global_order(n, seed, 3 * n)
    epochs = [order[e * n:(e + 1) * n] for e in range(3)]
    for e, ep in enumerate(epochs):
      assert sorted(ep) == list(range(n))  # each epoch is a permutation of the documents...
      host0, host1 = ({ep[t] for t in range(n) if (e * n + t) % 2 == h} for h in (0, 1))
      assert not host0 & host1 and host0 | host1 == set(range(n))  # ...split disjointly over 2 hosts
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    for pi in range(2):
      # Host pi's documents over the first two epochs: global positions pi, pi+2, ... < 2n.
      mine = [order[j] for j in range(pi, 2 * n, 2)]
      stream = tok.encode_documents([docs[d] for d in mine])
      k = len(stream) // L  # the host's stream goes on, so its first k windows lie inside `stream`
      first_epoch = sum(1 for j in range(pi, 2 * n, 2) if j < n)
      assert len(tok.encode_documents([docs[d] for d in mine[:first_epoch]])) < (k - 10) * L  # crosses the epoch
      got = _host_windows(data_cfg, k, seed=seed, process_index=pi, process_count=2)
      np.testing.assert_array_equal(got.reshape(-1), stream[:k * L], err_msg=f"seed {seed} host {pi}")
  assert orders[0][:n] != orders[7][:n]  # the data seed changes the order
  assert orders[0][:n] != list(range(n))  # and it is shuffled


def test_window_shuffle_permutes_packed_windows_within_blocks(data_cfg):
  """Training windows are shuffled in blocks of data.shuffle_windows: the first block holds the
  same windows as the unshuffled (document-shuffled) stream, in another order."""
  def first(n_windows, shuffle_windows):
    data_cfg.shuffle_windows = shuffle_windows
    it = iter(_batches(data_cfg, host_batch=1))
    return [next(it)["tokens"][0] for _ in range(n_windows)]
  plain, shuffled = first(16, 0), first(16, 16)
  assert sorted(map(bytes, plain)) == sorted(map(bytes, shuffled))
  assert [bytes(w) for w in plain] != [bytes(w) for w in shuffled]


@pytest.mark.parametrize("fmt,workers", [("raw", 0), ("packed", 0), ("raw", 1)])
def test_iterator_state_resumes_with_exactly_the_next_batch(data_cfg, fmt, workers):
  data_cfg.format = fmt
  data_cfg.workers = workers
  it = iter(_batches(data_cfg))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it)["tokens"] for _ in range(3)]
  it2 = iter(_batches(data_cfg))
  it2.set_state(json.loads(json.dumps(state)))  # as grain's checkpoint handler stores it
  got = [next(it2)["tokens"] for _ in range(3)]
  for e, g in zip(expect, got):
    np.testing.assert_array_equal(e, g)


def test_orbax_grain_checkpoint_round_trip(data_cfg, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  it = iter(_batches(data_cfg))
  next(it)
  next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expect = next(it)["tokens"]
  it2 = iter(_batches(data_cfg))
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  np.testing.assert_array_equal(next(it2)["tokens"], expect)


def test_global_arrays_on_an_8_device_mesh(data_cfg):
  import jax
  from monojax import sharding
  from monojax.config import base_config
  mesh_cfg = base_config().mesh
  mesh_cfg.shape = (4, 2)
  mesh = sharding.make_mesh(mesh_cfg)
  data_cfg.global_batch = 8
  it = iter(pipeline.to_global(_batches(data_cfg, host_batch=8), mesh))
  b = next(it)["tokens"]
  assert isinstance(b, jax.Array) and b.shape == (8, 33)
  assert b.sharding.spec == jax.sharding.PartitionSpec("data")
  assert len(b.addressable_shards) == 8 and b.addressable_shards[0].data.shape == (2, 33)
  state = it.get_state()
  nxt = np.asarray(next(it)["tokens"])
  it2 = iter(pipeline.to_global(_batches(data_cfg, host_batch=8), mesh))
  it2.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(it2)["tokens"]), nxt)


def _corpus_with_bad_line(tmp_path, line: bytes):
  root = tmp_path / "bad_corpus"
  good = [json.dumps({"text": f"good document number {i} " * 20, "meta": {"pile_set_name": "s"}}).encode()
          for i in range(40)]
  for split in ("train", "val"):
    (root / split).mkdir(parents=True)
    (root / split / "x.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"\n".join(good[:5] + [line] + good[5:]) + b"\n"))
  return str(root)


@pytest.mark.parametrize("fmt", ["raw", "packed"])
def test_bad_record_raises_naming_file_and_line(data_cfg, tmp_path, fmt):
  data_cfg.path = _corpus_with_bad_line(tmp_path, b"{broken json")
  data_cfg.format = fmt
  with pytest.raises(pile_io.CorruptInputError, match=r"x\.jsonl\.zst:6: line is not JSON"):
    next(iter(_batches(data_cfg)))


@pytest.mark.parametrize("fmt", ["raw", "packed"])
def test_bad_record_skipped_and_counted(data_cfg, tmp_path, fmt):
  data_cfg.path = _corpus_with_bad_line(tmp_path, b'{"meta": {}}')
  data_cfg.format = fmt
  data_cfg.on_error = "skip"
  logs = []
  b = next(iter(_batches(data_cfg, log=logs.append)))
  assert b["tokens"].shape == (4, 33)
  assert any("no_text=1" in line for line in logs), logs


def test_index_is_cached_and_invalidated_by_changes(data_cfg, tmp_path):
  files = sources.split_files(data_cfg, data_cfg.path, "val")
  logs = []
  s1 = sources.JsonlZstSource(files, index_dir=str(tmp_path / "idx"), log=logs.append)
  s2 = sources.JsonlZstSource(files, index_dir=str(tmp_path / "idx"), log=logs.append)
  assert s1.dir == s2.dir and sum("indexed" in l for l in logs) == 1
  assert s1[0] == _docs(data_cfg, "val")[0] and s1.set_name(0) == "Docs: Python (odd)"
  s3 = sources.JsonlZstSource(files, on_error="skip", index_dir=str(tmp_path / "idx"), log=logs.append)
  assert s3.dir != s1.dir


def test_index_is_invalidated_by_an_edited_or_touched_shard(data_cfg, tmp_path):
  """The cache key is each file's path, size and mtime: a rewritten shard (new size, old mtime put
  back) and a touched one (same bytes, new mtime) each get a new index, built from the new bytes."""
  import os
  import shutil
  root = tmp_path / "corpus"
  shutil.copytree(data_cfg.path, root)  # the session corpus stays as it is
  files = sources.split_files(data_cfg, str(root), "val")
  idx, logs = str(tmp_path / "idx"), []
  s1 = sources.JsonlZstSource(files, index_dir=idx, log=logs.append)
  assert [s1[i] for i in range(len(s1))] == _docs(data_cfg, "val")
  shard = files[0]
  before = os.stat(shard)
  edited = [{"text": f"an edited document {i}. " * (i + 1), "meta": {"pile_set_name": "Edited"}} for i in range(3)]
  pile_io.write_shard(shard, edited)  # overwrites the shard in place
  os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # only the size tells it apart
  assert os.stat(shard).st_size != before.st_size and os.stat(shard).st_mtime_ns == before.st_mtime_ns
  s2 = sources.JsonlZstSource(files, index_dir=idx, log=logs.append)
  assert s2.dir != s1.dir
  assert [s2[i] for i in range(len(s2))] == [r["text"] for r in edited] and s2.set_name(0) == "Edited"
  size = os.stat(shard).st_size
  os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 5 * 10**9))  # touched: same bytes
  assert os.stat(shard).st_size == size
  s3 = sources.JsonlZstSource(files, index_dir=idx, log=logs.append)
  assert s3.dir not in (s1.dir, s2.dir)
  assert [s3[i] for i in range(len(s3))] == [r["text"] for r in edited]
  assert sum("indexed" in line for line in logs) == 3
  s4 = sources.JsonlZstSource(files, index_dir=idx, log=logs.append)  # unchanged again: cached
  assert s4.dir == s3.dir and sum("indexed" in line for line in logs) == 3


def test_missing_inputs_give_clear_errors(data_cfg, tmp_path):
  data_cfg.path = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="data.path"):
    pipeline.corpus_root(data_cfg)
  data_cfg.path = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="data.train_files"):
    sources.split_files(data_cfg, data_cfg.path, "train")
  with pytest.raises(ValueError, match="divisible"):
    pipeline.host_batch_size(6, 4)
