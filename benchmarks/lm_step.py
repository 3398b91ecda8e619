"""Tokens/s and FLOP/s of the LM training step (a benchmark, not a test).

  python benchmarks/lm_step.py [--chunks=0,64] [--ce_kernels=off,auto] [--steps=8] [--quick]

Times the jitted `make_train_step` (monojax/train/step.py) on a state from `init_state`
(monojax/train/state.py), fp32, for the quickstart shapes (d 128, MLP 512, 1 layer, ctx 128,
batch 32, vocab 8,192) and the paper shapes (ctx 256, batch 32, vocab 50,304 = NeoX's 50,277
padded), each with loss_chunk 0 (whole sequence) and chunked, with XLA's cross-entropy and with the
CPU kernel (train.ce_kernel, monojax/train/cross_entropy.py). Anchor: a plain jitted f32 matmul
(4096x512 @ 512x4096) measured in the same process; achieved FLOP/s (6 N + attention, as the
training loop's MFU) is printed as a ratio to it. Each number is the median of --steps timed
calls after the compile and 2 warm-up calls; the configurations and the anchor are timed
round-robin, so load from other processes falls on all of them alike.

The process re-executes itself once with the glibc malloc tunables of
docs/cpu-notes.md §1 (unless GLIBC_TUNABLES is already set), so the step and the
anchor run with the same allocator. --quick: tiny shapes, 2 timed steps, for a smoke check.
"""
from __future__ import annotations

import os
import sys
import time

from monojax import cpu_env  # noqa: E402 (imports nothing heavy)

if __name__ == "__main__":  # the allocator setting must be in place before jax starts
  cpu_env.reexec_with_malloc_tunables(sys.argv)

import machine  # noqa: E402 (benchmarks/machine.py, beside this file)
from absl import app, flags, logging  # noqa: E402

_CHUNKS = flags.DEFINE_list("chunks", ["0", "64"], "train.loss_chunk values to time (0 = whole sequence)")
_CE = flags.DEFINE_list("ce_kernels", ["off", "auto"], "train.ce_kernel values to time (off = XLA's loss)")
_STEPS = flags.DEFINE_integer("steps", 8, "timed steps per configuration (median reported)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after the compile")
_QUICK = flags.DEFINE_bool("quick", False, "tiny shapes, loss_chunk 0 and 8, 2 timed steps (smoke check)")
_ONLY = flags.DEFINE_list("shapes", [], "subset of shape names to run (default: all)")

# name -> (d_model, d_mlp, n_heads, d_head, seq_len, batch, padded vocab, real vocab)
SHAPES = {
    "quickstart": (128, 512, 4, 32, 128, 32, 8192, 8192),
    "paper": (128, 512, 4, 32, 256, 32, 50304, 50277),
}
QUICK_SHAPES = {"tiny": (32, 64, 2, 16, 16, 4, 512, 500)}
MATMUL = (4096, 512, 4096)


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def matmul_runner():
  """A callable running the jitted f32 [m, k] @ [k, n] anchor to completion (compiled already)."""
  import jax
  import jax.numpy as jnp
  m, k, n = MATMUL
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (m, k), jnp.float32)
  b = jax.random.normal(kb, (k, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()  # compile
  return lambda: f(a, b).block_until_ready()


def lm_runner(shape, loss_chunk: int, ce_kernel: str = "auto") -> tuple:
  """(callable running one training step to completion, info) for one shape and loss_chunk. The
  state lives in the closure and is donated step to step, as in the training loop."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from monojax import sharding
  from monojax.config import base_config
  from monojax.train import metrics as metrics_lib, state as state_lib, step as step_lib

  d, mlp, heads, d_head, seq, batch, vocab_pad, vocab = shape
  cfg = base_config()
  cfg.model.d_model, cfg.model.d_mlp, cfg.model.n_heads, cfg.model.d_head = d, mlp, heads, d_head
  cfg.data.seq_len, cfg.data.global_batch = seq, batch  # model.max_seq_len follows data.seq_len
  cfg.model.vocab_size = vocab_pad
  cfg.train.loss_chunk = loss_chunk
  mesh = sharding.make_mesh(cfg.mesh)  # (-1, 1): every local device on "data"
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
  n_matmul = state_lib.count_params(state["params"])

  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  token_bytes = jnp.ones((vocab_pad,), jnp.int32)  # bits/byte is not what is measured here
  step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, vocab_size=vocab, dtype=cfg.train.dtype,
                                          loss_chunk=loss_chunk, token_bytes=token_bytes, ce_kernel=ce_kernel),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  rng = np.random.default_rng(0)
  tokens = jax.device_put(rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32), batch_sh["tokens"])
  t0 = time.perf_counter()
  compiled = step.lower(state, {"tokens": tokens}).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state, "metrics": None}

  def one():
    box["state"], box["metrics"] = compiled(box["state"], {"tokens": tokens})
    jax.block_until_ready((box["state"], box["metrics"]))

  one()  # first call (allocations): not timed, counted as a warm-up
  loss = float(box["metrics"]["loss"])
  if not np.isfinite(loss):
    raise RuntimeError(f"non-finite loss {loss} for shape {shape}, loss_chunk {loss_chunk}")
  return one, {"compile_s": compile_s, "tokens": batch * seq,
               "flops_per_token": metrics_lib.lm_flops_per_token(cfg.model, seq, n_matmul)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # not jax's "Unable to initialize backend 'tpu'" INFO line
  import jax
  quick = _QUICK.value
  steps = 2 if quick else _STEPS.value
  warmup = 1 if quick else _WARMUP.value
  if steps < 1:
    raise app.UsageError("--steps must be >= 1")
  shapes = QUICK_SHAPES if quick else {k: v for k, v in SHAPES.items() if not _ONLY.value or k in _ONLY.value}
  chunks = [0, 8] if quick else [int(c) for c in _CHUNKS.value]
  dev = jax.devices()[0]
  load0 = os.getloadavg()
  print(f"machine: {machine.cpu_line()}")
  print(f"jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}), {os.cpu_count()} CPU(s); "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or '(unset)'}; load average {load0[0]:.2f}")
  print(f"fp32; median of {steps} timed steps after compile + {warmup} warm-up; FLOPs = 6 N + 12 L T d_attn per token")

  # Everything is compiled first, then timed round-robin (one call of each per round): load from
  # other processes then falls on all configurations alike instead of on whichever ran last.
  m, k, n = MATMUL
  from monojax.train import cross_entropy
  runners = [("anchor", None, None, matmul_runner(), None)]
  ce_modes = [m for m in _CE.value if m == "off" or cross_entropy.use_kernel(m)] or ["off"]
  for name, shape in shapes.items():
    seq = shape[4]
    for chunk in chunks:
      if chunk and (chunk >= seq or seq % chunk):
        print(f"{name}: loss_chunk {chunk} does not divide ctx {seq} below it: skipped (step.py would use {seq})")
        continue
      for ce in ce_modes:
        fn, info = lm_runner(shape, chunk, ce)
        runners.append((name, shape, (chunk, "on" if ce != "off" else "off"), fn, info))
  for _ in range(warmup - 1):
    for r in runners:
      r[3]()
  times = [[] for _ in runners]
  for _ in range(steps):
    for i, r in enumerate(runners):
      times[i].append(_timed(r[3]))
  med = [_median(t) for t in times]
  anchor = 2 * m * k * n / med[0]
  spread = [(max(t) - min(t)) / _median(t) for t in times]
  print(f"anchor: jitted f32 matmul {m}x{k} @ {k}x{n}: {med[0] * 1e3:.1f} ms, {anchor / 1e9:.1f} GFLOP/s "
        f"(best {min(times[0]) * 1e3:.1f} ms, spread {100 * spread[0]:.0f}%)\n")

  head = (f"{'shape':<11} {'ctx':>4} {'batch':>5} {'vocab':>6} {'loss_chunk':>10} {'CE kernel':>9} {'compile s':>9} {'step ms':>8} "
          f"{'best ms':>8} {'spread':>6} {'tokens/s':>9} {'MFLOP/tok':>9} {'GFLOP/s':>8} {'vs matmul':>9}")
  print(head)
  print("-" * len(head))
  for (name, shape, chunk, _, info), t, ts, sp in zip(runners[1:], med[1:], times[1:], spread[1:]):
    tok_s = info["tokens"] / t
    flops = tok_s * info["flops_per_token"]
    print(f"{name:<11} {shape[4]:>4} {shape[5]:>5} {shape[6]:>6} {chunk[0]:>10} {chunk[1]:>9} {info['compile_s']:>9.1f} "
          f"{t * 1e3:>8.1f} {min(ts) * 1e3:>8.1f} {100 * sp:>5.0f}% {tok_s:>9,.0f} "
          f"{info['flops_per_token'] / 1e6:>9.2f} {flops / 1e9:>8.1f} {flops / anchor:>9.3f}")
  load1 = os.getloadavg()
  # A busy machine before we started, or timings that moved a lot: the numbers shared the CPU.
  noisy = load0[0] > 0.5 or max(spread) > 0.25
  print(f"\nstep ms: median; best ms: fastest of the {steps} timed calls; spread = (max - min) / median; "
        f"load average {load0[0]:.2f} -> {load1[0]:.2f}"
        + ("  [noisy: other processes were using the CPU]" if noisy else ""))


if __name__ == "__main__":
  app.run(main)
