"""Training configuration: one dataclass, overridden by a YAML file and then by CLI flags.

Precedence (lowest first): the dataclass defaults, the algorithm's defaults
(:data:`ALGO_DEFAULTS`, for fields left ``None``), a YAML file (``--config FILE``), CLI flags.
:func:`add_arguments` derives one ``--flag`` per field from the dataclass, so every field can be
set from the command line (``--clip-low 0.1``; booleans as ``--grammar`` / ``--no-grammar``).

Every value is checked when it enters, against its field's row of the field table (the
dataclass fields declared with :func:`~.fields.knob`: type from the annotation, help text,
range or choices): YAML keys (errors name ``FILE:LINE: key``), flags (``--flag``) and
``TrainConfig(...)`` in code (:meth:`TrainConfig.resolved`). A new field is one line, e.g.
``grad_checkpointing: bool = knob(False, "recompute activations in the backward")``.

The per-algorithm defaults are tuned for the built-in ``doors`` environment and a tiny
random-init model (large learning rates, wide clips). The StepPO paper's values (LLMs of 1.5B+
parameters, actor lr 1e-6) are kept beside them in :data:`PAPER_STEPPO` for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, fields

import torch
import yaml

from .fields import (
    ConfigError,
    check_fields,
    check_value,
    field_type,
    flag_of,
    help_of,
    knob,
    read_yaml_mapping,
    rule_of,
)

ALGOS = ("steppo", "ppo", "grpo", "gigpo", "gspo")
CRITIC_ALGOS = ("steppo", "ppo")
IMPLS = ("auto", "torch", "triton", "cpp")
SHARDS = ("fsdp", "none")
SEEDS = 1 << 16  # run seeds 0 .. SEEDS-1 own disjoint training tasks (loop.train_seed)
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def _env_names() -> list[str]:
    from ..envs import env_names

    return env_names()


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
    """Every knob of ``steppo train`` (CLI flag = field name with dashes).

    Each field is one row of the field table (:func:`~.fields.knob`: type from the annotation,
    help, range or choices); YAML keys, flags and constructor arguments are checked against it
    (:meth:`validate`)."""

    # --- run
    algo: str = knob("steppo", "algorithm", choices=ALGOS)
    env: str = knob("doors", "a registered environment", choices=_env_names)
    model: str = knob(
        "tiny",
        '"tiny" (random init from a config) or a local HF model directory',
        check=bool,
        text="a non-empty string",
    )
    init: str = knob(
        "",
        "start the policy (and a separate critic's backbone; value head zero) from this model "
        'folder, e.g. the RUN_DIR/model of steppo sft; "" = --model as built',
    )
    iters: int = knob(50, "training iterations (rollout + update)", ge=1)
    seed: int = knob(
        0,
        "seeds the model init, sampling and the training tasks (each seed has its own tasks)",
        ge=0,
        lt=SEEDS,
    )
    out: str = knob("", 'run directory; "" = runs/<env>-<algo>-s<seed>')
    resume: bool = knob(False, "continue from <out>/checkpoint.pt")
    threads: int = knob(1, "torch CPU threads (1 is fastest for tiny models)", ge=1)
    impl: str = knob("auto", "backend of the steppo_fast ops", choices=IMPLS)
    shard: str = knob(
        "fsdp", "under torchrun: fsdp (FSDP2 fully_shard) | none (replicas)", choices=SHARDS
    )
    device: str = knob(
        "auto",
        "auto (cuda if available, else cpu) | cpu | cuda | cuda:N",
        check=lambda s: DEVICE_SPEC.fullmatch(s) is not None,
        text="auto, cpu, cuda or cuda:N",
    )
    # --- tiny model (model == "tiny")
    arch: str = knob("qwen2", "tiny model architecture", choices=("qwen2", "llama"))
    hidden_size: int = knob(64, "tiny model width", ge=1)
    num_layers: int = knob(2, "tiny model layers", ge=1)
    num_heads: int = knob(4, "tiny model attention heads", ge=1)
    critic: str = knob(
        "separate",
        "separate (own backbone) | shared (value head on the policy)",
        choices=("separate", "shared"),
    )
    # --- rollout
    groups: int = knob(16, "tasks per iteration", ge=1)
    group_size: int = knob(4, "episodes per task (GRPO-style groups)", ge=1)
    temperature: float = knob(1.0, "sampling temperature", gt=0)
    grammar: bool = knob(True, "constrained decoding with the env's action grammar")
    max_action_tokens: int = knob(6, "cap on free-form actions (no grammar)", ge=1)
    layout: str = knob("auto", "StepBatch layout", choices=("auto", "merged", "rows"))
    forward: str = knob(
        "padded",
        "training forward: padded (CPU) | packed (one row, varlen attention)",
        choices=("padded", "packed"),
    )
    # --- memory levers (docs/trainer.md, "Long contexts")
    grad_checkpointing: bool = knob(
        False, "recompute decoder layers in backward (policy, critic, FSDP units)"
    )
    dtype: str = knob(
        "fp32",
        "fp32 | bf16 (autocast compute; fp32 weights and optimizer state)",
        choices=("fp32", "bf16"),
    )
    # --- algorithm (None = the algorithm's default, ALGO_DEFAULTS)
    ratio_level: str | None = knob(
        None, "ratio per step | token | trajectory", choices=("step", "token", "trajectory")
    )
    agg: str | None = knob(
        None, "loss aggregation", choices=("step-mean", "token-mean", "traj-mean")
    )
    clip_low: float | None = knob(None, "PPO clip below 1", ge=0, lt=1)
    clip_high: float | None = knob(None, "PPO clip above 1", ge=0)
    dual_clip: float | None = knob(None, "dual clip for negative advantages (none = off)", gt=1)
    length_power: float = knob(1.0, "step ratio = sum log-ratio / n ** length_power", ge=0)
    gamma: float | None = knob(None, "discount", ge=0, le=1)
    lam: float | None = knob(None, "GAE lambda", ge=0, le=1)
    kl_coef: float = knob(1e-3, "KL-to-reference loss weight (0 = no reference model)", ge=0)
    kl_type: str = knob("k3", "KL estimator", choices=("k1", "k2", "k3"))
    value_clip: float | None = knob(None, "value loss clip (none = off)", ge=0)
    vf_coef: float = knob(0.5, "value loss weight (shared critic only)", ge=0)
    # --- optimisation
    lr: float = knob(1e-3, "policy learning rate (AdamW)", ge=0)
    critic_lr: float = knob(1e-3, "critic learning rate (AdamW)", ge=0)
    critic_warmup: int = knob(
        0, "first N iterations update only the critic (critic algorithms)", ge=0
    )
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = knob(1.0, "gradient norm clip (0 = off)", ge=0)
    epochs: int = knob(2, "PPO epochs over each batch", ge=1)
    minibatches: int = knob(2, "optimizer steps per epoch", ge=1)
    micro_batch_tokens: int = knob(8192, "token budget of one forward/backward", ge=1)
    # --- evaluation, logging, checkpoints
    eval_every: int = knob(5, "evaluate on held-out seeds every N iterations (0 = never)", ge=0)
    eval_episodes: int = knob(64, "held-out episodes per evaluation", ge=1)
    eval_greedy: bool = knob(True, "greedy decoding in evaluation")
    checkpoint_every: int = knob(10, "write checkpoint.pt every N iterations (and the last)", ge=1)
    progress: bool = knob(True, "tqdm bars")
    plot: bool = knob(True, "redraw curves.png")
    extra: dict = knob({}, "free-form notes saved with the config")

    # ------------------------------------------------------------------ derived
    def resolved(self) -> TrainConfig:
        """A copy with algorithm defaults filled in and ``out`` set; validated."""
        cfg = dataclasses.replace(self)
        cfg.validate()
        for key, value in ALGO_DEFAULTS[cfg.algo].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if not cfg.out:
            cfg.out = os.path.join("runs", f"{cfg.env}-{cfg.algo}-s{cfg.seed}")
        if cfg.critic_warmup and not cfg.uses_critic:
            raise ConfigError(
                f"--critic-warmup: needs an algorithm with a critic ({', '.join(CRITIC_ALGOS)}), "
                f"got {cfg.critic_warmup} with --algo {cfg.algo}"
            )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(
                f"--hidden-size: must be a multiple of --num-heads ({cfg.num_heads}), "
                f"got {cfg.hidden_size}"
            )
        return cfg

    @property
    def uses_critic(self) -> bool:
        return self.algo in CRITIC_ALGOS

    def validate(self) -> None:
        """Check every field against its rule (type, range, choices; the field table), in
        place (an integer in a float field becomes a float). :class:`~.fields.ConfigError`
        naming the ``--flag``."""
        for f in fields(self):
            value = check_value(type(self), f.name, getattr(self, f.name), flag_of(f.name))
            setattr(self, f.name, value)

    validate_choices = validate  # the name earlier releases used

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str) -> None:
        from .runfiles import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict, base: TrainConfig | None = None, where=flag_of) -> TrainConfig:
        """``base`` (or the defaults) with the keys of ``data`` replaced, each checked against
        its field's rule; an unknown key is an error naming it. ``where(key)`` names a key's
        source in errors (default: its ``--flag``)."""
        return dataclasses.replace(base or cls(), **check_fields(cls, data, where))

    @classmethod
    def from_yaml(cls, path: str, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (or the defaults) overridden by the mapping in YAML file ``path``; errors
        name ``path:LINE: key``."""
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        data, lines = read_yaml_mapping(path)
        return cls.from_dict(data, base, where=lambda k: f"{path}:{lines.get(k, '?')}: {k}")


# ---------------------------------------------------------------------- devices
def check_device_spec(spec: str) -> None:
    """``ValueError`` naming ``--device`` unless ``spec`` is auto, cpu, cuda or cuda:N."""
    if not isinstance(spec, str) or not DEVICE_SPEC.fullmatch(spec):
        raise ConfigError(f"--device: {spec!r} is not one of auto, cpu, cuda, cuda:N")


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
def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per field, its help from the field table; every default is
    ``argparse.SUPPRESS`` so only given flags appear in the namespace (they then override the
    YAML file and the defaults; :func:`config_from_args` checks them)."""
    for f in fields(TrainConfig):
        if f.name in skip or f.name == "extra":
            continue
        kind, optional = field_type(TrainConfig, f.name)
        default = "algo default" if f.default is None else f.default
        rule = rule_of(f).describe() if not callable(rule_of(f).choices) else ""
        text = "; ".join(x for x in (help_of(f), rule, f"default: {default}") if x)
        if kind is bool:
            parser.add_argument(
                flag_of(f.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            parser.add_argument(
                flag_of(f.name),
                type=_parse_optional(kind) if optional else kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=text.replace("%", "%%"),
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- YAML (``args.config`` when set) <- the flags present in ``args``, every
    value checked against its field's rule."""
    cfg = TrainConfig()
    if getattr(args, "config", None):
        cfg = TrainConfig.from_yaml(args.config, cfg)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_dict(given, cfg)
