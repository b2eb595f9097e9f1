#!/usr/bin/env bash
# Build (or refresh) the separate test environment for steppo_fast's verl plugin:
#   <repo>/.venv-verl with torch 2.13.0 (CPU), verl[verl-core] 0.9.1, steppo_fast (editable,
#   no C++ build), pytest and hypothesis.
# verl 0.9 pins transformers < 5.11, which collides with the main environment, hence its own venv.
# Idempotent: a second run only checks versions (a few seconds). Then run the tests with
#   .venv-verl/bin/pytest tests/integrations -q
#
# Overridable: VERL_VENV (venv path), PYTHON (interpreter creating it), TORCH_VERSION, VERL_SPEC.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERL_VENV:-$ROOT/.venv-verl}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VERL_VERSION="0.9.1"
VERL_SPEC="${VERL_SPEC:-verl[verl-core]==$VERL_VERSION}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# Every install below is constrained to this torch: an unpinned torch (also one pulled in as a
# dependency) resolves to a 5.5 GB CUDA build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

installed() {  # installed <distribution> <version>: exit 0 when exactly that version is present
    "$PY" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(version(sys.argv[1]).split("+")[0] != sys.argv[2])
except PackageNotFoundError:
    sys.exit(1)
EOF
}

# 1. torch first, pinned (the CPU wheel)
if ! installed torch "$TORCH_VERSION"; then
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi

# 2. verl with its core runtime deps (verl's trainer modules import them); never vllm / sglang
if ! installed verl "$VERL_VERSION" || ! "$PY" -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None
             for m in ('transfer_queue', 'uvicorn', 'cachetools', 'pytest', 'hypothesis')))"; then
    "${PIP[@]}" -c "$CONSTRAINTS" "$VERL_SPEC" pytest hypothesis setuptools wheel
fi

# 3. steppo_fast itself, editable, from this checkout (STEPPO_NO_CPP=1: no C++ build)
if ! "$PY" -I - "$ROOT" <<'EOF'
import os, sys
try:
    import steppo_fast
except ImportError:
    sys.exit(1)
sys.exit(not os.path.realpath(steppo_fast.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep))
EOF
then
    STEPPO_NO_CPP=1 "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"
fi

"$PY" - <<'EOF'
from importlib.metadata import version
print("verl env ready: torch", version("torch"), "| verl", version("verl"),
      "| transformers", version("transformers"), "| steppo_fast", version("steppo_fast"))
EOF
