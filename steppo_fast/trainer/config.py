"""Training configuration: one dataclass, overridden by a YAML file and then by CLI flags.

Precedence (lowest first): the dataclass defaults, the algorithm's defaults
(:data:`ALGO_DEFAULTS`, for fields left ``None``), a YAML file (``--config FILE``), CLI flags.
:func:`add_arguments` derives one ``--flag`` per field from the dataclass, so every field can be
set from the command line (``--clip-low 0.1``; booleans as ``--grammar`` / ``--no-grammar``).

The per-algorithm defaults are tuned for the built-in ``doors`` environment and a tiny
random-init model (large learning rates, wide clips). The StepPO paper's values (LLMs of 1.5B+
parameters, actor lr 1e-6) are kept beside them in :data:`PAPER_STEPPO` for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields

import torch
import yaml

ALGOS = ("steppo", "ppo", "grpo", "gigpo", "gspo")
CRITIC_ALGOS = ("steppo", "ppo")

# What each algorithm means here (see docs/trainer.md):
#   steppo: step GAE with a critic read at value_index, whitened over steps, one length-normalised
#           ratio per step (ratio_level="step"), every step weighs the same (agg="step-mean").
#   ppo:    token-level GAE over action tokens (critic at each action token's logit position),
#           whitened over tokens, one ratio per token, token-mean.
#   grpo:   group-normalised trajectory return, broadcast to steps, token ratios, token-mean.
#   gigpo:  GRPO episode advantage + anchor-state step advantage, token ratios, token-mean.
#   gspo:   group-normalised trajectory return, one length-normalised ratio per trajectory.
ALGO_DEFAULTS: dict[str, dict] = {
    "steppo": dict(
        ratio_level="step", agg="step-mean", clip_low=0.2, clip_high=0.2, gamma=1.0, lam=1.0
    ),
    "ppo": dict(
        ratio_level="token", agg="token-mean", clip_low=0.2, clip_high=0.2, gamma=1.0, lam=0.95
    ),
    "grpo": dict(
        ratio_level="token", agg="token-mean", clip_low=0.2, clip_high=0.2, gamma=1.0, lam=1.0
    ),
    "gigpo": dict(
        ratio_level="token", agg="token-mean", clip_low=0.2, clip_high=0.2, gamma=0.95, lam=1.0
    ),
    "gspo": dict(
        ratio_level="trajectory", agg="traj-mean", clip_low=0.2, clip_high=0.2, gamma=1.0, lam=1.0
    ),
}

# The StepPO paper's hyper-parameters (ALFWorld / WebShop scripts), for reference only.
PAPER_STEPPO = dict(
    clip_low=3e-4,
    clip_high=4e-4,
    gamma=1.0,
    lam=1.0,
    kl_type="k3",
    kl_coef=1e-3,
    lr=1e-6,
    critic_lr=1e-5,
)


@dataclass
class TrainConfig:
    """Every knob of ``steppo train`` (CLI flag = field name with dashes)."""

    # --- run
    algo: str = "steppo"  # steppo | ppo | grpo | gigpo | gspo
    env: str = "doors"  # a registered environment (steppo_fast.envs.env_names())
    model: str = "tiny"  # "tiny" (random init from a config) or a local HF model directory
    iters: int = 50  # training iterations (rollout + update)
    seed: int = 0  # seeds the model init, sampling and the training tasks
    out: str = ""  # run directory; "" = runs/<env>-<algo>-s<seed>
    resume: bool = False  # continue from <out>/checkpoint.pt
    threads: int = 1  # torch CPU threads (1 is fastest for tiny models on a busy machine)
    impl: str = "auto"  # backend of the steppo_fast ops: auto | torch | triton | cpp
    shard: str = "fsdp"  # under torchrun: fsdp (FSDP2 fully_shard) | none (replicated parameters)
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    # --- tiny model (model == "tiny")
    arch: str = "qwen2"  # qwen2 | llama
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    critic: str = "separate"  # separate (own backbone) | shared (value head on the policy)
    # --- rollout
    groups: int = 16  # tasks per iteration
    group_size: int = 4  # episodes per task (GRPO-style groups)
    temperature: float = 1.0
    grammar: bool = True  # constrained decoding with the env's action grammar
    max_action_tokens: int = 6  # cap on free-form actions (no grammar)
    layout: str = "auto"  # StepBatch layout: auto | merged | rows
    forward: str = "padded"  # training forward: padded (CPU) | packed (flash-attn varlen on GPU)
    # --- algorithm (None = the algorithm's default, ALGO_DEFAULTS)
    ratio_level: str | None = None
    agg: str | None = None
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float | None = None
    length_power: float = 1.0
    gamma: float | None = None
    lam: float | None = None
    kl_coef: float = 1e-3
    kl_type: str = "k3"
    value_clip: float | None = None
    vf_coef: float = 0.5  # value loss weight (shared critic only)
    # --- optimisation
    lr: float = 1e-3
    critic_lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 2  # PPO epochs over each batch
    minibatches: int = 2  # optimizer steps per epoch
    micro_batch_tokens: int = 8192  # token budget of one forward/backward
    # --- evaluation, logging, checkpoints
    eval_every: int = 5  # evaluate on held-out seeds every N iterations (0 = never)
    eval_episodes: int = 64
    eval_greedy: bool = True
    checkpoint_every: int = 10
    progress: bool = True  # tqdm bars
    plot: bool = True  # redraw curves.png
    extra: dict = field(default_factory=dict)  # free-form notes saved with the config

    # ------------------------------------------------------------------ derived
    def resolved(self) -> TrainConfig:
        """A copy with algorithm defaults filled in and ``out`` set; validated."""
        self.validate_choices()
        cfg = dataclasses.replace(self)
        for key, value in ALGO_DEFAULTS[cfg.algo].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if not cfg.out:
            cfg.out = os.path.join("runs", f"{cfg.env}-{cfg.algo}-s{cfg.seed}")
        cfg.validate_numbers()
        return cfg

    @property
    def uses_critic(self) -> bool:
        return self.algo in CRITIC_ALGOS

    def validate_choices(self) -> None:
        from ..envs import env_names

        checks = {
            "algo": (self.algo, ALGOS),
            "env": (self.env, tuple(env_names())),
            "arch": (self.arch, ("qwen2", "llama")),
            "impl": (self.impl, ("auto", "torch", "triton", "cpp")),
            "critic": (self.critic, ("separate", "shared")),
            "layout": (self.layout, ("auto", "merged", "rows")),
            "forward": (self.forward, ("padded", "packed")),
            "shard": (self.shard, ("fsdp", "none")),
            "kl_type": (self.kl_type, ("k1", "k2", "k3")),
            "ratio_level": (self.ratio_level, (None, "step", "token", "trajectory")),
            "agg": (self.agg, (None, "step-mean", "token-mean", "traj-mean")),
        }
        for name, (value, choices) in checks.items():
            if value not in choices:
                shown = ", ".join(str(c) for c in choices if c is not None)
                raise ValueError(f"--{name.replace('_', '-')}: {value!r} is not one of {shown}")
        check_device_spec(self.device)

    def validate_numbers(self) -> None:
        positive = (
            "iters",
            "groups",
            "group_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "epochs",
            "minibatches",
            "micro_batch_tokens",
            "max_action_tokens",
            "eval_episodes",
            "threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}"
                )
        if self.temperature <= 0:
            raise ValueError(f"--temperature: must be > 0, got {self.temperature}")
        if self.hidden_size % self.num_heads:
            raise ValueError("--hidden-size: must be a multiple of --num-heads")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("--gamma/--lam: must lie in [0, 1]")

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str) -> None:
        from .runfiles import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (or the defaults) with the keys of ``data`` replaced; unknown keys are an
        error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {', '.join(unknown)}")
        return dataclasses.replace(base or cls(), **data)

    @classmethod
    def from_yaml(cls, path: str, base: TrainConfig | None = None) -> TrainConfig:
        if not os.path.isfile(path):
            raise ValueError(f"--config: no such file {path!r}")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config: {path!r} must hold a mapping of field: value")
        return cls.from_dict(data, base)


# ---------------------------------------------------------------------- devices
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: str) -> None:
    """``ValueError`` naming ``--device`` unless ``spec`` is auto, cpu, cuda or cuda:N."""
    if not isinstance(spec, str) or not DEVICE_SPEC.fullmatch(spec):
        raise ValueError(f"--device: {spec!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` a ``--device`` value names (read when a run starts, not at import).

    - ``"auto"``: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``;
    - ``"cpu"``; ``"cuda"`` (the current CUDA device); ``"cuda:N"``;
    - ``local_rank`` (a torchrun rank's ``LOCAL_RANK``): a CUDA device is ``cuda:local_rank``
      (one GPU per rank); ``"cuda:N"`` is then a ``ValueError`` (ranks must not share a GPU).

    Asking for CUDA where it is not available, or for a device index that does not exist, is a
    ``ValueError`` naming ``--device``."""
    check_device_spec(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        raise ValueError(
            f"--device: {spec!r} needs CUDA, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, {built}); use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if local_rank is not None:
        if spec not in ("auto", "cuda"):
            raise ValueError(
                f"--device: {spec!r} under torchrun; give cuda or auto (rank r uses "
                "cuda:LOCAL_RANK)"
            )
        index = local_rank
    else:
        index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"--device: cuda:{index} does not exist ({count} CUDA devices)")
    return torch.device("cuda", index)


# ---------------------------------------------------------------------- CLI flags
def _field_type(f: dataclasses.Field):
    """(python type, optional?) of a dataclass field (annotations are strings here)."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per field; every default is ``argparse.SUPPRESS`` so only given flags appear
    in the namespace (they then override the YAML file and the defaults)."""
    for f in fields(TrainConfig):
        if f.name in skip or f.name == "extra":
            continue
        kind, optional = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"(default: {default})",
            )
        else:
            parser.add_argument(
                flag,
                type=_parse_optional(kind) if optional else kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=f"(default: {'algo default' if default is None else default})",
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- YAML (``args.config`` when set) <- the flags present in ``args``."""
    cfg = TrainConfig()
    if getattr(args, "config", None):
        cfg = TrainConfig.from_yaml(args.config, cfg)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_dict(given, cfg)
