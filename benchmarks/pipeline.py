"""Data pipeline throughput on the default corpus (a benchmark, not a test).

  python benchmarks/pipeline.py [--config=configs/quickstart.py] [--seconds=20] [--config.data.workers=2]

Prints tokens/s of (1) tokenization alone (encode_batch over documents, the anchor), (2) the whole
raw pipeline (read → shuffle → tokenize → pack → batch), (3) the TFDS packed-window reader, each
with its ratio to the anchor measured in the same run and to the 0.5 M tok/s target.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "config file", lock_config=True)
_SECONDS = flags.DEFINE_float("seconds", 15.0, "time per measurement")
TARGET = 0.5e6


def _rate(next_batch, seconds: float) -> float:
  next_batch()  # start-up (index, workers) is not throughput
  tokens, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    tokens += next_batch()
  return tokens / (time.perf_counter() - t0)


def main(argv):
  del argv
  from monojax.corpus import build_corpus
  from monojax.data import pipeline
  cfg = _CONFIG.value
  root = build_corpus.ensure_data_root(cfg.data, log=print)
  tok = pipeline.get_tokenizer(cfg.data, root, log=print)
  src = pipeline.text_source(cfg.data, root, "train", log=print)
  print(f"corpus {root}: {len(src):,} train documents; tokenizer {tok.spec} (vocab {tok.vocab_size:,}); "
        f"{os.cpu_count()} CPUs; workers={cfg.data.workers}")

  state = {"i": 0}
  B = cfg.data.tokenize_batch_docs

  def tokenize_only():
    docs = [src[(state["i"] + j) % len(src)] for j in range(B)]
    state["i"] += B
    return int(tok.encode_documents(docs).size)

  rows = [("tokenization alone (anchor)", _rate(tokenize_only, _SECONDS.value))]
  for fmt in ("raw", "tfds"):
    with cfg.unlocked():
      cfg.data.format = fmt
    it = iter(pipeline.host_batches(cfg.data, "train", tokenizer=tok, root=root, host_batch=cfg.data.global_batch,
                                    seed=0, process_index=0, process_count=1, log=print))
    rows.append((f"whole pipeline, format={fmt}", _rate(lambda: int(next(it)["tokens"].size), _SECONDS.value)))
    del it
  anchor = rows[0][1]
  print(f"\n{'measurement':<34} {'M tok/s':>8} {'÷ anchor':>9} {'÷ 0.5M target':>14}")
  for name, r in rows:
    print(f"{name:<34} {r / 1e6:>8.2f} {r / anchor:>9.2f} {r / TARGET:>14.2f}")


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  app.run(main)
