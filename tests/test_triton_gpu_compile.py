"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter tests check the math but not the GPU code generator, which is stricter (e.g. it
rejects non-constexpr globals and inconsistent loop-carried types that the interpreter
accepts). ``triton.compile`` with a ``GPUTarget`` runs the full pipeline (TTIR, TTGIR, LLVM IR,
PTX, ptxas) on a CPU-only machine. It runs in a subprocess because the interpreter
(TRITON_INTERPRET=1, set by conftest) must be off when the kernels are decorated.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from steppo_fast.kernels import logprobs, scan, segment, step_loss, step_loss_finish

FLOATS = {"decay", "gamma", "length_power", "clip_low", "clip_high", "dual_clip", "inv_temp",
          "kl_coef", "normalizer"}


def build(fn, constexprs, pointers=None):
    pointers = pointers or {}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*i32" if name.startswith("cu") else "*fp32")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm


build(segment._segment_reduce_kernel, dict(MEAN=True, BLOCK_S=16, BLOCK_T=64), {"x_ptr": "*bf16"})
build(segment._segment_broadcast_kernel, dict(MEAN=False, LOG2_SEGMENTS=9, BLOCK=1024))
for reverse in (True, False):
    flags = dict(REVERSE=reverse, HAS_VALUES=reverse, HAS_LAST=reverse, LOG2_SEGMENTS=9,
                 BLOCK=1024)
    build(scan._scan_aggregate_kernel, flags)
    build(scan._scan_apply_kernel, dict(flags, HAS_CARRY=True))
build(scan._scan_carry_kernel, dict(BLOCK=1024))
COLS = step_loss.NUM_COLS
for ratio in (0, 1, 2):
    flags = dict(RATIO=ratio, KL_TYPE=3 - ratio, HAS_WEIGHT=True, HAS_DUAL=ratio != 1,
                 NUM_COLS=COLS, BLOCK_S=16, BLOCK_T=64)
    build(step_loss._policy_fwd_kernel, dict(flags, AGG=ratio), {"logp_ptr": "*bf16"})
    build(step_loss._policy_bwd_kernel, dict(flags, NEED_OLD=True, NEED_REF=True, NEED_SW=True,
                                             SW_IN_DENOM=ratio != 0))
build(step_loss._policy_unit_kernel, dict(HAS_WEIGHT=True, HAS_DUAL=True, NUM_COLS=COLS,
                                          BLOCK=1024))
for has_normalizer in (True, False):
    build(step_loss_finish._policy_finish_kernel, dict(
        HAS_NORMALIZER=has_normalizer, NUM_COLS=COLS, COLS=step_loss_finish.finish_cols(),
        BLOCK_S=step_loss_finish.FINISH_BLOCK_S))
for dot_fp32, dtype in ((True, "*fp32"), (False, "*bf16"), (False, "*fp16")):
    pointers = {"h_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "t_ptr": "*i64"}
    blocks = dict(DOT_FP32=dot_fp32, BLOCK_M=16, BLOCK_V=64, BLOCK_H=32, HAS_BIAS=True)
    build(logprobs._lse_fwd_kernel, dict(blocks, WANT_ENTROPY=True), pointers)
    grad_flags = dict(blocks, HAS_ENT_GRAD=True, NEED_DB=True, ROUND_BF16=dtype == "*bf16")
    build(logprobs._logit_grad_kernel, grad_flags, dict(pointers, dz_ptr=dtype))
    # the backward GEMMs: GPU-sized tiles, operands in the GEMM dtype, fp32 out
    gemm = dict(DOT_FP32=dot_fp32, BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64, GROUP_P=8)
    for accumulate in (False, True):
        build(logprobs._matmul_kernel, dict(gemm, ACCUMULATE=accumulate),
              {"a_ptr": dtype, "b_ptr": dtype})
print("all kernels compiled")
"""


def test_every_kernel_compiles_for_sm90():
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "all kernels compiled" in done.stdout
