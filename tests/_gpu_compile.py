"""Compile Triton kernels for an NVIDIA target without a GPU and report their resources.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline
(TTIR, TTGIR, LLVM IR, PTX, ptxas) on a CPU-only machine. ``CompiledKernel.n_regs`` /
``n_spills`` exist only once a driver loads the binary, so registers and spills are read from
the ptxas ``-v`` log that triton prints when ``TRITON_DUMP_PTXAS_LOG=1`` (captured per compile;
``TRITON_ALWAYS_COMPILE=1`` so a cache hit cannot skip ptxas), and the dynamic shared memory
from ``metadata.shared``.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be decorated for a real backend), so
the tests run it in a subprocess: ``python tests/_gpu_compile.py`` prints one JSON line per
compiled (kernel, flags, launch config, arch) and ``--table`` a markdown table instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

# Scalar (non-pointer, non-constexpr) kernel arguments that are floats; the others are i32.
FLOAT_ARGS = {
    "decay",
    "gamma",
    "length_power",
    "clip_low",
    "clip_high",
    "dual_clip",
    "inv_temp",
    "kl_coef",
    "normalizer",
}
# Shared memory per block (opt-in maximum) by compute capability, bytes.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_report(fn, constexprs, pointers, arch, num_warps, num_stages, hints=None) -> dict:
    """Compile ``fn`` for sm_``arch``; returns regs, spill bytes, dynamic shared memory bytes,
    and whether the PTX holds Hopper warpgroup MMAs (wgmma) or Ampere-style mma.sync.

    Specialisation as a real launch would see it: every pointer 16-byte aligned (fresh torch
    allocations and row slices of rows with 8 * k bf16 elements are), the integer arguments
    named in ``hints`` divisible by 16 (value 16) or equal to 1 (value 1, which the JIT turns
    into a constant, e.g. the unit stride of a transposed operand)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    hints = hints or {}
    constexprs = dict(constexprs, **{k: 1 for k, v in hints.items() if v == 1})
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name.endswith("_ptr") or hints.get(name) == 16:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*i32" if name.startswith("cu") else "*fp32")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
    text = log.getvalue()
    regs, spills = _REGS.search(text), _SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas log for {fn.__name__} (is TRITON_DUMP_PTXAS_LOG=1?)")
    ptx = compiled.asm["ptx"]
    return dict(
        regs=int(regs.group(1)),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        smem=int(compiled.metadata.shared),
        wgmma="wgmma.mma_async" in ptx,
        mma="mma.sync" in ptx,
        cubin="cubin" in compiled.asm,
    )


# Launch-time divisibility of the LM-head kernels' integer arguments (H and V multiples of 16,
# as in every real model); the matmul has two uses with different unit strides.
_HEAD_HINTS = dict(stride_hm=16, stride_wv=16, width=16, vocab=16)
_MM_HINTS = {
    "d_hidden": dict(stride_ap=16, stride_ak=1, stride_bk=16, stride_bq=1, stride_cp=16,
                     stride_cq=1, size_q=16, size_k=16),  # dz [c, V] @ W [V, H]
    "d_weight": dict(stride_ap=1, stride_ak=16, stride_bk=16, stride_bq=1, stride_cp=16,
                     stride_cq=1, size_p=16, size_q=16),  # dz^T [V, c] @ h [c, H]
}  # fmt: skip


def kernel_cases(archs=(90, 80)):
    """Every compile to run: (name, kernel, constexpr flags, pointer dtypes, int hints, launch,
    arch, tensor-core GEMM expected).

    Each kernel with its heaviest flag variant is compiled with every GPU launch configuration
    that ``steppo_fast.kernels._configs`` can return (``_configs.gpu_launches``) for every arch;
    its other flag variants (and fp16, which compiles like bf16) with the largest configuration,
    for sm_90 only (they change the epilogue, not the tiling)."""
    from steppo_fast.kernels import _configs
    from steppo_fast.kernels.logprobs import kernel as logprobs
    from steppo_fast.kernels.scan import kernel as scan
    from steppo_fast.kernels.segment import kernel as segment
    from steppo_fast.kernels.step_loss import kernel as step_loss
    from steppo_fast.kernels.step_loss import kernel_finish, kernel_traj
    from steppo_fast.kernels.step_loss.ops import finish_cols

    launches = _configs.gpu_launches()
    cases = []

    def add(name, fn, variants, family, pointers=None, hints=None, tensor_cores=False, full=True):
        for index, flags in enumerate(variants):
            every = full and index == 0
            for launch in launches[family] if every else launches[family][-1:]:
                for arch in archs if every else archs[:1]:
                    label = name + "".join(f",{k}={int(v)}" for k, v in flags.items())
                    cases.append(
                        (label, fn, flags, pointers or {}, hints or {}, launch, arch, tensor_cores)
                    )

    add("segment_reduce", segment.segment_reduce_kernel, [dict(MEAN=True)], "segment_reduce",
        {"x_ptr": "*bf16"})  # fmt: skip
    add("segment_broadcast", segment.segment_broadcast_kernel,
        [dict(MEAN=True, LOG2_SEGMENTS=12)], "elementwise")  # fmt: skip
    gae = dict(REVERSE=True, HAS_VALUES=True, HAS_LAST=True, LOG2_SEGMENTS=9)
    grad = dict(REVERSE=False, HAS_VALUES=False, HAS_LAST=False, LOG2_SEGMENTS=9)
    add("scan_aggregate", scan.scan_aggregate_kernel, [gae, grad], "scan")
    add("scan_apply", scan.scan_apply_kernel, [dict(gae, HAS_CARRY=True),
        dict(grad, HAS_CARRY=True)], "scan")  # fmt: skip
    add("scan_carry", scan.scan_carry_kernel, [{}], "scan_carry")
    cols = step_loss.NUM_COLS

    def loss_flags(ratio):
        return dict(RATIO=ratio, KL_TYPE=3 - ratio, HAS_WEIGHT=True, HAS_DUAL=ratio != 1,
                    NUM_COLS=cols)  # fmt: skip

    add("policy_fwd", step_loss.policy_fwd_kernel,
        [dict(loss_flags(r), AGG=r) for r in (0, 1, 2)], "step_loss",
        {"logp_ptr": "*bf16"})  # fmt: skip
    add("policy_bwd", step_loss.policy_bwd_kernel,
        [dict(loss_flags(r), NEED_OLD=True, NEED_REF=True, NEED_SW=True, SW_IN_DENOM=r != 0)
         for r in (0, 1, 2)], "step_loss")  # fmt: skip
    add("policy_traj", kernel_traj.policy_traj_kernel,
        [dict(RATIO=r, AGG=a, HAS_WEIGHT=True, HAS_DUAL=True, NUM_COLS=cols)
         for r, a in ((2, 2), (2, 0), (2, 1), (1, 2), (0, 2))], "step_loss_traj")  # fmt: skip
    add("policy_finish", kernel_finish.policy_finish_kernel,
        [dict(HAS_NORMALIZER=n, NUM_COLS=cols, COLS=finish_cols()) for n in (0, 1)],
        "finish")  # fmt: skip
    for dtype in ("bf16", "fp16", "fp32"):
        sixteen = dtype != "fp32"
        full = dtype != "fp16"  # fp16 compiles like bf16: the largest tiles on sm_90 only
        family = "16" if sixteen else "32"
        ptr = "*" + dtype
        pointers = {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "t_ptr": "*i64"}
        head = dict(DOT_FP32=not sixteen, HAS_BIAS=True)
        add(f"lse_fwd[{dtype}]", logprobs.lse_fwd_kernel,
            [dict(head, WANT_ENTROPY=True), dict(head, WANT_ENTROPY=False)],
            "lse_fwd" + family, pointers, _HEAD_HINTS, sixteen, full)  # fmt: skip
        add(f"logit_grad[{dtype}]", logprobs.logit_grad_kernel,
            [dict(head, HAS_ENT_GRAD=True, NEED_DB=True, ROUND_BF16=dtype == "bf16"),
             dict(head, HAS_ENT_GRAD=False, NEED_DB=False, ROUND_BF16=dtype == "bf16")],
            "logit_grad" + family, dict(pointers, dz_ptr=ptr), _HEAD_HINTS, sixteen,
            full)  # fmt: skip
        for use, hints in _MM_HINTS.items():
            add(f"matmul[{dtype},{use}]", logprobs.matmul_kernel,
                [dict(DOT_FP32=not sixteen, ACCUMULATE=use == "d_weight")], "matmul" + family,
                {"a_ptr": ptr, "b_ptr": ptr}, hints, sixteen, full)  # fmt: skip
    return cases


def main(archs=(90, 80)) -> None:
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    for name, fn, flags, pointers, hints, launch, arch, tensor_cores in kernel_cases(archs):
        constexprs = dict(flags, **launch.constexprs)
        report = compile_report(
            fn, constexprs, pointers, arch, launch.num_warps, launch.num_stages, hints
        )
        rows.append(
            dict(
                kernel=name,
                arch=arch,
                tiles=launch.constexprs,
                num_warps=launch.num_warps,
                num_stages=launch.num_stages,
                tensor_cores=tensor_cores,
                smem_limit=SMEM_LIMIT[arch],
                **report,
            )
        )
    if "--table" in sys.argv:
        print("| kernel | sm | tiles | warps | stages | regs | spill B | smem KB | MMA |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            tiles = ", ".join(f"{k}={v}" for k, v in r["tiles"].items())
            mma = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
            print(
                f"| {r['kernel']} | {r['arch']} | {tiles} | {r['num_warps']} | "
                f"{r['num_stages']} | {r['regs']} | {r['spill_bytes']} | "
                f"{r['smem'] / 1024:.1f} | {mma} |"
            )
    else:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("run with TRITON_INTERPRET unset")
    main()
