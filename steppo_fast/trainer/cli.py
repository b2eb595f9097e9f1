"""The ``steppo`` command (also ``python -m steppo_fast.trainer``).

::

    steppo train [--algo steppo] [--env doors] [--model tiny|PATH] [--iters N] [--seed S]
                 [--out DIR] [--resume] [--config FILE.yaml] [--<any TrainConfig field> ...]
    steppo sft [--env quest] [--out DIR] [--demos N] [--steps K] [--noise-frac P]
               [--truncate-frac P] [--batch B]
               [--sft-lr LR] [--<model/env TrainConfig field> ...]   (then: train --init DIR/model)
    steppo eval RUN_DIR [--episodes N] [--sample] [--device cpu]
    steppo compare [--algos steppo,ppo,grpo,gigpo] [--seeds 5] [--seed-base 0]
                   [--lr-grid [ALGO=]LR,LR ...] [--critic-lr-ratio R] [--select eval-auc]
                   [--select-seeds K]
                   [--env quest] [--iters N] [--init DIR/model] [--out DIR]
                   [--<TrainConfig field but lr> ...]
    steppo compare --report-only --out DIR [--algos ...] [--select ...]

Errors a user can cause print one line ``steppo: error: ...``, never a traceback
(``STEPPO_DEBUG=1`` shows it): status 2 for a bad command line or config (a flag, a YAML key or
line, a value out of its field's range: :class:`~.fields.ConfigError`), status 1 for what goes
wrong while running (a missing model path or run directory, an environment that raises or
misbehaves, an unusable checkpoint, a full disk).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ALGOS, TrainConfig, add_arguments, config_from_args
from .fields import ConfigError, check_fields, field_type, flag_of, help_of, rule_of

# TrainConfig fields steppo sft has no use for (RL algorithm and run-loop knobs)
SFT_SKIP = ("algo", "iters", "resume", "critic", "critic_lr", "critic_warmup", "eval_every")


def _count(minimum: int):
    """argparse type: an integer >= ``minimum`` (else a usage error naming the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"steppo: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="steppo", description="StepPO reference trainer on built-in text environments"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a policy (default: StepPO on doors, tiny model)")
    train.add_argument("--config", metavar="FILE", help="YAML file of TrainConfig fields")
    add_arguments(train)

    sft = sub.add_parser("sft", help="behaviour-clone the env's scripted solver (warm start)")
    add_arguments(sft, skip=SFT_SKIP)
    add_sft_arguments(sft)

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on held-out seeds")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument(
        "--episodes", type=_count(1), default=200, help="held-out episodes, >= 1 (default: 200)"
    )
    ev.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ev.add_argument("--show", type=_count(0), default=1, help="print this many episode transcripts")
    ev.add_argument(
        "--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's)"
    )

    cmp_ = sub.add_parser(  # no abbreviations: --lr must not silently mean --lr-grid
        "compare",
        help="algorithms x lr grid x seeds on identical tasks and budgets",
        allow_abbrev=False,
    )
    cmp_.add_argument(
        "--algos",
        default=None,
        help="comma-separated algorithms (default: steppo,ppo,grpo,gigpo; with --report-only: "
        "every one found)",
    )
    cmp_.add_argument(
        "--seeds",
        type=_count(1),
        default=5,
        help="seeds per (algo, lr): runs B..B+N-1; >= 5 for claims (default: 5)",
    )
    cmp_.add_argument(
        "--seed-base", type=_count(0), default=0, help="first seed (default: 0): seeds B..B+N-1"
    )
    cmp_.add_argument(
        "--lr-grid",
        action="append",
        metavar="[ALGO=]LR,LR",
        help="policy learning rates: LR,LR for every algorithm, ALGO=LR,LR for one (repeatable; "
        "default: 3e-4,1e-3 for every algorithm)",
    )
    cmp_.add_argument(
        "--critic-lr-ratio",
        type=float,
        default=None,
        metavar="R",
        help="critic lr = R x the grid point's lr (default: --critic-lr, fixed over the grid)",
    )
    cmp_.add_argument(
        "--select",
        choices=("eval-auc", "train-auc"),
        default="eval-auc",
        help="best grid point by mean held-out AUC (default) or training-success AUC",
    )
    cmp_.add_argument(
        "--select-seeds",
        type=_count(0),
        default=0,
        metavar="K",
        help="the first K seeds only select the grid points, the other seeds are reported "
        "(default: 0, select and report on all seeds)",
    )
    cmp_.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild results.md and curves.png from the run folders in --out",
    )
    cmp_.add_argument("--config", metavar="FILE", help="YAML file of TrainConfig fields")
    add_arguments(cmp_, skip=("algo", "out", "resume", "seed", "lr"))
    cmp_.add_argument("--out", default="", help="directory (default: runs/compare-<env>)")
    return parser


def _cmd_train(args) -> int:
    cfg = config_from_args(args)
    if cfg.resume:
        cfg = _resume_config(args, cfg)
    from .comm import init_from_env
    from .loop import Trainer

    # a torchrun launch (WORLD_SIZE > 1): data-parallel ranks, one device each (NCCL on CUDA);
    # else one process
    comm = init_from_env(cfg.device)
    trainer = Trainer(cfg, comm)
    say = print if trainer.is_main else (lambda *a, **k: None)
    ranks = f" on {comm.world} ranks" if comm.world > 1 else ""
    say(
        f"steppo train: {trainer.cfg.algo} on {trainer.cfg.env}, model {trainer.cfg.model}, "
        f"{trainer.cfg.iters} iterations{ranks} -> {trainer.out}"
    )
    trainer.train()
    comm.close()
    evals = [r for r in trainer.rows if "eval_success_rate" in r]
    result = (
        f"held-out success {evals[-1]['eval_success_rate']:.2f} at iteration {evals[-1]['iter']}"
        if evals
        else "not evaluated: --eval-every 0"
    )
    plot = "curves.png, " if trainer.cfg.plot else ""
    files = f"metrics.jsonl, {plot}checkpoint.pt, model/"
    say(f"done: {trainer.out}/{files} ({result})")
    return 0


def _resume_config(args, cfg: TrainConfig) -> TrainConfig:
    """On --resume, the run's saved config.yaml is the base; flags given now override it."""
    run_dir = cfg.out or TrainConfig(**{**cfg.to_dict(), "out": ""}).resolved().out
    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved):
        raise ConfigError(f"--resume: no run at {run_dir} (missing config.yaml)")
    base = TrainConfig.from_yaml(saved)
    given = {k: v for k, v in vars(args).items() if k in cfg.to_dict()}
    return TrainConfig.from_dict({**given, "resume": True, "out": run_dir}, base)


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~.sft.SFTConfig` field (checked by :func:`_cmd_sft`)."""
    import dataclasses

    from .sft import SFTConfig

    for f in dataclasses.fields(SFTConfig):
        kind, _ = field_type(SFTConfig, f.name)
        text = f"{help_of(f)}; {rule_of(f).describe()}; default: {f.default}"
        parser.add_argument(
            flag_of(f.name),
            type=kind,
            default=argparse.SUPPRESS,
            metavar=kind.__name__.upper(),
            help=text,
        )


def _cmd_sft(args) -> int:
    import dataclasses

    from .sft import SFTConfig, run_sft

    names = [f.name for f in dataclasses.fields(SFTConfig)]
    sft = SFTConfig(**check_fields(SFTConfig, {k: getattr(args, k) for k in names if k in args}))
    cfg = config_from_args(args)
    if "env" not in vars(args) and not getattr(args, "config", None):
        cfg.env = "quest"
    if not cfg.out:
        cfg.out = os.path.join("runs", f"{cfg.env}-sft-s{cfg.seed}")
    print(f"steppo sft: {cfg.env}, {sft.demos} demonstrations, {sft.steps} steps -> {cfg.out}")
    summary, _ = run_sft(cfg, sft)
    print(
        f"done: {cfg.out}/model, sft.json (demonstration NLL {summary['demo_nll_before']:.3f} -> "
        f"{summary['demo_nll_after']:.3f}); start RL with: steppo train --init {cfg.out}/model"
    )
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_run

    evaluate_run(
        args.run_dir,
        episodes=args.episodes,
        greedy=not args.sample,
        show=args.show,
        device=args.device,
    )
    return 0


def _cmd_compare(args) -> int:
    from .compare import parse_lr_grid, run_compare
    from .compare_report import write_report

    algos = None
    if args.algos is not None:
        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        bad = [a for a in algos if a not in ALGOS]
        if bad or not algos:
            raise ConfigError(f"--algos: {','.join(bad) or '(empty)'} not in {', '.join(ALGOS)}")
    if args.report_only:
        if not args.out:
            raise ConfigError("--report-only: give the comparison's --out DIR")
        write_report(args.out, algos=algos, select=args.select, select_seeds=args.select_seeds)
        return 0
    algos = algos or ["steppo", "ppo", "grpo", "gigpo"]
    if args.critic_lr_ratio is not None and not 0 < args.critic_lr_ratio < float("inf"):
        raise ConfigError(f"--critic-lr-ratio: must be > 0 and finite, got {args.critic_lr_ratio}")
    base = config_from_args(args)
    if args.config:
        from .fields import read_yaml_mapping

        data, lines = read_yaml_mapping(args.config)
        if "lr" in data:  # the grid would override it: refused rather than ignored
            raise ConfigError(
                f"{args.config}:{lines.get('lr', '?')}: lr: compare takes the policy learning "
                "rates from --lr-grid"
            )
    if "env" not in vars(args) and not getattr(args, "config", None):
        base.env = "quest"
    run_compare(
        base,
        algos,
        args.seeds,
        args.out,
        seed_base=args.seed_base,
        lr_grid=parse_lr_grid(args.lr_grid, algos),
        critic_lr_ratio=args.critic_lr_ratio,
        select=args.select,
        select_seeds=args.select_seeds,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steppo`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "train": _cmd_train,
        "sft": _cmd_sft,
        "eval": _cmd_eval,
        "compare": _cmd_compare,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("steppo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users; STEPPO_DEBUG=1 for the traceback
        if os.environ.get("STEPPO_DEBUG") == "1":
            raise
        from ..envs import EnvError
        from .runfiles import RunFileError

        plain = isinstance(e, (ValueError, EnvError, RunFileError))
        kind = "" if plain else f"{type(e).__name__}: "
        print(f"steppo: error: {kind}{e}".splitlines()[0], file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
