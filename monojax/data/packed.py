"""Packed windows: the corpus tokenized once, packed into fixed windows of seq_len + 1 tokens and
written as one flat little-endian array per split; read back a whole batch at a time.

Why not per-record files: the first packed format (a TFDS builder writing tf.Example records to
array_record) decoded one record per window in Python and read 0.18M tokens/s — a TPU pod's host
needs ~6M (BUILD_NOTES.md, "Performance, round two"). array_record's batched reads of raw records
reached 2–8M at host batches of 32–64 (per-call overhead). Here a window is row i of a
[windows, seq_len + 1] array, so a batch is one fancy index into a memory map (pread of each row):
no per-window Python, the page cache does the rest.

Layout of a dataset directory (one per (input files, policy, tokenizer, window, format version):
changing any of them builds a new one; the build writes a temporary directory renamed only when
complete, so a reader never sees a half-written split):
  <split>.tokens   uint16 (vocab ≤ 65,536) or int32 rows of `window` tokens, EOS between documents
  DONE.json        {"format", "window", "dtype", "windows": {split: n}, "tokenizer", "skips", ...}

Order: batch k of host p is a pure function of (k, p, seed): the global stream of windows is epoch
after epoch of a seeded permutation of the split (a new one each epoch), and host p takes every
process_count-th position — the same slicing as the raw reader. So the iterator state is one
integer (grain's MapDataset index) and resume is exact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time

import grain
import numpy as np

from monojax import errors
from monojax.data import pile_io, sources, tokenizer as tokenizer_lib

FORMAT = "monojax-packed-2"   # in the directory hash: windows from another format are never reused
SPLITS = ("train", "val")
_BLOCK = 256  # batches whose window ids are computed together


def window_dtype(vocab_size: int):
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


# ------------------------------------------------------------------------------------------------
# Writing


def _windows(tokenizer, files, window: int, on_error: str, batch_docs: int, max_line_bytes: int, skips):
  """Full windows [n, window] of the files' documents in order, EOS after each document; the last
  partial window is dropped."""
  buf, docs = np.zeros((0,), np.int32), []

  def cut(buf):
    full = len(buf) // window
    return buf[:full * window].reshape(full, window), buf[full * window:]

  for path in files:
    for _, rec in pile_io.read_records(path, on_error=on_error, skips=skips, max_line_bytes=max_line_bytes):
      docs.append(rec["text"])
      if len(docs) == batch_docs:
        rows, buf = cut(np.concatenate([buf, tokenizer.encode_documents(docs)]))
        docs = []
        if len(rows):
          yield rows
  if docs:
    buf = np.concatenate([buf, tokenizer.encode_documents(docs)])
  rows, _ = cut(buf)
  if len(rows):
    yield rows


def _max_line_bytes(data_cfg) -> int:
  """data.max_line_bytes (the reader's default for a config dict without the field)."""
  return int(data_cfg.get("max_line_bytes", pile_io.MAX_LINE_BYTES))


def dataset_dir(data_cfg, root: str, tokenizer: tokenizer_lib.TextTokenizer) -> str:
  files = {s: sources.resolve_files(p, root) for s, p in (("train", data_cfg.train_files), ("val", data_cfg.val_files))}
  h = hashlib.sha1(FORMAT.encode())
  for s in sorted(files):
    h.update(s.encode())
    h.update(sources._key(files[s], data_cfg.on_error, _max_line_bytes(data_cfg)).encode())  # path, size, mtime of each file
  h.update(tokenizer.hf.to_str().encode())
  h.update(f"{data_cfg.seq_len + 1}".encode())
  return os.path.join(os.path.expanduser(data_cfg.packed_dir), h.hexdigest()[:20])


def build(data_cfg, root: str, tokenizer: tokenizer_lib.TextTokenizer, log=logging.info) -> str:
  """Builds (once) and returns the dataset directory holding the packed windows of both splits."""
  out = dataset_dir(data_cfg, root, tokenizer)
  if os.path.exists(os.path.join(out, "DONE.json")):
    return out
  window, dtype = data_cfg.seq_len + 1, window_dtype(tokenizer.vocab_size)
  split_files = {s: sources.split_files(data_cfg, root, s) for s in SPLITS}
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  t0 = time.time()
  counts, skips = {}, {s: pile_io.SkipCounts() for s in SPLITS}
  try:
    for s in SPLITS:
      n = 0
      with open(os.path.join(tmp, f"{s}.tokens"), "wb") as f:
        for rows in _windows(tokenizer, split_files[s], window, data_cfg.on_error, data_cfg.tokenize_batch_docs,
                             _max_line_bytes(data_cfg), skips[s]):
          f.write(rows.astype(dtype.newbyteorder("<"), copy=False).tobytes())
          n += len(rows)
      counts[s] = n
    with open(os.path.join(tmp, "DONE.json"), "w") as f:
      json.dump({"format": FORMAT, "windows": counts, "window": window, "dtype": dtype.name,
                 "tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                 "skips": {s: dict(c) for s, c in skips.items()}, "files": split_files,
                 "seconds": time.time() - t0}, f, indent=1)
    try:
      os.rename(tmp, out)
    except OSError:  # another process on this machine finished the same build first
      if not os.path.exists(os.path.join(out, "DONE.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  skipped = "".join(f"; skipped in {s}: {c.summary()}" for s, c in skips.items() if c)
  log(f"data: packed {counts['train']:,} train / {counts['val']:,} val windows of {window} tokens "
      f"in {time.time() - t0:.1f}s{skipped} -> {out}")
  return out


# ------------------------------------------------------------------------------------------------
# Reading


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """A 64-bit hash of uint64 values (splitmix64's finaliser with a key): the Feistel round function.
  Array arithmetic on uint64 wraps silently, as a hash wants."""
  x = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> list[np.uint64]:
  """4 round keys from (seed, epoch), splitmix64 in Python integers."""
  seed, epoch = int(seed), int(epoch)
  keys, z = [], (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + 0x5EED) % 2**64
  for _ in range(4):
    z = (z + 0x9E3779B97F4A7C15) % 2**64
    k = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    k = ((k ^ (k >> 27)) * 0x94D049BB133111EB) % 2**64
    keys.append(np.uint64(k ^ (k >> 31)))
  return keys


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """A seeded bijection of [0, n) applied to `positions` (vectorised; O(1) memory in n, unlike a
  stored permutation of the Pile's ~400M windows): a 4-round Feistel network on the smallest
  even-bit domain ≥ n, with cycle walking back into [0, n)."""
  positions = np.asarray(positions, np.uint64)
  if n <= 1:
    return positions.astype(np.int64)
  half = np.uint64(max(1, (int(n - 1).bit_length() + 1) // 2))
  lo_mask = np.uint64((1 << int(half)) - 1)
  keys = _round_keys(seed, epoch)

  def rounds(x):
    left, right = x >> half, x & lo_mask
    for k in keys:
      left, right = right, left ^ (_mix(right, k) & lo_mask)
    return (left << half) | right

  out = rounds(positions)
  outside = out >= np.uint64(n)
  while outside.any():  # cycle walking: the domain is < 4n, so a few passes on ever fewer entries
    out[outside] = rounds(out[outside])
    outside = out >= np.uint64(n)
  return out.astype(np.int64)


class PackedBatches(grain.MapDataset):
  """Host `process_index`'s batches {"tokens": int32[host_batch, window]} of one packed split.

  Element k holds the windows at global stream positions (k·host_batch + j)·process_count +
  process_index, j < host_batch; position t is window permute(t mod n, seed, t div n) (identity
  without shuffle). repeat: endless, reshuffled each epoch; otherwise one pass, the last partial
  batch dropped. Picklable (grain's worker processes): the memory map opens lazily in each process.
  """
  _FIELDS = ("path", "n", "window", "dtype", "host_batch", "seed", "process_index", "process_count", "repeat",
             "shuffle")

  def __init__(self, *, path: str, n: int, window: int, dtype: str, host_batch: int, seed: int,
               process_index: int, process_count: int, repeat: bool, shuffle: bool):
    super().__init__()
    self.path, self.n, self.window, self.dtype = path, int(n), int(window), str(dtype)
    self.host_batch, self.seed = int(host_batch), int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.repeat, self.shuffle = bool(repeat), bool(shuffle)
    self._rows = None
    self._cache = None
    per_host = len(range(self.process_index, self.n, self.process_count))
    self._len = sys.maxsize if self.repeat else per_host // self.host_batch

  def __len__(self) -> int:
    return self._len

  def __reduce__(self):
    return _rebuild, ({f: getattr(self, f) for f in self._FIELDS},)

  def positions(self, k: int) -> np.ndarray:
    """The window ids of element k (what __getitem__ reads)."""
    block, i = divmod(int(k), _BLOCK)
    return self._block_positions(block)[i]

  def _block_positions(self, block: int) -> np.ndarray:
    """[_BLOCK, host_batch] window ids of elements block·_BLOCK ...: the permutation's numpy calls cost
    the same for 64 ids as for 16k, so they run once per block (cached; grain's threads share it)."""
    cached = self._cache
    if cached is not None and cached[0] == block:
      return cached[1]
    k = block * _BLOCK + np.arange(_BLOCK, dtype=np.int64)[:, None]
    t = (k * self.host_batch + np.arange(self.host_batch, dtype=np.int64)) * self.process_count + self.process_index
    epoch, r = np.divmod(t, self.n)
    if self.shuffle:
      for e in np.unique(epoch):  # a block spans few epochs unless the split is tiny
        sel = epoch == e
        r[sel] = permute(r[sel], self.n, self.seed, int(e))
    self._cache = (block, r)  # one tuple assignment: a thread reads an old or a new pair, never a mix
    return r

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    if not 0 <= k < self._len:
      raise IndexError(f"batch {k} of {self._len}")
    if self._rows is None:
      self._rows = np.memmap(self.path, np.dtype(self.dtype).newbyteorder("<"), "r", shape=(self.n, self.window))
    return {"tokens": self._rows[self.positions(k)].astype(np.int32)}


def open_split(data_cfg, root: str, split: str, tokenizer: tokenizer_lib.TextTokenizer, log=logging.info) -> dict:
  """The built split's {"path", "n", "window", "dtype"} (built first if needed)."""
  out = build(data_cfg, root, tokenizer, log)
  try:
    with open(os.path.join(out, "DONE.json")) as f:
      meta = json.load(f)
    n, window, dtype = int(meta["windows"][split]), int(meta["window"]), str(meta["dtype"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.RunFormatError(f"{out}/DONE.json: not a packed dataset's record ({e}); delete {out} to rebuild") from None
  path = os.path.join(out, f"{split}.tokens")
  want = n * window * np.dtype(dtype).itemsize
  if not os.path.exists(path) or os.path.getsize(path) != want:
    raise errors.RunFormatError(f"{path}: expected {want:,} bytes ({n:,} windows of {window} {dtype}); delete {out} "
                                "to rebuild")
  if window != data_cfg.seq_len + 1:
    raise errors.RunFormatError(f"{out}: windows of {window} tokens, but data.seq_len + 1 = {data_cfg.seq_len + 1}")
  if n == 0:
    raise errors.MissingInputError(f"data.{split}_files: the {split} split packs into 0 windows of {window} tokens "
                                   f"(too little text); see {out}/DONE.json")
  return {"path": path, "n": n, "window": window, "dtype": dtype}


def host_batches(data_cfg, root: str, split: str, tokenizer: tokenizer_lib.TextTokenizer, *, host_batch: int,
                 seed: int, process_index: int, process_count: int, repeat: bool, shuffle: bool,
                 log=logging.info) -> grain.MapDataset:
  return PackedBatches(**open_split(data_cfg, root, split, tokenizer, log), host_batch=host_batch, seed=seed,
                       process_index=process_index, process_count=process_count, repeat=repeat, shuffle=shuffle)


def _rebuild(fields: dict) -> PackedBatches:
  return PackedBatches(**fields)
