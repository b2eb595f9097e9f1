#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
#
# Then the numeric tests (marker "numerics", tests/conftest.py NUMERIC_FILES) run a second
# time under another CPU code path, so a tolerance that only holds for one CPU's kernels fails
# here first: ATen's generic (non-AVX) kernels, MKL and oneDNN limited to SSE4, OpenBLAS's
# Nehalem kernels (numpy's matmul: the Triton interpreter's tl.dot) and numpy's baseline SIMD
# (its exp/log). Each variable changes the bits of some results on an AVX-512 machine.
# SECOND_CODE_PATH=0 skips that pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/pytest -q -p no:cacheprovider "$@"
if [ "${SECOND_CODE_PATH:-1}" != 0 ]; then
  echo "numeric tests again under another CPU code path"
  status=0
  env ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
    OPENBLAS_CORETYPE=Nehalem NPY_ENABLE_CPU_FEATURES=X86_V2 \
    .venv/bin/pytest -q -p no:cacheprovider -m numerics "$@" || status=$?
  # 5: the arguments selected no numeric test (e.g. one non-numeric file)
  [ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"
fi
