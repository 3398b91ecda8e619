"""Tokenized shards: a TFDS builder that reads raw Pile shards once, tokenizes them, packs the id
stream into fixed windows of seq_len + 1 tokens and writes array_record; read back with random
access. Works without TensorFlow.

One dataset directory per (input files, policy, tokenizer, window): changing any of them builds a
new one instead of silently reusing windows made with something else. The build writes into a
temporary directory that is renamed only when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import tensorflow_datasets as tfds

from monojax.data import pile_io, sources, tokenizer as tokenizer_lib

BUILDER_NAME = "monojax_packed"
TFDS_SPLIT = {"train": "train", "val": "validation"}


def window_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 1 << 16 else np.int32


class MonojaxPacked(tfds.core.GeneratorBasedBuilder):
  """Fixed windows {"tokens": [seq_len + 1]} of a raw corpus; splits 'train' and 'validation'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Packed windows, EOS between documents, last partial window dropped."}

  def __init__(self, *, split_files: dict[str, list[str]], tokenizer: tokenizer_lib.TextTokenizer,
               window: int, on_error: str, tokenize_batch_docs: int = 64,
               max_line_bytes: int = pile_io.MAX_LINE_BYTES, **kwargs):
    self._split_files = split_files
    self._tokenizer = tokenizer
    self._window = window
    self._on_error = on_error
    self._max_line_bytes = max_line_bytes
    self._batch_docs = tokenize_batch_docs
    self.skips = {s: pile_io.SkipCounts() for s in split_files}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    dtype = window_dtype(self._tokenizer.vocab_size)
    return tfds.core.DatasetInfo(
        builder=self,
        description="monojax packed LM windows",
        features=tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(self._window,), dtype=dtype)}),
        metadata=tfds.core.MetadataDict(tokenizer=self._tokenizer.spec, vocab_size=self._tokenizer.vocab_size,
                                        eos_id=self._tokenizer.eos_id, window=self._window),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {TFDS_SPLIT[s]: self._generate_examples(s) for s in self._split_files}

  def _generate_examples(self, split):
    dtype = window_dtype(self._tokenizer.vocab_size)
    buf = np.zeros((0,), np.int32)
    n = 0
    docs = []

    def flush(buf, docs):
      ids = self._tokenizer.encode_documents(docs)
      return np.concatenate([buf, ids])

    for path in self._split_files[split]:
      for _, rec in pile_io.read_records(path, on_error=self._on_error, skips=self.skips[split],
                                         max_line_bytes=self._max_line_bytes):
        docs.append(rec["text"])
        if len(docs) == self._batch_docs:
          buf, docs = flush(buf, docs), []
          full = len(buf) // self._window
          for w in buf[:full * self._window].reshape(full, self._window):
            yield n, {"tokens": w.astype(dtype)}
            n += 1
          buf = buf[full * self._window:]
    if docs:
      buf = flush(buf, docs)
    full = len(buf) // self._window
    for w in buf[:full * self._window].reshape(full, self._window):
      yield n, {"tokens": w.astype(dtype)}
      n += 1


def _max_line_bytes(data_cfg) -> int:
  """data.max_line_bytes (the reader's default for a config dict without the field)."""
  return int(data_cfg.get("max_line_bytes", pile_io.MAX_LINE_BYTES))


def dataset_dir(data_cfg, root: str, tokenizer: tokenizer_lib.TextTokenizer) -> str:
  files = {s: sources.resolve_files(p, root) for s, p in (("train", data_cfg.train_files), ("val", data_cfg.val_files))}
  h = hashlib.sha1()
  for s in sorted(files):
    h.update(s.encode())
    h.update(sources._key(files[s], data_cfg.on_error, _max_line_bytes(data_cfg)).encode())  # path, size, mtime of each file
  h.update(tokenizer.hf.to_str().encode())
  h.update(f"{data_cfg.seq_len + 1}".encode())
  return os.path.join(os.path.expanduser(data_cfg.tfds_dir), h.hexdigest()[:20])


def build(data_cfg, root: str, tokenizer: tokenizer_lib.TextTokenizer, log=logging.info) -> str:
  """Builds (once) and returns the TFDS dataset directory holding the packed windows."""
  out = dataset_dir(data_cfg, root, tokenizer)
  done = os.path.join(out, "DONE.json")
  if os.path.exists(done):
    return out
  split_files = {s: sources.split_files(data_cfg, root, s) for s in sources.SPLITS}
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  t0 = time.time()
  try:
    builder = MonojaxPacked(split_files=split_files, tokenizer=tokenizer, window=data_cfg.seq_len + 1,
                            on_error=data_cfg.on_error, tokenize_batch_docs=data_cfg.tokenize_batch_docs,
                            max_line_bytes=_max_line_bytes(data_cfg),
                            data_dir=tmp)
    builder.download_and_prepare(file_format="array_record")
    counts = {s: builder.info.splits[TFDS_SPLIT[s]].num_examples for s in sources.SPLITS}
    with open(os.path.join(tmp, "DONE.json"), "w") as f:
      json.dump({"windows": counts, "window": data_cfg.seq_len + 1, "tokenizer": tokenizer.spec,
                 "skips": {s: dict(c) for s, c in builder.skips.items()}, "files": split_files, "seconds": time.time() - t0}, f, indent=1)
    try:
      os.rename(tmp, out)
    except OSError:  # another process on this machine finished the same build first
      if not os.path.exists(done):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  skipped = "".join(f"; skipped in {s}: {c.summary()}" for s, c in builder.skips.items() if c)
  log(f"data: packed {counts['train']:,} train / {counts['val']:,} val windows of {data_cfg.seq_len + 1} tokens "
      f"in {time.time() - t0:.1f}s{skipped} -> {out}")
  return out


def _builder_dir(out: str) -> str:
  return os.path.join(out, BUILDER_NAME, str(MonojaxPacked.VERSION))


def packed_source(data_cfg, root: str, split: str, tokenizer: tokenizer_lib.TextTokenizer, log=logging.info):
  """Random-access source of {"tokens": uint16/int32[seq_len + 1]} windows (built if needed)."""
  out = build(data_cfg, root, tokenizer, log)
  return tfds.builder_from_directory(_builder_dir(out)).as_data_source(split=TFDS_SPLIT[split])


def tokens_of(record) -> np.ndarray:
  return np.asarray(record["tokens"])
