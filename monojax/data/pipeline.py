"""The grain input pipeline: documents → tokens → fixed windows → host batches → global jax.Arrays.

Two readers feed the same tail:
  raw:  Pile *.jsonl.zst → JsonlZstSource → shuffle → repeat → host slice → tokenize (batched,
        EOS between documents) → concat-then-split into seq_len+1 windows → batch
  packed: windows packed once into one flat array per split (packed.py) → a seeded permutation per
        epoch → host slice → whole batches read with one fancy index (batch i is a pure function of
        i — the form a TPU pod streams)
Both end in an `IterDataset` of {"tokens": int32[host_batch, seq_len + 1]} whose state grain can
checkpoint; `to_global` turns each host batch into a slice of one global array on the mesh's data
axis with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

from monojax.data import sources, tokenizer as tokenizer_lib
from monojax import errors

def corpus_root(data_cfg) -> str:
  """The directory holding train/, val/ (and analysis/) shards. The default corpus is built by the job's setup
  (`monojax.corpus.build_corpus.ensure_data_root`), not here: reading data never builds it."""
  if data_cfg.path == "default":
    root = os.path.expanduser(sources.DEFAULT_CORPUS_DIR)
    if not os.path.isdir(root):
      raise errors.MissingInputError(
          f"data.path='default': the default corpus is not built yet ({root}); the main job builds it on first "
          "use, or run `python -m monojax.corpus.build_corpus`")
    return root
  root = os.path.expanduser(data_cfg.path)
  if "://" not in root and not os.path.isdir(root):
    raise errors.MissingInputError(f"data.path: {data_cfg.path!r} is not a directory (expected one holding "
                            f"{data_cfg.train_files!r} and {data_cfg.val_files!r}, or 'default')")
  return root


def text_source(data_cfg, root: str, split: str, log=logging.info) -> sources.JsonlZstSource:
  return sources.JsonlZstSource(sources.split_files(data_cfg, root, split), on_error=data_cfg.on_error,
                                index_dir=data_cfg.index_dir, max_line_bytes=data_cfg.max_line_bytes, log=log)


def bpe_cache_path(data_cfg, root: str, log=logging.info) -> str:
  """Where `data.tokenizer = "bpe:<vocab>"` is cached: beside the train split's document index."""
  try:
    vocab = int(data_cfg.tokenizer[4:])
  except ValueError:
    raise errors.ConfigError(f"data.tokenizer: expected 'bpe:<vocab size>', got {data_cfg.tokenizer!r}") from None
  src = text_source(data_cfg, root, "train", log)
  return os.path.join(src.dir, f"bpe-{vocab}-{data_cfg.bpe_train_mb}mb.tokenizer.json")


def get_tokenizer(data_cfg, root: str, log=logging.info) -> tokenizer_lib.TextTokenizer:
  """'gpt-neox-20b' (vendored), 'bpe:<vocab>' (trained once on the train split, cached beside the
  corpus index), or a path to a tokenizer.json(.gz). A finished run's tokenizer is read from its
  workdir instead (monojax/run.py), never trained again."""
  spec = data_cfg.tokenizer
  if spec.startswith("bpe:"):
    path = bpe_cache_path(data_cfg, root, log)
    vocab = int(spec[4:])
    if not os.path.exists(path):
      src = text_source(data_cfg, root, "train", log)
      import time
      t0 = time.time()
      docs = _spread_sample(src, int(data_cfg.bpe_train_mb * 2**20))
      tokenizer_lib.train_bpe((src[i] for i in docs), vocab, path)
      log(f"data: trained byte-level BPE with vocab {vocab} on {len(docs):,} of {len(src):,} documents "
          f"(≤ {data_cfg.bpe_train_mb} MB spread over the split) in {time.time() - t0:.1f}s -> {path}")
    spec = path
  return tokenizer_lib.TextTokenizer(spec, max_chunk_chars=data_cfg.max_chunk_chars)


def _spread_sample(src: sources.JsonlZstSource, max_bytes: int) -> list[int]:
  """Document indices spread evenly over the source (every set represented) up to max_bytes."""
  sizes = np.diff(np.asarray(src.offsets))
  total = int(sizes.sum())
  if total <= max_bytes:
    return list(range(len(src)))
  return list(range(0, len(src), -(-total // max_bytes)))  # every k-th document: ≈ max_bytes in all


@dataclasses.dataclass(frozen=True)
class _EncodeDocs:
  """grain map: a list of documents → {"tokens": one id stream with EOS after each document}."""
  tokenizer: tokenizer_lib.TextTokenizer

  def __call__(self, docs) -> dict[str, np.ndarray]:
    return {"tokens": self.tokenizer.encode_documents(list(docs))}


def _only_tokens(window: dict[str, np.ndarray]) -> np.ndarray:
  return window["tokens"]


def _is_full_window(window: dict[str, np.ndarray]) -> bool:
  # concat-then-split pads the last window of a finite stream with zeros (segment id 0); such a
  # window would teach/score EOS at padding, so it is dropped.
  return bool(window["tokens_segment_ids"][-1] > 0)


def _to_int32_batch(x: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": np.asarray(x, np.int32)}


def host_batches(data_cfg, split: str, *, tokenizer: tokenizer_lib.TextTokenizer, root: str,
                 host_batch: int, seed: int, process_index: int, process_count: int,
                 repeat: bool | None = None, shuffle: bool | None = None, log=logging.info) -> grain.IterDataset:
  """This host's batches: {"tokens": int32[host_batch, seq_len + 1]}.

  Training (repeat=True, the default for 'train') shuffles globally with `seed`, repeats forever
  (reshuffled each epoch) and gives host `process_index` every `process_count`-th element, so hosts
  see disjoint data. Evaluation reads once, in order.
  """
  repeat = (split == "train") if repeat is None else repeat
  shuffle = repeat if shuffle is None else shuffle
  read = grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch)
  if data_cfg.format == "raw":
    ds = grain.MapDataset.source(text_source(data_cfg, root, split, log))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if repeat:
      ds = ds.repeat(None)
    it = _pack(ds[process_index::process_count], data_cfg, tokenizer, read)
    if shuffle and data_cfg.shuffle_windows > 1:
      # Packing puts a long document's windows next to each other (a 32k-character document is
      # ~80 windows of 129): without this a batch of 32 holds 1-3 documents, the gradient is noisy
      # and a higher lr diverges. Checkpointable: grain replays the parent from the window start.
      it = gx.WindowShuffleIterDataset(it, window_size=int(data_cfg.shuffle_windows), seed=seed)
  elif data_cfg.format == "packed":
    # Whole batches from one memory-mapped array (packed.py): batch k is a pure function of k.
    from monojax.data import packed
    it = packed.host_batches(data_cfg, root, split, tokenizer, host_batch=host_batch, seed=seed,
                             process_index=process_index, process_count=process_count, repeat=repeat,
                             shuffle=shuffle, log=log).to_iter_dataset(read)
    if data_cfg.workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
    return it
  else:
    raise errors.ConfigError(f"data.format must be 'raw' or 'packed', got {data_cfg.format!r}")
  it = it.batch(host_batch, drop_remainder=True).map(_to_int32_batch)
  if data_cfg.workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
  return it


def _pack(docs: grain.MapDataset, data_cfg, tokenizer: tokenizer_lib.TextTokenizer,
          read: grain.ReadOptions) -> grain.IterDataset:
  """Documents → tokens (batched, EOS after each) → full windows of seq_len + 1 tokens, in order."""
  ds = docs.batch(data_cfg.tokenize_batch_docs, drop_remainder=False).map(_EncodeDocs(tokenizer))
  it = _TupleSlicesOnRestore(gx.ConcatThenSplitIterDataset(ds.to_iter_dataset(read),
                                                            length_struct={"tokens": data_cfg.seq_len + 1}))
  return it.filter(_is_full_window).map(_only_tokens)


class _TupleSlicesOnRestore(grain.IterDataset):
  """Packing whose iterator state survives a JSON round trip (grain's checkpoint format).

  grain 0.2.18's ConcatThenSplit compares `remainder_slices` values with the tuple (-1, -1); after
  JSON they are lists, so a state saved with no remainder restores as if it had one and skips a
  document's tokens. Restoring converts them back to tuples."""

  def __iter__(self):
    return _TupleSlicesIterator(self._parent.__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(dict(state, remainder_slices=slices))


@dataclasses.dataclass(frozen=True)
class _ToGlobal:
  sharding: Any

  def __call__(self, batch):
    import jax
    return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}


def to_global(it: grain.IterDataset, mesh, data_axis: str = "data", prefetch: int = 2) -> grain.IterDataset:
  """Host batches → global jax.Arrays sharded on the batch dimension over `data_axis`, prefetched on
  a thread so host-to-device copies overlap the step. The result's iterator state is still grain's."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  it = it.map(_ToGlobal(NamedSharding(mesh, P(data_axis))))
  return gx.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch) if prefetch else it


def eval_batches(cfg, tokenizer: tokenizer_lib.TextTokenizer, root: str, mesh, n_batches: int | None = None):
  """The first n_batches (default cfg.train.eval_batches) global batches of the validation split,
  shuffled with a fixed seed so they sample every set (the shards are ordered by set): the same
  held-out tokens at every evaluation (LM eval, SAE eval, feature preview)."""
  n_batches = cfg.train.eval_batches if n_batches is None else int(n_batches)
  import jax
  it = host_batches(cfg.data, "val", tokenizer=tokenizer, root=root,
                    host_batch=host_batch_size(cfg.data.global_batch, jax.process_count()), seed=0,
                    process_index=jax.process_index(), process_count=jax.process_count(), repeat=False,
                    shuffle=True)
  for n, batch in enumerate(to_global(it, mesh, prefetch=0)):
    if n >= n_batches:
      return
    yield batch


def host_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise errors.ConfigError(f"data.global_batch={global_batch} must be divisible by the number of processes ({process_count})")
  return global_batch // process_count


# ------------------------------------------------------------------------------------------------
# The analysis split (data.analysis_files): documents never trained or evaluated on

ANALYSIS_SEED = 0  # the fixed document order of the analysis split (not data.seed: no run changes it)


def _analysis_host_batches(data_cfg, tokenizer: tokenizer_lib.TextTokenizer, root: str, host_batch: int,
                           process_index: int, process_count: int, log=logging.info,
                           split: str = sources.ANALYSIS) -> grain.IterDataset:
  """This host's batches of `split` (the analysis split unless told), read once: documents in a fixed seeded order (so any prefix
  samples every set: the shards are ordered by set), this host's every process_count-th document,
  packed exactly as evaluation packs (EOS between documents, full windows only), no window shuffle.
  Always the raw reader (format="packed" packs only train and val)."""
  read = grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch)
  ds = grain.MapDataset.source(text_source(data_cfg, root, split, log)).shuffle(seed=ANALYSIS_SEED)
  it = _pack(ds[process_index::process_count], data_cfg, tokenizer, read)
  return it.batch(host_batch, drop_remainder=True).map(_to_int32_batch)


def analysis_batches(cfg, tokenizer: tokenizer_lib.TextTokenizer, root: str, mesh, *, split: str = sources.ANALYSIS,
                     batch_size: int | None = None, start_batch: int = 0, n_batches: int | None = None,
                     log=logging.info):
  """Global batches {"tokens": int32[batch_size, seq_len + 1]} (sharded on the mesh's "data" axis) of
  the analysis split (data.analysis_files under root; `split` may name "val" or "train" instead, read
  the same way, once, repeats included) in one fixed order: batch k is the same on every call for
  the same shards, tokenizer, seq_len, batch_size and process count, whatever the other data.*
  fields. batch_size defaults to data.global_batch; each process reads its share of the documents.

  Starts at batch `start_batch` (for resume: the earlier batches are read and tokenized on the
  host, never sent to a device; about 1 M tokens/s) and yields at most n_batches (None: until the
  split is exhausted). The iteration ends cleanly when the split runs out; with several processes
  they agree each batch on whether all still have one, so every process stops at the same batch.
  `split_token_estimate` tells beforehand about how many tokens there are."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  batch_size = cfg.data.global_batch if batch_size is None else int(batch_size)
  if batch_size < 1 or start_batch < 0 or n_batches is not None and n_batches < 0:
    raise errors.ConfigError(f"analysis batches: expected batch_size ≥ 1, start_batch ≥ 0, n_batches ≥ 0 or None; "
                             f"got {batch_size}, {start_batch}, {n_batches}")
  n_proc = jax.process_count()
  it = iter(_analysis_host_batches(cfg.data, tokenizer, root, host_batch_size(batch_size, n_proc),
                                   jax.process_index(), n_proc, log, split))
  put = _ToGlobal(NamedSharding(mesh, P("data")))
  stop = start_batch + n_batches if n_batches is not None else None
  n = 0
  while stop is None or n < stop:
    batch = next(it, None)
    if n_proc > 1:
      from jax.experimental import multihost_utils
      if not np.all(multihost_utils.process_allgather(np.int32(batch is not None))):
        return
    elif batch is None:
      return
    if n >= start_batch:
      yield put(batch)
    n += 1


def analysis_source(cfg, root: str, split: str = sources.ANALYSIS, log=logging.info) -> dict:
  """What `analysis_batches` reads, as plain JSON for a record of the pass: split, its flag and
  pattern, the shards (relative to root where under it), documents, bytes, the order."""
  src = text_source(cfg.data, root, split, log)
  base = os.path.join(os.path.expanduser(root), "")
  flag = sources.SPLIT_FLAGS[split]
  return {"split": split, "flag": flag, "pattern": getattr(cfg.data, flag.split(".", 1)[1]), "root": root,
          "files": [f[len(base):] if f.startswith(base) else f for f in src.files], "documents": len(src),
          "bytes": int(src.info["bytes"]), "order": f"documents shuffled with seed {ANALYSIS_SEED}, read once"}


def split_token_estimate(data_cfg, tokenizer: tokenizer_lib.TextTokenizer, root: str, split: str = sources.ANALYSIS,
                         sample_mb: float = 16, log=logging.info) -> dict:
  """{"documents", "bytes", "tokens", "estimated"} of one split: tokens as packing reads them (EOS
  after each document included). Splits of at most sample_mb MB are tokenized in full (exact; the
  default analysis split is ~4 MB, a few seconds); larger ones from documents spread over the split,
  extrapolated by bytes ("estimated": True). Full windows are about tokens // (seq_len + 1)."""
  src = text_source(data_cfg, root, split, log)
  sizes = np.diff(np.asarray(src.offsets))
  docs = _spread_sample(src, int(sample_mb * 2**20))
  tokens, step = 0, max(1, int(data_cfg.tokenize_batch_docs))
  for i in range(0, len(docs), step):
    tokens += int(tokenizer.encode_documents([src[d] for d in docs[i:i + step]]).size)
  total, sampled = int(sizes.sum()), int(sizes[docs].sum()) if docs else 0
  estimated = len(docs) < len(src)
  if estimated and sampled:
    tokens = round(tokens * total / sampled)
  return {"documents": len(src), "bytes": total, "tokens": tokens, "estimated": estimated}
