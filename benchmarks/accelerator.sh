#!/usr/bin/env bash
# The accelerator numbers of issue 19, part 5: one short run on a GPU/TPU machine (never needed by CI).
#   bash benchmarks/accelerator.sh [--steps=10]      # paper shapes; prints one block for BUILD_NOTES.md
# It installs nothing: run it where `pip install -e .` and an accelerator build of jax are in place
# (e.g. `pip install -e . "jax[cuda12]"` or `"jax[tpu]"`). The allocator may take what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec timeout 540 python benchmarks/accelerator.py "$@"
