"""FSDP2 parameter sharding for the data-parallel trainer (``--shard fsdp``, the default under
``torchrun``; see :mod:`steppo_fast.trainer.comm` for the data-parallel part).

Two copies of the trainable models live on each rank:

- *training* (sharded): the policy and the critic sit under one FSDP root, :class:`TrainRoot`,
  whose forward is one micro-batch forward (action log-probs, entropies, critic values). Every
  decoder layer (the classes in the model's ``_no_split_modules``) is its own FSDP unit: its
  parameters are all-gathered for its forward and backward and resharded after; its gradients
  are reduce-scattered. The remaining parameters (embeddings, final norm, LM head, value head)
  form the root unit. Gradients are reduce-scattered as **sums** (divide factor 1, sum-only
  collectives, which gloo needs): each rank's loss is already its share of the global mean,
  exactly as the replicated path's summed all-reduce. Parameters, gradients and AdamW moments
  are held as ``1/W`` shards (``DTensor``).
- *inference* (full, no autograd): a plain copy of the policy and critic that rollouts, the
  old-log-prob and value pass, evaluation, checkpoints and export use. It is refreshed from the
  shards after each update (:meth:`ShardedModels.refresh`: one all-gather per parameter), like
  the weight sync into verl's rollout engine. These passes run a data-dependent number of
  forwards per rank (KV-cached decoding until the rank's longest episode ends, length buckets),
  which FSDP's per-forward collectives cannot allow.

Lock step: FSDP issues collectives in every forward and backward, so every rank must run the
same number of them. The training forward is one padded bucket per micro-batch
(``bucket_tokens=None``), and a rank with fewer micro-batches in a mini-batch than the busiest
rank runs zero-loss dummy micro-batches (:meth:`ShardedModels.dummy_backward`), which add exact
zeros to the gradients.

Memory per rank (P = bytes of the trainable parameters in fp32, P_ref = the frozen KL
reference, a copy of the policy only): held ``4 P / W`` (parameters, gradients, two AdamW
moments) + the full inference copy ``P`` + ``P_ref``, against ``4 P + P_ref`` replicated (whose
flat gradient all-reduce buffer adds a transient ``P``). A checkpoint gathers the full AdamW
moments on rank 0 only (``+2 P`` there, one tensor at a time elsewhere). Measured in
bench/bench_fsdp_memory.py and docs/scaling.md (CPU: glibc's default allocator keeps FSDP's
freed per-layer buffers resident; set ``MALLOC_MMAP_THRESHOLD_``).

Devices: the FSDP mesh is the default process group on the device the models already sit on
(``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo; :func:`default_mesh`), never FSDP's own
default (which picks CUDA whenever it is available, even for a ``--device cpu`` run). The
dummy batch, the inference copy and the shards live on that device too.

Checkpoints hold full tensors in the unsharded format (:func:`full_optimizer_state`,
:meth:`ShardedModels.load_full`), so a run resumes under any number of ranks, sharded or not.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import StepBatch
from .checkpoint import load_states
from .modeling import decoder_layers
from .update import ForwardOut, Models, forward


class TrainRoot(nn.Module):
    """The FSDP root of the training models: ``forward`` = one micro-batch forward.

    Returns plain tensors (``logp [A]``, ``entropy [A]``, ``values [S or A]``, empty when there
    is no critic) so FSDP sees every output that backward starts from."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None, forward_mode: str, impl: str):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.forward_mode, self.impl = forward_mode, impl

    def forward(self, batch, masks, temperature: float, value_units: str | None):
        models = Models(
            self.policy,
            self.critic,
            None,
            forward_mode=self.forward_mode,
            impl=self.impl,
            bucket_tokens=None,  # exactly one forward per backbone and micro-batch
        )
        out = forward(models, batch, masks, temperature, value_units)
        values = out.values if out.values is not None else out.logp.new_zeros(0)
        # FSDP hooks backward on the outputs and warns on views (an in-place op on a view would
        # drop its hook); these are [A] / [S] vectors, so the copies cost nothing
        return tuple(t if t._base is None else t.clone() for t in (out.logp, out.entropy, values))


def dummy_batch(device=None) -> StepBatch:
    """A one-step, one-action batch (token id 0 everywhere) for lock-step dummy forwards, on
    ``device`` (default CPU)."""
    step = {"prompt_ids": [0, 0], "action_ids": [0], "reward": 0.0, "logprobs": [0.0]}
    traj = {"steps": [step], "terminated": True, "group": 0}
    return StepBatch.from_trajectories([traj], device=device)


def default_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over the default process group, of ``device``'s type."""
    return DeviceMesh.from_group(dist.group.WORLD, torch.device(device).type)


def meta_copy(module: nn.Module | None) -> nn.Module | None:
    """A deep copy of ``module`` whose parameters and buffers are ``meta`` tensors (no data is
    copied; tied parameters stay tied): allocate it with :func:`materialize` and fill it."""
    if module is None:
        return None
    memo = {}
    for t in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(t, device="meta")
        is_param = isinstance(t, nn.Parameter)
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if is_param else meta
    return copy.deepcopy(module, memo)


def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to_empty(device=device)`` (uninitialised storage for a :func:`meta_copy`) that
    keeps tied parameters tied (``to_empty`` gives each owner its own tensor)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((owner, name))
    module.to_empty(device=device)
    for places in owners.values():
        first, name = places[0]
        for owner, alias in places[1:]:
            owner._parameters[alias] = first._parameters[name]
    return module


class ShardedModels:
    """The sharded training modules of ``models`` and their full inference copy.

    Shards ``models.policy`` and ``models.critic`` **in place** (their parameters become
    ``DTensor`` shards: build the optimizer afterwards); ``models.reference`` stays a full,
    frozen module shared with :attr:`inference`. Every rank must hold the same parameters when
    this is called (broadcast first). ``mesh`` defaults to :func:`default_mesh` of the policy's
    device."""

    def __init__(self, models: Models, mesh: DeviceMesh | None = None):
        self.device = next(models.policy.parameters()).device
        mesh = default_mesh(self.device) if mesh is None else mesh

        # the inference copy is built without data first (meta tensors) and filled from the
        # shards afterwards: the full modules and their copy never coexist (setup peak P + P/W,
        # not 2 P)
        self.inference = Models(
            meta_copy(models.policy),
            meta_copy(models.critic),
            models.reference,
            forward_mode=models.forward_mode,
            impl=models.impl,
        )
        self.root = TrainRoot(models.policy, models.critic, models.forward_mode, models.impl)
        for model in (models.policy, None if models.critic is None else models.critic.backbone):
            if model is not None:
                for layer in decoder_layers(model):
                    fully_shard(layer, mesh=mesh)
        fully_shard(self.root, mesh=mesh)
        for module in self.root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum over ranks, not mean
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self._dummy = dummy_batch(self.device)
        with torch.no_grad():
            for name in ("policy", "critic"):
                sharded, full = getattr(self.root, name), getattr(self.inference, name)
                if sharded is not None:
                    materialize(full, self.device).eval().requires_grad_(False)
                    for src, dst in zip(sharded.buffers(), full.buffers(), strict=True):
                        dst.copy_(src)  # buffers are not sharded (e.g. rotary inv_freq)
        self.refresh()

    # ------------------------------------------------------------------ training
    def forward(self, models, batch, masks, temperature: float, value_units: str | None):
        """:func:`steppo_fast.trainer.update.forward` on the sharded modules (``models`` is
        ignored: it is the signature ``ppo_update`` calls)."""
        logp, entropy, values = self.root(batch, masks, temperature, value_units)
        return ForwardOut(logp, entropy, values if value_units is not None else None)

    def dummy_backward(self, temperature: float, value_units: str | None) -> None:
        """One forward/backward whose loss is exactly 0: the same collectives as a real
        micro-batch, zero added to every gradient."""
        logp, _, values = self.root(self._dummy, None, temperature, value_units)
        (logp.sum() * 0.0 + values.sum() * 0.0).backward()

    def pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(sharded parameter, full inference parameter) of the policy then the critic."""
        out = []
        for name in ("policy", "critic"):
            sharded, full = getattr(self.root, name), getattr(self.inference, name)
            if sharded is not None:
                out += list(zip(sharded.parameters(), full.parameters(), strict=True))
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current shards into the full inference copy (all ranks, collective)."""
        for shard, full in self.pairs():
            full.copy_(shard.full_tensor() if isinstance(shard, DTensor) else shard)

    @torch.no_grad()
    def load_full(self, state: dict, path: str = "checkpoint.pt") -> None:
        """Load full ``policy`` / ``critic`` / ``reference`` state dicts (a checkpoint read from
        ``path``) into the inference copy and this rank's shards (local slicing, no
        communication)."""
        load_states(self.inference, state, path)
        for shard, full in self.pairs():
            if isinstance(shard, DTensor):
                local = distribute_tensor(
                    full, shard.device_mesh, shard.placements, src_data_rank=None
                )
                shard.to_local().copy_(local.to_local())
            else:
                shard.copy_(full)


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict | None:
    """``optimizer.state_dict()`` with every ``DTensor`` state gathered to a full tensor: the
    unsharded format. Collective: call on every rank. ``keep=False`` (the ranks that do
    not write the checkpoint) drops each gathered tensor at once and returns ``None``, so those
    ranks hold one full tensor at a time instead of both full AdamW moments."""
    sd = optimizer.state_dict()
    state = {}
    for i, st in sorted(sd["state"].items()):
        gathered = {}
        for k, v in st.items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            if keep:
                gathered[k] = full
            del full
        state[i] = gathered
    return {**sd, "state": state} if keep else None


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load an unsharded optimizer ``state_dict`` into an optimizer over ``DTensor`` shards:
    each state tensor shaped like its parameter is sliced like it (no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
            else v
            for k, v in st.items()
        }
    optimizer.load_state_dict({**sd, "state": state})
