"""What the main job prints about its data before training: the corpus, tokens per set, the
tokenizer, and the pipeline's measured throughput with the exact batches it feeds the model."""
from __future__ import annotations

import gc
import logging
import time

import numpy as np

from monojax.data import corpus_stats, sources


def summarize(cfg, root: str, tokenizer, log=logging.info) -> dict:
  """Logs tokens per set (when data.count_tokens) and returns the counts ({} when off)."""
  if not cfg.data.count_tokens:
    return {}
  t0 = time.time()
  files = {s: sources.split_files(cfg.data, root, s) for s in sources.SPLITS}
  counts = corpus_stats.count_tokens(files, tokenizer, on_error=cfg.data.on_error, cache_dir=cfg.data.index_dir,
                                     max_tokenized_bytes=int(cfg.data.count_tokens_mb_per_file * 2**20),
                                     max_line_bytes=cfg.data.max_line_bytes)
  log(f"data: corpus {root} with tokenizer {tokenizer.spec} (vocab {tokenizer.vocab_size:,}); "
      f"counted in {time.time() - t0:.1f}s\n" + corpus_stats.format_table(counts))
  return counts


def measure_pipeline(it, n_batches: int, log=logging.info) -> dict:
  """Pulls n_batches from an iterator of global batches; returns tokens/s and the first batch."""
  iterator = iter(it)
  t0 = time.time()
  first = next(iterator)
  t_first = time.time() - t0
  tokens = 0
  t1 = time.time()
  for _ in range(max(n_batches - 1, 0)):
    b = next(iterator)
    tokens += int(np.prod(b["tokens"].shape))
  dt = time.time() - t1
  rate = tokens / dt if dt > 0 else float("nan")
  out = {"first_batch_s": t_first, "tokens_per_s": rate, "batch": first}
  del iterator
  gc.collect()
  return out
