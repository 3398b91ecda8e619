"""The machine line every benchmark prints beside its figures (compare figures only within one run)."""
from __future__ import annotations

import os
import platform

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line() -> str:
  """'<model>; <n> cores; ISA <flags>' from /proc/cpuinfo (the platform's name elsewhere)."""
  model, isa = platform.processor() or "unknown", []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          isa = [f for f in ISA_FLAGS if f in have]
          break
  except OSError:
    pass
  return f"{model}; {os.cpu_count()} cores; ISA {' '.join(isa) or '?'}"
