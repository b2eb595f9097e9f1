"""Every Triton kernel compiles with every GPU launch configuration of the kernels' ``_configs``
for an H100 (sm_90) and an A100 (sm_80), without a GPU, and the compiled code is sane:

- no register spills (ptxas ``-v``: 0 bytes spill stores and loads);
- dynamic shared memory within the architecture's per-block limit (227 KB sm_90, 163 KB sm_80);
- the 16-bit GEMM-like kernels (LM-head forward, logit gradient, backward GEMMs) use the tensor
  cores: ``wgmma.mma_async`` in the sm_90 PTX, ``mma.sync`` in the sm_80 PTX.

The interpreter tests check the math but not the GPU code generator, which is stricter (it
rejects non-constexpr globals and inconsistent loop-carried types that the interpreter accepts).
``tests/_gpu_compile.py`` runs the full pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas) in a
subprocess, because the interpreter (TRITON_INTERPRET=1, set by conftest) must be off when the
kernels are decorated; it runs once per session and every test reads its report. Compiled, not
run: no timing is implied.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HELPER = pathlib.Path(__file__).resolve().parents[1] / "_gpu_compile.py"


@pytest.fixture(scope="module")
def report():
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stdout[-2000:]
    return rows


def _where(row) -> str:
    return f"{row['kernel']} sm_{row['arch']} {row['tiles']} warps={row['num_warps']}"


def test_every_kernel_and_config_compiled_for_both_archs(report):
    import _gpu_compile
    from steppo_fast.kernels import _configs

    assert all(row["cubin"] for row in report)
    assert len(report) == len(_gpu_compile.kernel_cases())
    # every launch the table can return is compiled for both architectures
    families = _configs.gpu_launches()
    compiled = {(json.dumps(r["tiles"], sort_keys=True), r["num_warps"], r["arch"]) for r in report}
    for launches in families.values():
        for launch in launches:
            for arch in (90, 80):
                key = (json.dumps(launch.constexprs, sort_keys=True), launch.num_warps, arch)
                assert key in compiled, (launch, arch)


def test_no_register_spills(report):
    spilled = [f"{_where(r)}: {r['spill_bytes']} B" for r in report if r["spill_bytes"]]
    assert not spilled, spilled


def test_shared_memory_within_arch_limit(report):
    over = [f"{_where(r)}: {r['smem']} B" for r in report if r["smem"] > r["smem_limit"]]
    assert not over, over


def test_sixteen_bit_gemms_use_tensor_cores(report):
    gemms = [r for r in report if r["tensor_cores"]]
    assert {r["arch"] for r in gemms} == {80, 90}
    for row in gemms:
        assert row["wgmma"] if row["arch"] == 90 else row["mma"], _where(row)
