"""Compile-on-first-use of monojax's CPU kernels and their registration as XLA FFI targets.

  sae_sparse.cc     "monojax_sae_sparse": the sparse SAE update (monojax/sae/sparse/update.py)
  cross_entropy.cc  "monojax_cross_entropy": softmax CE + logit gradient (monojax/train/cross_entropy.py)

All sources build into one shared library (parallel.h is shared). The library is cached in
~/.cache/monojax/kernels/<hash>/ (hash of the source, the jaxlib version, the compiler, the compile
flags including MONOJAX_KERNEL_FLAGS, and the CPU flags, since it is built with -march=native). It
is written to a temporary file and renamed into place, so concurrent processes never load a
half-written library. `available()` is False, with ONE warning logged, when there is no compiler or
the build fails; callers then use the dense update.

Environment:
  MONOJAX_KERNEL_FLAGS="..."   extra g++ flags after FLAGS (a variant with its own cache entry), e.g.
                               "-mno-avx512f": the scalar/AVX2 branches on an AVX-512 machine (the
                               kernel tests run that variant in a subprocess; `compiled_isa()` tells
                               which branches a loaded library has)
  MONOJAX_REQUIRE_KERNELS=1    a missing compiler or failed build raises (RuntimeError) instead of
                               warning and falling back (CI sets it: a broken kernel fails the tests
                               instead of skipping them)
  MONOJAX_KERNELS_DISABLE=1    never build or load them (the pure-JAX paths; wins over REQUIRE)
  MONOJAX_KERNEL_CACHE=DIR     the cache directory
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jaxlib
from absl import logging

SAE_TARGET = "monojax_sae_sparse"
SAE_SCREENED_TARGET = "monojax_sae_sparse_screened"  # the same update fed a bf16 encoder GEMM
CE_TARGET = "monojax_cross_entropy"
TARGETS = {SAE_TARGET: "MonojaxSaeSparse", SAE_SCREENED_TARGET: "MonojaxSaeSparseScreened",
           CE_TARGET: "MonojaxCrossEntropy"}  # FFI target -> C symbol
ISA_PROBES = {SAE_TARGET: "MonojaxSaeSparseIsa", CE_TARGET: "MonojaxCrossEntropyIsa"}  # -> int bits below
ISA_BITS = {"avx512f": 1, "avx2": 2, "fma": 4}  # the predefined macros each source saw when compiled
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("sae_sparse.cc", "cross_entropy.cc"))
HEADERS = tuple(os.path.join(_HERE, f) for f in ("parallel.h",))
# -mprefer-vector-width=512: GCC's default for Intel AVX-512 parts is 256-bit vectors (measured
# slower here); -fopenmp-simd: the `omp simd` reductions vectorise without -ffast-math.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC")


def extra_flags() -> tuple[str, ...]:
  """MONOJAX_KERNEL_FLAGS, split as a shell would (empty when unset)."""
  return tuple(shlex.split(os.environ.get("MONOJAX_KERNEL_FLAGS", "")))


def flags() -> tuple[str, ...]:
  """The compile flags: FLAGS, then the extra ones (so they override, e.g. -mno-avx512f)."""
  return (*FLAGS, *extra_flags())


def required() -> bool:
  """MONOJAX_REQUIRE_KERNELS set (and not 0/false/no): kernels unavailable is an error."""
  return os.environ.get("MONOJAX_REQUIRE_KERNELS", "").strip().lower() not in ("", "0", "false", "no")


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cache_dir() -> str:
  return os.environ.get("MONOJAX_KERNEL_CACHE", os.path.expanduser("~/.cache/monojax/kernels"))


def library_path(cxx: str) -> str:
  src = b""
  for f in (*SOURCES, *HEADERS):
    with open(f, "rb") as fh:
      src += fh.read() + b"\0"
  key = hashlib.sha256(b"\0".join([src, jaxlib.__version__.encode(), cxx.encode(), "\x1f".join(flags()).encode(),
                                   platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
  return os.path.join(cache_dir(), key, "libmonojax_kernels.so")


def build(cxx: str) -> str:
  """Path of the compiled library, compiling it first if the cache does not have it."""
  path = library_path(cxx)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [cxx, *flags(), "-I", jax.ffi.include_dir(), "-I", _HERE, *SOURCES, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
      errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines() or [""]
      logging.debug("%s\n%s", " ".join(cmd), proc.stderr)
      raise RuntimeError(f"{os.path.basename(cxx)} exited {proc.returncode}: {errors[0].strip()}")
    os.replace(tmp, path)  # atomic: another process sees no library or a whole one
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


_LIB: ctypes.CDLL | None = None  # the loaded library
_REQUIRED_FAILURE: str | None = None  # why, once a required build failed (raised again, not retried)


def _load() -> str | None:
  """Builds, loads and registers the kernels; None, or why not (one line)."""
  global _LIB
  cxx = _compiler()
  if cxx is None:
    return "no C++ compiler (g++/c++/$CXX) found"
  try:
    lib = ctypes.cdll.LoadLibrary(build(cxx))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except Exception as e:  # noqa: BLE001 - any build/load failure means: fall back to dense
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first[:300]
  _LIB = lib
  return None


@functools.cache
def available() -> bool:
  """True once the kernels are compiled, loaded and registered with XLA (CPU); cached. False with
  ONE warning when they cannot be; with MONOJAX_REQUIRE_KERNELS set, a RuntimeError instead."""
  global _REQUIRED_FAILURE
  if os.environ.get("MONOJAX_KERNELS_DISABLE"):
    return False
  problem = _REQUIRED_FAILURE or _load()
  if problem is None:
    return True
  if required():
    _REQUIRED_FAILURE = problem
    raise RuntimeError(f"monojax CPU kernels unavailable ({problem}); MONOJAX_REQUIRE_KERNELS is set")
  if problem.startswith("no C++ compiler"):
    logging.warning("monojax CPU kernels: no C++ compiler (g++/c++/$CXX) found; using the dense SAE update "
                    "and XLA's cross-entropy")
  else:
    logging.warning("monojax CPU kernels unavailable (%s); using the dense SAE update and XLA's cross-entropy",
                    problem)
  return False


def compiled_isa() -> dict[str, set[str]]:
  """{FFI target: the vector ISAs (ISA_BITS names) its source was compiled for} of the loaded
  library: which of the kernel's `#ifdef __AVX512F__` branches runs. Needs `available()`."""
  if not available() or _LIB is None:
    raise RuntimeError("the monojax CPU kernels are not loaded")
  out = {}
  for target, symbol in ISA_PROBES.items():
    fn = getattr(_LIB, symbol)
    fn.restype = ctypes.c_int
    bits = fn()
    out[target] = {name for name, bit in ISA_BITS.items() if bits & bit}
  return out
