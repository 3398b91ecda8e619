#!/usr/bin/env bash
# A separate venv with monojax and the anchors of benchmarks/sae_step.py and benchmarks/compare.py:
# torch (CPU), SAELens and TransformerLens, pinned. None is a monojax dependency; nothing here
# touches pyproject.toml or the project's venv.
#
#   bash benchmarks/setup_anchors.sh                 # makes ~/.cache/monojax/anchors-venv (~5-10 min)
#   ~/.cache/monojax/anchors-venv/bin/python benchmarks/compare.py
#   ~/.cache/monojax/anchors-venv/bin/python benchmarks/sae_step.py
#
# Overrides: ANCHORS_VENV (where), PYTHON (which interpreter makes it), TORCH_VERSION, SAE_LENS_VERSION,
# TL_VERSION.
# sae-lens 6.18.0 is the version benchmarks/torch_sae_anchor.py was written against (its
# StandardTrainingSAE / TrainStepInput / SAETrainer._train_step API); it needs transformer-lens
# >=2.16.1,<3, pinned here to 2.18.0 (benchmarks/anchors_tl.py uses its HookedTransformer API).
#
# Python 3.13: transformer-lens 2.x requires numpy<2 on Python <= 3.12 while jax 0.10 requires
# numpy>=2, so on 3.11/3.12 pip cannot install both; on 3.13 transformer-lens 2.18 pins no numpy.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ANCHORS_VENV:-$HOME/.cache/monojax/anchors-venv}"
# The first interpreter that runs and is >= 3.13 (pyenv shims exist for versions that are not active,
# so each candidate is run, not just looked up).
find_python() {
  local c
  for c in python3.13 python3.14 "$HOME"/.pyenv/versions/3.1[3-9]*/bin/python3 /usr/bin/python3.1[3-9] python3; do
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 13))' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}
PYTHON="${PYTHON:-$(find_python || echo python3.13)}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SAE_LENS_VERSION="${SAE_LENS_VERSION:-6.18.0}"
TL_VERSION="${TL_VERSION:-2.18.0}"

if ! "$PYTHON" -c '' >/dev/null 2>&1; then
  echo "error: $PYTHON not found; set PYTHON to a Python >= 3.13 interpreter (see the note above)" >&2
  exit 1
fi
WANT="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -x "$VENV/bin/python" ]; then
  HAVE="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)"
  if [ "$HAVE" != "$WANT" ]; then
    echo "existing venv $VENV is Python $HAVE, want $WANT: recreating it (venv --clear)"
    "$PYTHON" -m venv --clear "$VENV"
  fi
fi

echo "anchors venv: $VENV (python: $("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

# 1. monojax itself (editable), so the benchmark runs monojax and the anchors in one process.
"${PIP[@]}" install -e "$REPO"

# 2. The anchors, without moving anything monojax runs on: jax, jaxlib, flax, optax and numpy are
#    held at the versions step 1 installed (pip fails instead of silently changing them).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"${PIP[@]}" freeze | grep -iE '^(jax|jaxlib|flax|optax|numpy|ml[-_]collections)==' > "$CONSTRAINTS"
echo "held during the anchor install:"; sed 's/^/  /' "$CONSTRAINTS"
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==${TORCH_VERSION}" "sae-lens==${SAE_LENS_VERSION}" \
  "transformer-lens==${TL_VERSION}"

# 3. Check: everything imports, and report the versions the benchmark will print.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import jax, numpy, torch, sae_lens, transformer_lens  # noqa: F401
import monojax  # noqa: F401
print(f"ok: jax {jax.__version__}, numpy {numpy.__version__}, torch {torch.__version__}, "
      f"sae_lens {md.version('sae-lens')}, transformer_lens {md.version('transformer-lens')}")
EOF
"${PIP[@]}" check || echo "warning: pip check reported conflicts (above); the benchmark may still run"
echo "benchmarks: $VENV/bin/python benchmarks/compare.py   (or benchmarks/sae_step.py)"
