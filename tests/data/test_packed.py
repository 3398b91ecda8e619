"""The packed reader (data/packed.py): the permutation, epochs, host slicing, bad directories, and
old run configs naming the TFDS format."""
import json
import os

import numpy as np
import pytest

from monojax import errors
from monojax.data import packed, pipeline, tokenizer as tk


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 1025, 4099])
def test_permute_is_a_bijection_of_every_size(n):
  for seed, epoch in ((0, 0), (1, 0), (0, 1), (12345, 7)):
    out = packed.permute(np.arange(n), n, seed, epoch)
    assert sorted(out.tolist()) == list(range(n))


def test_permute_depends_on_seed_and_epoch_and_matches_pointwise():
  n = 1000
  a, b, c = (packed.permute(np.arange(n), n, s, e) for s, e in ((0, 0), (1, 0), (0, 1)))
  assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9 and (a != np.arange(n)).mean() > 0.9
  idx = np.array([999, 3, 500, 3])  # any subset, any order: the same values as the whole
  np.testing.assert_array_equal(packed.permute(idx, n, 0, 0), a[idx])


def _split(data_cfg, split="train"):
  data_cfg.format = "packed"
  return packed.open_split(data_cfg, data_cfg.path, split, tk.TextTokenizer(data_cfg.tokenizer), log=lambda _: None)


def _ds(data_cfg, **kw):
  args = dict(host_batch=2, seed=3, process_index=0, process_count=1, repeat=True, shuffle=True)
  args.update(kw)
  return packed.PackedBatches(**_split(data_cfg), **args)


def test_each_epoch_is_a_new_permutation_of_every_window(data_cfg):
  meta = _split(data_cfg)
  n, rows = meta["n"], np.memmap(meta["path"], meta["dtype"], "r", shape=(meta["n"], meta["window"]))
  ds = _ds(data_cfg, host_batch=1)
  ids = [ds.positions(k)[0] for k in range(2 * n)]
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n)) and ids[:n] != ids[n:]
  np.testing.assert_array_equal(ds[5]["tokens"][0], rows[ids[5]].astype(np.int32))
  assert ds[5]["tokens"].dtype == np.int32


def test_hosts_read_disjoint_windows_that_cover_the_split(data_cfg):
  n = _split(data_cfg)["n"]
  seen = []
  for p in range(3):
    ds = _ds(data_cfg, process_index=p, process_count=3, repeat=False)
    assert len(ds) == len(range(p, n, 3)) // 2
    seen += [i for k in range(len(ds)) for i in ds.positions(k)]
  assert len(seen) == len(set(seen)) and len(seen) >= n - 3 * 2
  assert set(seen) <= set(range(n))


def test_a_batch_spanning_two_epochs(data_cfg):
  n = _split(data_cfg)["n"]
  ds = _ds(data_cfg, host_batch=n - 1)
  both = np.concatenate([ds.positions(0), ds.positions(1)])  # 2n − 2 positions: epoch 0, then n − 2 of epoch 1
  assert sorted(both[:n].tolist()) == list(range(n)) and len(set(both[n:].tolist())) == n - 2


def test_grain_pickles_the_dataset_without_its_memory_map(data_cfg):
  import pickle
  ds = _ds(data_cfg)
  first = ds[0]["tokens"]
  again = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(again[0]["tokens"], first)


def test_a_damaged_directory_is_named_not_misread(data_cfg):
  meta = _split(data_cfg)
  with open(meta["path"], "r+b") as f:
    f.truncate(os.path.getsize(meta["path"]) - 2)
  with pytest.raises(errors.RunFormatError, match=r"train\.tokens: expected .* bytes .*delete"):
    _split(data_cfg)


def test_old_runs_naming_the_tfds_format_still_load(tmp_path):
  from monojax import config
  cfg = config.base_config()
  saved = json.loads(cfg.to_json_best_effort())
  saved["data"]["format"] = "tfds"
  saved["data"]["tfds_dir"] = saved["data"].pop("packed_dir")
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  loaded = config.load_resolved(str(path))
  assert loaded.data.format == "packed" and loaded.data.packed_dir == cfg.data.packed_dir


def test_first_training_batch_through_the_pipeline(data_cfg):
  data_cfg.format = "packed"
  it = iter(pipeline.host_batches(data_cfg, "train", tokenizer=tk.TextTokenizer(data_cfg.tokenizer),
                                  root=data_cfg.path, host_batch=4, seed=0, process_index=0, process_count=1))
  b = next(it)["tokens"]
  assert b.shape == (4, data_cfg.seq_len + 1) and b.dtype == np.int32


def test_cached_blocks_agree_with_the_definition(data_cfg):
  """Window ids are computed a block of batches at a time: across block edges they still follow
  position t = (k·host_batch + j)·process_count + process_index → permute(t mod n, seed, t div n)."""
  meta = _split(data_cfg)
  n = meta["n"]
  ds = _ds(data_cfg, host_batch=3, process_index=1, process_count=2)
  for k in (0, packed._BLOCK - 1, packed._BLOCK, packed._BLOCK + 1, 3 * packed._BLOCK + 7, 5):
    t = (k * 3 + np.arange(3)) * 2 + 1
    want = [packed.permute(np.array([ti % n]), n, 3, ti // n)[0] for ti in t]
    assert ds.positions(k).tolist() == want
