#!/usr/bin/env bash
# Set up (or update) ./.venv with PyTorch, Triton and steppo_fast installed editable, with the C++
# CPU extension built. Idempotent: re-running only rebuilds what changed.
#   TORCH_SPEC   torch requirement to install when torch is missing (default torch==2.13.0, the
#                CPU wheel these machines hold; on a GPU box use your CUDA build instead)
#   EXTRAS       package extras to install (default dev,train,numba)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,train,numba}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
# torch first and pinned: an unpinned torch (also inside an isolated build) pulls a CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"
# Build requirements by hand, then build without isolation against the installed torch.
"${PIP[@]}" install "setuptools>=69" wheel ninja numpy
"${PIP[@]}" install --no-build-isolation -e ".[${EXTRAS}]"
.venv/bin/python -c "import steppo_fast, torch; print('steppo_fast', steppo_fast.__version__, '| torch', torch.__version__)"
