"""Data pipeline throughput per host against what a TPU pod's host consumes (a benchmark, not a test).

  python benchmarks/pipeline.py [--config=configs/transformer.py] [--seconds=10] [--hosts=4]

On the default corpus with the paper job's shapes (configs/transformer.py: GPT-NeoX tokenizer,
windows of 257 tokens, global batch 256 over --hosts hosts) it prints tokens/s of
  (1) tokenization alone (encode_batch over documents: the anchor of the raw path),
  (2) the raw pipeline (read → shuffle → tokenize → pack → batch) as host 0 of --hosts,
  (3) the packed reader (data.format="packed": whole batches from one memory map) as host 0 of --hosts,
      with the seconds to its first batch (the windows already packed; packing, once, is timed apart),
each beside the per-host consumption of the paper job (FLOPs/token from the config) on a v5e-16 and
a v4-32 at --mfu, and the line `packed: X M tokens/s per host` the issue asks for.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                     # machine.py
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's monojax
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/transformer.py", "config file", lock_config=True)
_SECONDS = flags.DEFINE_float("seconds", 10.0, "time per measurement")
_HOSTS = flags.DEFINE_integer("hosts", 4, "hosts sharing the global batch (v5e-16 and v4-32: 4)")
_MFU = flags.DEFINE_float("mfu", 0.30, "model FLOPs utilisation of the pod for the consumption figures")
TARGET_PACKED = 10e6  # tokens/s per host (issue 19)
PODS = {"v5e-16": (16, 197e12, 4), "v4-32": (16, 275e12, 4)}  # chips, bf16 peak per chip, hosts


def _rate(next_batch, seconds: float) -> tuple[float, int]:
  """(tokens/s, batches) after one untimed batch (start-up is not throughput)."""
  next_batch()
  tokens, n, t0 = 0, 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    tokens += next_batch()
    n += 1
  return tokens / (time.perf_counter() - t0), n


def _flops_per_token(cfg, vocab_size: int) -> float:
  """Training FLOPs per token of the config's LM (train/metrics.py's 6N + attention), N from the shapes:
  per block 4·d·(heads·d_head) attention + 2·d·d_mlp MLP, plus the d × vocab unembedding."""
  from monojax.data import tokenizer
  from monojax.train import metrics
  m = cfg.model
  n = m.n_layers * (4 * m.d_model * m.n_heads * m.d_head + 2 * m.d_model * m.d_mlp)
  n += m.d_model * tokenizer.padded_vocab_size(vocab_size)
  return metrics.lm_flops_per_token(m, cfg.data.seq_len, n)


def main(argv):
  del argv
  from machine import cpu_line
  from monojax.corpus import build_corpus
  from monojax.data import packed, pipeline
  cfg = _CONFIG.value
  hosts = _HOSTS.value
  if cfg.data.global_batch % hosts:
    raise SystemExit(f"--hosts={hosts} must divide data.global_batch={cfg.data.global_batch}")
  host_batch = cfg.data.global_batch // hosts
  root = build_corpus.ensure_data_root(cfg.data, log=print)
  tok = pipeline.get_tokenizer(cfg.data, root, log=print)
  src = pipeline.text_source(cfg.data, root, "train", log=print)
  print(f"machine: {cpu_line()}")
  print(f"corpus {root}: {len(src):,} train documents; tokenizer {tok.spec} (vocab {tok.vocab_size:,}); "
        f"windows of {cfg.data.seq_len + 1}; host batch {host_batch} (host 0 of {hosts}); grain threads "
        f"{cfg.data.num_threads}, workers {cfg.data.workers}")

  state = {"i": 0}
  B = cfg.data.tokenize_batch_docs

  def tokenize_only():
    docs = [src[(state["i"] + j) % len(src)] for j in range(B)]
    state["i"] += B
    return int(tok.encode_documents(docs).size)

  rows = [("tokenization alone (anchor)", *_rate(tokenize_only, _SECONDS.value), None)]

  def open_reader(fmt):
    with cfg.unlocked():
      cfg.data.format = fmt
    return iter(pipeline.host_batches(cfg.data, "train", tokenizer=tok, root=root, host_batch=host_batch, seed=0,
                                      process_index=0, process_count=hosts, log=print))

  it = open_reader("raw")
  rows.append(("raw pipeline", *_rate(lambda: int(next(it)["tokens"].size), _SECONDS.value), None))
  del it
  t0 = time.perf_counter()
  packed.build(cfg.data, root, tok, log=print)  # once per corpus/tokenizer/window: not the reader's cost
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  it = open_reader("packed")
  next(it)
  first = time.perf_counter() - t0
  rows.append(("packed reader", *_rate(lambda: int(next(it)["tokens"].size), _SECONDS.value), first))

  flops = _flops_per_token(cfg, tok.vocab_size)
  need = {pod: chips * peak * _MFU.value / flops / n_hosts for pod, (chips, peak, n_hosts) in PODS.items()}
  anchor = rows[0][1]
  print(f"\npaper job: {flops / 1e6:.1f} MFLOP/token; at {_MFU.value:.0%} MFU a host consumes "
        + ", ".join(f"{v / 1e6:.2f} M tokens/s on a {p}" for p, v in need.items()))
  pods = list(need)
  print(f"{'measurement':<30} {'M tok/s':>8} {'batches':>8} {'÷ anchor':>9} " + " ".join(f"{'÷ ' + p:>10}" for p in pods)
        + f" {'first batch':>12}")
  for name, r, n, first_s in rows:
    if n == 0:
      print(f"{name:<30} not measured: no batch completed in {_SECONDS.value} s")
      continue
    print(f"{name:<30} {r / 1e6:>8.2f} {n:>8} {r / anchor:>9.2f} " + " ".join(f"{r / need[p]:>10.2f}" for p in pods)
          + (f" {first_s:>10.2f} s" if first_s is not None else ""))
  r_packed, n_packed, first = rows[-1][1:]
  if n_packed:
    print(f"\npacked: {r_packed / 1e6:.2f} M tokens/s per host (target {TARGET_PACKED / 1e6:.0f} M; first batch "
          f"{first:.2f} s, target < 2 s; packing the corpus once took {build_s:.1f} s) — {cpu_line()}")


if __name__ == "__main__":
  app.run(main)
