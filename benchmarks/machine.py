"""The machine line every benchmark prints beside its figures (compare figures only within one run)."""
from __future__ import annotations

import functools
import os
import platform

from monojax import cpu_env  # the ISA flags and the bf16 rule the code itself runs on (imports nothing heavy)

# The ISA flags that decide a step's speed here: f32 FMA width (avx2+fma, avx512f) and the bf16
# matrix units (avx512_bf16: VDPBF16PS; amx_bf16/amx_tile: Sapphire Rapids' tiles), /proc/cpuinfo names.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BF16_MATRIX_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _model() -> str:
  """The CPU's model name from /proc/cpuinfo (the platform's name elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def isa_flags() -> list[str]:
  """The ISA_FLAGS this CPU has, in ISA_FLAGS order."""
  have = cpu_env.cpu_flags()
  return [f for f in ISA_FLAGS if f in have]


def has_bf16_matrix_units() -> bool:
  """True when the CPU has bf16 dot-product hardware, AVX512-BF16 or AMX-BF16 (monojax's own rule,
  cpu_env.has_bf16_matrix_units, which sae.screen_bf16 "auto" follows)."""
  return cpu_env.has_bf16_matrix_units()


def bf16_units_line(short: bool = False) -> str:
  """Whether bf16 compute can be fast here, printed beside bf16 figures (short: a few words)."""
  if has_bf16_matrix_units():
    have = ", ".join(f for f in BF16_MATRIX_FLAGS if f in cpu_env.cpu_flags())
    return f"bf16 matrix units: {have}" if short else f"this CPU has bf16 matrix units ({have})"
  if short:
    return "no bf16 matrix units on this CPU"
  return ("this CPU lacks bf16 matrix units (no avx512_bf16, no amx_bf16): its bf16 products convert to f32 for "
          "the arithmetic, so bf16 figures from it say nothing about a CPU with AVX512-BF16 or AMX")


def cpu_line() -> str:
  """'<model>; <n> cores; ISA <flags>' from /proc/cpuinfo (the platform's name elsewhere)."""
  return f"{_model()}; {os.cpu_count()} cores; ISA {' '.join(isa_flags()) or '?'}"
