#!/usr/bin/env bash
# A separate venv with monojax and the anchors of benchmarks/sae_step.py: torch (CPU) and SAELens,
# pinned. Neither is a monojax dependency; nothing here touches pyproject.toml or the project's venv.
#
#   bash benchmarks/setup_anchors.sh                 # makes ~/.cache/monojax/anchors-venv
#   ~/.cache/monojax/anchors-venv/bin/python benchmarks/sae_step.py
#
# Overrides: ANCHORS_VENV (where), PYTHON (which interpreter makes it), TORCH_VERSION, SAE_LENS_VERSION.
# sae-lens 6.18.0 is the version benchmarks/torch_sae_anchor.py was written against (its
# StandardTrainingSAE / TrainStepInput / SAETrainer._train_step API).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ANCHORS_VENV:-$HOME/.cache/monojax/anchors-venv}"
PYTHON="${PYTHON:-python}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SAE_LENS_VERSION="${SAE_LENS_VERSION:-6.18.0}"

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
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==${TORCH_VERSION}" "sae-lens==${SAE_LENS_VERSION}"

# 3. Check: everything imports, and report the versions the benchmark will print.
"$VENV/bin/python" - <<'EOF'
import jax, numpy, torch, sae_lens
import monojax  # noqa: F401
print(f"ok: jax {jax.__version__}, numpy {numpy.__version__}, torch {torch.__version__}, "
      f"sae_lens {getattr(sae_lens, '__version__', '?')}")
EOF
"${PIP[@]}" check || echo "warning: pip check reported conflicts (above); the benchmark may still run"
echo "full benchmark: $VENV/bin/python benchmarks/sae_step.py"
