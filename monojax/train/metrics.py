"""Metrics on process 0: one JSON object per logged step in metrics.jsonl, TensorBoard events
(tensorboardX, no TensorFlow), and a console line with loss, tokens/s, MFU and ETA."""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp

from monojax import files

# bf16 dense peak FLOP/s per chip, for MFU when train.peak_flops is not given.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def lm_flops_per_token(model_cfg, seq_len: int, n_matmul_params: int) -> float:
  """Training FLOPs per token: 6 N (matmul params incl. unembedding) + 12 L T d (attention), as PaLM."""
  return 6.0 * n_matmul_params + 12.0 * model_cfg.n_layers * seq_len * model_cfg.n_heads * model_cfg.d_head


def peak_flops(configured: float) -> tuple[float, str]:
  """Total peak FLOP/s of the devices in this job, and where the number came from."""
  if configured > 0:
    return configured * jax.device_count(), "train.peak_flops"
  dev = jax.devices()[0]
  for name, f in PEAK_FLOPS.items():
    if dev.device_kind.startswith(name):
      return f * jax.device_count(), f"{dev.device_kind} table"
  # CPU (or unknown): measure a large f32 matmul now (best of 5 trials, so a busy moment does not
  # understate the peak); all virtual CPU devices share the same cores, so this is the job's peak.
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(3):
      r = f(a)
    r.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / 3)
  return 2 * n ** 3 / best, "measured f32 matmul, best of 5"


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricWriter:
  """Writes only on process 0. On resume, drops lines past the restored step so the file reads as
  one uninterrupted run."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= resume_step:
              keep.append(line if line.endswith("\n") else line + "\n")
          except json.JSONDecodeError:
            continue  # a line cut by a kill -9
      files.atomic_write(self.path, "".join(keep))
    self.file = open(self.path, "a")
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.summary_pb2 import Summary
    self._summary = Summary
    self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, **{k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    # One TensorBoard event holding every scalar of the step (what add_scalar writes, one value per
    # event, for each: ~10x the host time; benchmarks/loop_overhead.py).
    summary = self._summary
    values = [summary.Value(tag=k, simple_value=v) for k, v in row.items()
              if k != "step" and isinstance(v, float) and math.isfinite(v)]
    if values:
      self.tb._get_file_writer().add_summary(summary(value=values), step)

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()


def console_line(step: int, total: int, m: dict, tok_s: float, mfu: float, eta_s: float) -> str:
  lm = (f"loss {m['loss']:.4f} | acc {m['accuracy']:.3f} | bpb {m['bits_per_byte']:.3f} | lr {m['lr']:.2e}"
        if "loss" in m else "frozen LM")  # the frozen step stops at the SAE's layer: no LM loss
  speed = (f"{tok_s / 1e3:,.1f}k tok/s | MFU {100 * mfu:.1f}%" if math.isfinite(tok_s)
           else "- tok/s | MFU -")  # no completed step timed since the last compile, eval or save
  return f"step {step:>6}/{total} | {lm} | {speed} | ETA {_fmt_time(eta_s)}"
