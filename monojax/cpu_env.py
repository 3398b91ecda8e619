"""The glibc malloc settings XLA's CPU backend runs fastest with, applied by re-executing the process
once (glibc reads GLIBC_TUNABLES only at start-up). Imports nothing heavy: call it before jax.

Without them glibc returns XLA's large freed buffers to the OS and every step page-faults them in
again; with them steps are faster (measured: BUILD_NOTES.md, "Allocator tunables").
"""
from __future__ import annotations

import os
import sys

MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_MARKER = "MONOJAX_REEXEC"


def cpu_flags() -> set[str]:
  """The ISA flags /proc/cpuinfo lists (empty off Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def has_bf16_matrix_units() -> bool:
  """AVX512-BF16 or AMX-BF16: where XLA's bf16-input GEMM beats f32 (3.6× measured on an AMX Xeon,
  BUILD_NOTES.md "Performance, round two"); without them bf16 dots are emulated and slower."""
  return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def on_accelerator_host() -> bool:
  """True when this process will run on a TPU/GPU (the tunables only matter for the CPU backend)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return "cpu" not in platforms.split(",")[0]
  return (os.path.exists("/dev/nvidia0") or any(os.path.exists(f"/dev/accel{i}") for i in range(4))
          or bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_NAME")))


def reexec_with_malloc_tunables(argv: list[str], message: str | None = None) -> None:
  """Replaces this process with `sys.executable *argv` with GLIBC_TUNABLES set; returns without
  doing anything when GLIBC_TUNABLES is already in the environment (even empty: the user's own
  choice), after one re-exec, off Linux, or on an accelerator host."""
  if "GLIBC_TUNABLES" in os.environ or os.environ.get(_MARKER) or sys.platform != "linux" or on_accelerator_host():
    return
  if message:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, **{_MARKER: "1"})
  os.execve(sys.executable, [sys.executable, *argv], env)
