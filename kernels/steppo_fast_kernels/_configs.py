"""Launch configurations of the Triton kernels: tile sizes, ``num_warps`` and ``num_stages``,
chosen from the device of the inputs and, where it matters, from the shapes.

- CPU tensors (the Triton interpreter, ``TRITON_INTERPRET=1``): small tiles, so the tests stay
  fast (about 1 ms per program instance); the interpreter ignores ``num_warps`` /
  ``num_stages``.
- CUDA tensors: a static table sized for A100 / H100 (sm_80 / sm_90), no autotuning (autotune
  with 2+ configs fails under the interpreter, and a static choice keeps the registered ops
  deterministic and ``torch.compile``-friendly). Every configuration the table can return is
  compiled for sm_90 and sm_80 by ``tests/gpu_compile/test_triton_gpu_compile.py`` (no
  register spills, shared memory within the limit, tensor-core MMAs in the 16-bit GEMM-like
  kernels) and run under the interpreter on small shapes by
  ``tests/gpu_compile/test_triton_gpu_configs.py``. The argument for each choice (occupancy,
  arithmetic intensity per tile) and the compile report are in bench/ROOFLINE.md, "Launch
  configurations". Compiled, **not measured**: a GPU may prefer other tiles.

Nothing here reads environment variables; the only state is a per-device cache of
``torch.cuda.get_device_properties`` (compute capability and SM count).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch configuration: the kernel's tile constexprs plus warps and pipeline stages."""

    tiles: tuple[tuple[str, int], ...]  # (constexpr name, value) pairs
    num_warps: int
    num_stages: int

    @property
    def constexprs(self) -> dict:
        """The tile constexprs as keyword arguments of the kernel."""
        return dict(self.tiles)

    def kwargs(self) -> dict:
        """Keyword arguments of a launch: tiles, ``num_warps``, ``num_stages``."""
        return dict(self.tiles, num_warps=self.num_warps, num_stages=self.num_stages)

    def __getitem__(self, name: str) -> int:
        return self.constexprs[name]


def _launch(num_warps: int, num_stages: int, **tiles) -> Launch:
    return Launch(tuple(tiles.items()), num_warps, num_stages)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the table needs to know about a CUDA device."""

    capability: int  # 10 * major + minor: 80 (A100), 90 (H100)
    num_sms: int  # streaming multiprocessors: 108 (A100), 132 (H100 SXM)


@functools.cache
def _cuda_gpu(index: int) -> Gpu:
    props = torch.cuda.get_device_properties(index)
    return Gpu(10 * props.major + props.minor, props.multi_processor_count)


def gpu_of(device: torch.device) -> Gpu | None:
    """The CUDA device behind ``device``, or None (CPU: the interpreter's small tiles)."""
    if device.type != "cuda":
        return None
    return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())


# ---- interpreter (CPU) configurations: small tiles, few program instances ----

_CPU = dict(
    lse_fwd=_launch(4, 1, BLOCK_M=16, BLOCK_V=64, BLOCK_H=32),
    logit_grad=_launch(4, 1, BLOCK_M=16, BLOCK_V=64, BLOCK_H=32),
    matmul=_launch(4, 1, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32, GROUP_P=8),
    segment_reduce=_launch(4, 1, BLOCK_S=16, BLOCK_T=64),
    step_loss=_launch(4, 1, BLOCK_S=16, BLOCK_T=64),
    step_loss_traj=_launch(4, 1, BLOCK_B=8, BLOCK_K=16),
    elementwise=_launch(4, 1, BLOCK=1024),
    scan=_launch(4, 1, BLOCK=1024),
    scan_carry=_launch(4, 1, BLOCK=1024),
    finish=_launch(4, 1, BLOCK_S=256),
)

# ---- GPU configurations (sm_80 / sm_90) ----

# LM head, 16-bit operands (tensor cores). 128 x 128 logit tiles with a 64-wide H slice: per
# pipeline stage (128 + 128) x 64 x 2 B = 32 KB of shared memory, 3 stages = 96 KB (fits both
# sm_80 and sm_90, one program per SM); intensity against W = BLOCK_M FLOP per byte.
_LSE16_BIG = _launch(8, 3, BLOCK_M=128, BLOCK_V=128, BLOCK_H=64)
_LSE16_SMALL = _launch(8, 3, BLOCK_M=64, BLOCK_V=128, BLOCK_H=64)  # more programs for small M
# fp32 operands: IEEE fp32 FMA dot (no tensor cores); smaller tiles keep the operands and the
# accumulator in registers.
_LSE32 = _launch(4, 2, BLOCK_M=64, BLOCK_V=64, BLOCK_H=32)
_GRAD16 = _launch(8, 3, BLOCK_M=64, BLOCK_V=128, BLOCK_H=64)
_GRAD32 = _launch(4, 2, BLOCK_M=32, BLOCK_V=64, BLOCK_H=32)
# Backward GEMMs (fp32 out). GROUP_P = 8 row tiles per launch group (L2 reuse, see
# logprobs.matmul_kernel).
_MM16_BIG = _launch(8, 3, BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64, GROUP_P=8)
_MM16_SMALL = _launch(4, 4, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=64, GROUP_P=8)
_MM32 = _launch(4, 3, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32, GROUP_P=8)

# CSR tile kernels ([BLOCK_S, BLOCK_T] tiles along segments): BLOCK_T by the mean segment
# length (short steps waste fewer masked lanes with 32, long ones coalesce 128 x 4 B = 512 B
# per row); tile elements fixed per kernel (segment reduce: 2048 = 8 fp32 per thread of 8
# warps; step loss: 512 = 4 per thread of 4 warps, it keeps 9 tile accumulators: 1024 spilled
# on sm_80). When the grid would leave SMs idle, BLOCK_S shrinks 4x (at least 2).
_SHORT_SEGMENT = 32  # mean segment length up to which BLOCK_T = 32, else 128
_SEGMENT_ELEMS = 2048
_LOSS_ELEMS = 512
# Trajectory pass of the step loss ([BLOCK_B trajectories, BLOCK_K steps] tiles over the O(S)
# per-step table, no token): agentic trajectories hold a few to ~100 steps, so BLOCK_K = 8 up
# to 8 steps per trajectory on average, else 32; 256 elements = 2 per thread of 4 warps (the
# unit terms keep ~10 live [BLOCK_B, BLOCK_K] values); BLOCK_B shrinks 4x for small grids.
_SHORT_TRAJ = 8
_TRAJ_ELEMS = 256
_GPU_FIXED = dict(
    elementwise=_launch(8, 1, BLOCK=1024),  # 4 elements per thread
    scan=_launch(4, 1, BLOCK=1024),
    scan_carry=_launch(4, 1, BLOCK=1024),
    finish=_launch(8, 1, BLOCK_S=256),  # one program: 3 [256, 16] fp32 tiles, 256 threads
)


def _csr_tile(gpu: Gpu, num_segments: int, num_entries: int, elems: int, warps: int) -> Launch:
    block_t = 32 if num_entries <= _SHORT_SEGMENT * max(num_segments, 1) else 128
    block_s = elems // block_t
    if triton.cdiv(num_segments, block_s) < gpu.num_sms:  # fewer programs than SMs
        block_s = max(block_s // 4, 2)
    return _launch(warps, 1, BLOCK_S=block_s, BLOCK_T=block_t)


def lse_fwd(gpu: Gpu | None, num_rows: int, sixteen_bit: bool) -> Launch:
    """``lse_fwd_kernel`` (one program per BLOCK_M rows streams all of W). ``sixteen_bit``:
    hidden and weight are both bf16 (or both fp16): tensor-core tiles."""
    if gpu is None:
        return _CPU["lse_fwd"]
    if not sixteen_bit:
        return _LSE32
    return _LSE16_BIG if triton.cdiv(num_rows, 128) >= gpu.num_sms else _LSE16_SMALL


def logit_grad(gpu: Gpu | None, sixteen_bit: bool) -> Launch:
    """``logit_grad_kernel`` (one program per BLOCK_V vocabulary entries walks the chunk)."""
    if gpu is None:
        return _CPU["logit_grad"]
    return _GRAD16 if sixteen_bit else _GRAD32


def matmul(gpu: Gpu | None, size_p: int, size_q: int, sixteen_bit: bool) -> Launch:
    """``matmul_kernel`` for a [size_p, size_q] output."""
    if gpu is None:
        return _CPU["matmul"]
    if not sixteen_bit:
        return _MM32
    big_tiles = triton.cdiv(size_p, 128) * triton.cdiv(size_q, 128)
    return _MM16_BIG if big_tiles >= gpu.num_sms else _MM16_SMALL


def segment_reduce(gpu: Gpu | None, num_segments: int, num_entries: int) -> Launch:
    """``segment_reduce_kernel`` over S segments holding A entries."""
    if gpu is None:
        return _CPU["segment_reduce"]
    return _csr_tile(gpu, num_segments, num_entries, _SEGMENT_ELEMS, 8)


def step_loss(gpu: Gpu | None, num_steps: int, num_tokens: int) -> Launch:
    """``policy_fwd_kernel`` / ``policy_bwd_kernel`` over S steps holding A action tokens."""
    if gpu is None:
        return _CPU["step_loss"]
    return _csr_tile(gpu, num_steps, num_tokens, _LOSS_ELEMS, 4)


def step_loss_traj(gpu: Gpu | None, num_trajs: int, num_steps: int) -> Launch:
    """``policy_traj_kernel`` over B trajectories holding S steps."""
    if gpu is None:
        return _CPU["step_loss_traj"]
    block_k = 8 if num_steps <= _SHORT_TRAJ * max(num_trajs, 1) else 32
    block_b = _TRAJ_ELEMS // block_k
    if triton.cdiv(num_trajs, block_b) < gpu.num_sms:  # fewer programs than SMs
        block_b = max(block_b // 4, 2)
    return _launch(4, 1, BLOCK_B=block_b, BLOCK_K=block_k)


def fixed(gpu: Gpu | None, family: str) -> Launch:
    """Shape-independent kernels: ``elementwise`` (segment broadcast),
    ``scan`` (scan aggregate / apply), ``scan_carry``, ``finish`` (policy finishing kernel)."""
    return (_CPU if gpu is None else _GPU_FIXED)[family]


def gpu_launches() -> dict[str, list[Launch]]:
    """Every GPU launch configuration the table can return, per kernel family (for the compile
    and interpreter tests: nothing else may reach a GPU)."""
    csr = [
        (num_segments, num_entries)
        for num_segments in (1, 1 << 20)  # few programs / many
        for num_entries in (num_segments, 1024 * num_segments)  # short / long segments
    ]
    sms = Gpu(90, 132)
    out = dict(
        lse_fwd16=[lse_fwd(sms, m, True) for m in (1, 1 << 20)],
        lse_fwd32=[lse_fwd(sms, 1, False)],
        logit_grad16=[logit_grad(sms, True)],
        logit_grad32=[logit_grad(sms, False)],
        matmul16=[matmul(sms, p, p, True) for p in (1, 1 << 16)],
        matmul32=[matmul(sms, 1, 1, False)],
        segment_reduce=[segment_reduce(sms, s, a) for s, a in csr],
        step_loss=[step_loss(sms, s, a) for s, a in csr],
        step_loss_traj=[step_loss_traj(sms, b, s) for b, s in csr],
        **{family: [launch] for family, launch in _GPU_FIXED.items()},
    )
    return {family: list(dict.fromkeys(launches)) for family, launches in out.items()}
