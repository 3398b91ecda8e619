"""Random-access document sources over raw Pile `*.jsonl.zst` shards.

zstd JSON lines cannot be indexed, and a global shuffle needs random access. So the first use of a
set of shards scans each one once (streaming; any size), validates every record under the
bad-input policy, and writes the valid texts into a flat UTF-8 blob plus an offsets array in a
local index cache. Reads are then an mmap slice: cheap, and the source pickles as a path (grain
workers do not copy the corpus). The cache key is each file's path, size and mtime plus the policy,
so an edited shard is re-indexed and an old index is never used for new bytes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
from typing import Sequence

import numpy as np
from etils import epath

from monojax.data import pile_io
from monojax import errors

DEFAULT_INDEX_DIR = "~/.cache/monojax/text_index"
# data.path="default" (built by monojax.corpus). v2 added analysis/: a machine holding only a v1
# corpus builds v2 beside it on first use.
DEFAULT_CORPUS_DIR = "~/.cache/monojax/corpus/debmix-v2"
SPLITS = ("train", "val")  # the splits a training job reads (token counts at start, format="packed" packing)
ANALYSIS = "analysis"      # documents never trained or evaluated on: the feature-analysis pass reads them
ALL_SPLITS = SPLITS + (ANALYSIS,)
SPLIT_FLAGS = {"train": "data.train_files", "val": "data.val_files", ANALYSIS: "data.analysis_files"}


def resolve_files(pattern: str, base: str | None = None) -> list[str]:
  """Expands a glob on local disk or on any etils.epath filesystem (gs://...); relative patterns
  are taken under `base`."""
  p = os.path.expanduser(pattern)
  if base and not (os.path.isabs(p) or "://" in p):
    p = os.path.join(os.path.expanduser(base), p)
  if "://" not in p:
    return sorted(glob.glob(p))
  parts = p.split("/")
  wild = [k for k, s in enumerate(parts) if any(c in s for c in "*?[")]
  if not wild:
    return [p] if epath.Path(p).exists() else []
  root = epath.Path("/".join(parts[:wild[0]]))
  return sorted(str(x) for x in root.glob("/".join(parts[wild[0]:])))


def split_files(data_cfg, root: str, split: str) -> list[str]:
  """The shards of one split (data.train_files / data.val_files / data.analysis_files under `root`);
  an error naming the flag when none match."""
  if split not in ALL_SPLITS:
    raise errors.ConfigError(f"split must be one of {ALL_SPLITS}, got {split!r}")
  flag = SPLIT_FLAGS[split]
  pattern = getattr(data_cfg, flag.split(".", 1)[1])
  files = resolve_files(pattern, root)
  if not files:
    hint = ""
    if split == ANALYSIS:
      hint = (" (corpora built before the analysis split have none: rebuild with monojax.corpus.build_corpus, or "
              "point data.analysis_files at held-out shards never trained on, e.g. the Pile's test shards)")
    raise errors.MissingInputError(f"{flag}: no files match {pattern!r} under {root}{hint}")
  return files


def _key(files: Sequence[str], on_error: str, max_line_bytes: int = pile_io.MAX_LINE_BYTES) -> str:
  h = hashlib.sha1(on_error.encode())
  if max_line_bytes != pile_io.MAX_LINE_BYTES:  # a cap decides which records are read (the default keeps old keys)
    h.update(f"max_line_bytes={max_line_bytes}".encode())
  for f in files:
    st = epath.Path(f).stat()
    h.update(f"{os.path.abspath(f) if '://' not in f else f}|{st.length}|{st.mtime}".encode())
  return h.hexdigest()[:20]


class JsonlZstSource:
  """Documents (str) of a list of Pile shards, in file order; `set_name(i)` gives the Pile set."""

  def __init__(self, files: Sequence[str], *, on_error: str = "raise", index_dir: str = DEFAULT_INDEX_DIR,
               log=logging.info, max_line_bytes: int = pile_io.MAX_LINE_BYTES):
    if not files:
      raise errors.MissingInputError("data: no *.jsonl.zst files matched (check data.path / data.train_files / data.val_files / "
                                     "data.analysis_files)")
    if on_error not in pile_io.ON_ERROR_CHOICES:
      raise errors.ConfigError(f"data.on_error must be one of {pile_io.ON_ERROR_CHOICES}, got {on_error!r}")
    self.files = list(files)
    self.dir = os.path.join(os.path.expanduser(index_dir), _key(self.files, on_error, max_line_bytes))
    if not os.path.exists(os.path.join(self.dir, "index.json")):
      self._build(on_error, log, max_line_bytes)
    with open(os.path.join(self.dir, "index.json")) as f:
      self.info = json.load(f)
    self.offsets = np.load(os.path.join(self.dir, "offsets.npy"), mmap_mode="r")
    self.set_ids = np.load(os.path.join(self.dir, "set_ids.npy"), mmap_mode="r")
    self.skips = pile_io.SkipCounts(self.info["skips"])
    self._blob = None
    if self.skips:
      log(f"data: skipped records in {len(self.files)} file(s): {self.skips.summary()}")

  def _build(self, on_error: str, log, max_line_bytes: int = pile_io.MAX_LINE_BYTES) -> None:
    t0 = time.time()
    tmp = f"{self.dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    offsets, set_ids, set_names, skips = [0], [], {}, pile_io.SkipCounts()
    pos = 0
    try:
      with open(os.path.join(tmp, "texts.bin"), "wb") as blob:
        for path in self.files:
          for _, rec in pile_io.read_records(path, on_error=on_error, skips=skips, max_line_bytes=max_line_bytes):
            data = rec["text"].encode("utf-8")
            blob.write(data)
            pos += len(data)
            offsets.append(pos)
            name = str(rec["meta"].get("pile_set_name", "unknown"))
            set_ids.append(set_names.setdefault(name, len(set_names)))
      np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
      np.save(os.path.join(tmp, "set_ids.npy"), np.asarray(set_ids, np.int32))
      with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump({"files": self.files, "documents": len(set_ids), "bytes": pos, "skips": dict(skips),
                   "set_names": list(set_names)}, f)
      os.makedirs(os.path.dirname(self.dir), exist_ok=True)
      try:
        os.rename(tmp, self.dir)
      except OSError:  # another process (a second host on this machine) finished the same index first
        if not os.path.exists(os.path.join(self.dir, "index.json")):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: indexed {len(set_ids):,} documents ({pos / 1e6:.1f} MB) from {len(self.files)} file(s) "
        f"in {time.time() - t0:.1f}s -> {self.dir}")

  def __len__(self) -> int:
    return int(self.info["documents"])

  def _mm(self):
    if self._blob is None:
      with open(os.path.join(self.dir, "texts.bin"), "rb") as f:
        self._blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(f.name) else b""
    return self._blob

  def __getitem__(self, i: int) -> str:
    i = int(i)
    return self._mm()[int(self.offsets[i]):int(self.offsets[i + 1])].decode("utf-8")

  def set_name(self, i: int) -> str:
    return self.info["set_names"][int(self.set_ids[int(i)])]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_blob"] = None
    return state

  def __repr__(self) -> str:
    return f"JsonlZstSource({len(self.files)} files, {len(self):,} docs)"
