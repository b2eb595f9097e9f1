"""``steppo compare``: algorithms x learning-rate grid x seeds on identical tasks and budgets.

Protocol (:func:`run_compare`):

- Every run has the same config except ``algo``, ``lr`` (the grid point), ``critic_lr``
  (critic algorithms only: fixed ``--critic-lr``, or ``--critic-lr-ratio R`` x ``lr``) and
  ``seed``. A run's training tasks are ``train_seed(seed, iteration, group)`` (seed only: the
  same tasks for every algorithm and learning rate), its initial weights are seeded by ``seed``
  alone (or are the ``--init`` folder for every run), and the held-out tasks are the same
  fixed seeds for every run.
- Seeds ``seed_base .. seed_base + seeds - 1``; the grid is per algorithm (:func:`parse_lr_grid`,
  default :data:`DEFAULT_LR_GRID` for every algorithm).
- One directory per run, ``<out>/<algo>-lr<lr>-s<seed>/`` (:func:`run_dir_name`), run one
  after another: a finished run is reused, an interrupted one resumed from its checkpoint, and
  a folder written with another config (other than :data:`FREE_FIELDS`) is refused with a
  one-line :class:`~.fields.ConfigError` naming the folder and the first differing field.
- Then :func:`~.compare_report.write_report` builds results.md and curves.png from the run
  folders alone (``steppo compare --report-only`` does only that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os

from .checkpoint import checkpoint_iteration
from .compare_report import FREE_FIELDS, machine_info, write_report
from .config import ALGOS, SEEDS, TrainConfig
from .fields import ConfigError, flag_of
from .loop import Trainer
from .runfiles import atomic_write_text, read_metrics

DEFAULT_LR_GRID = (3e-4, 1e-3)
SELECT = ("eval-auc", "train-auc")
RUN_RECORD = "compare_run.json"
LOCK = ".compare-lock"  # holds the pid of the compare process training the run


def run_dir_name(algo: str, lr: float, seed: int) -> str:
    """``<algo>-lr<lr>-s<seed>``, the learning rate as Python's shortest repr (``0.0003``)."""
    return f"{algo}-lr{float(lr)!r}-s{seed}"


def parse_lr_grid(items: list[str] | None, algos: list[str]) -> dict[str, list[float]]:
    """``--lr-grid`` values -> ``{algo: [lr, ...]}``. An item ``LR,LR,...`` sets the grid of
    every algorithm, ``ALGO=LR,LR,...`` one algorithm's (applied after). Errors name
    ``--lr-grid``, the item and the rule (a positive finite number, no repeated rate, a known
    algorithm of ``--algos``, each target given once)."""
    grid = {a: list(DEFAULT_LR_GRID) for a in algos}
    items = items or []
    given: set[str] = set()
    for item in sorted(items, key=lambda s: "=" in s):  # the all-algorithm items first
        name, _, text = item.rpartition("=")
        name = name.strip()
        if name in given:
            whose = f"{name}'s grid" if name else "the grid of every algorithm"
            raise ConfigError(f"--lr-grid: {item!r}: {whose} is given twice")
        given.add(name)
        if name and name not in algos:
            where = "not in --algos" if name in ALGOS else f"not an algorithm ({', '.join(ALGOS)})"
            raise ConfigError(f"--lr-grid: {item!r}: {name} is {where}")
        lrs = []
        for k, part in enumerate(text.split(",")):
            try:
                lr = float(part)
            except ValueError:
                raise ConfigError(
                    f"--lr-grid: {item!r}: entry {k} ({part.strip()!r}) is not a number"
                ) from None
            if not (lr > 0 and lr < float("inf")):
                raise ConfigError(f"--lr-grid: {item!r}: entry {k} must be > 0 and finite")
            if lr in lrs:
                raise ConfigError(f"--lr-grid: {item!r}: entry {k} ({lr!r}) is repeated")
            lrs.append(lr)
        for a in [name] if name else algos:
            grid[a] = lrs
    return grid


def run_config(
    base: TrainConfig, algo: str, lr: float, seed: int, out: str, critic_lr_ratio=None
) -> TrainConfig:
    """The resolved config of one run of the protocol (see the module docstring)."""
    cfg = dataclasses.replace(
        base, algo=algo, lr=lr, seed=seed, out=os.path.join(out, run_dir_name(algo, lr, seed))
    )
    if cfg.uses_critic:
        if critic_lr_ratio is not None:
            cfg.critic_lr = critic_lr_ratio * lr
    else:  # the critic knobs mean nothing without a critic: the defaults, for clean configs
        cfg.critic_lr = TrainConfig().critic_lr
        cfg.critic_warmup = 0
    return cfg.resolved()


def check_run_folder(cfg: TrainConfig) -> None:
    """:class:`ConfigError` when ``cfg.out`` holds a run written with another config (any
    field outside :data:`FREE_FIELDS`): one line naming the folder, the field and both
    values; a folder without config.yaml passes."""
    saved_path = os.path.join(cfg.out, "config.yaml")
    if not os.path.isfile(saved_path):
        return
    saved = TrainConfig.from_yaml(saved_path).to_dict()
    want = cfg.to_dict()
    for key, value in want.items():
        if key not in FREE_FIELDS and saved.get(key) != value:
            raise ConfigError(
                f"compare: {cfg.out} was run with {flag_of(key)} {saved.get(key)!r}, this "
                f"compare asks for {value!r}; use another --out (or remove that folder) rather "
                "than mix configs"
            )


def run_one(cfg: TrainConfig, log=print) -> str:
    """Run, resume or reuse the run of ``cfg`` (checked by :func:`check_run_folder`).
    Returns ``"reused"``, ``"resumed"`` or ``"ran"``."""
    log = log or _silent
    check_run_folder(cfg)
    if _finished(cfg):
        return "reused"
    with run_lock(cfg.out, log):
        if _finished(cfg):  # another compare sharing --out finished it meanwhile
            return "reused"
        done = checkpoint_iteration(cfg.out)  # -1: none yet (the run starts again from 0)
        how = "resumed" if done >= 0 else "ran"
        log(f"compare: {cfg.algo} lr {cfg.lr!r} seed {cfg.seed} -> {cfg.out} ({how})")
        start = _stamp()
        Trainer(dataclasses.replace(cfg, resume=done >= 0)).train(log=log)
        _record_segment(cfg.out, start, max(done, 0), cfg.iters)
    return how


def _finished(cfg: TrainConfig) -> bool:
    """The run's checkpoint, exported model and metrics all reached ``cfg.iters``."""
    rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    return (
        bool(rows)
        and rows[-1].get("iter") == cfg.iters
        and os.path.isdir(os.path.join(cfg.out, "model"))
        and checkpoint_iteration(cfg.out) == cfg.iters
    )


@contextlib.contextmanager
def run_lock(run_dir: str, log=None):
    """Hold ``run_dir``/:data:`LOCK` (this process's id) while a run trains, so two compares
    sharing an ``--out`` (e.g. other ``--algos`` in parallel) never train the same run at once:
    a lock of a live process is a ``ValueError`` naming it; a dead process's lock (a killed
    compare) is taken over."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    mine = f"{path}.{os.getpid()}"  # written whole, then linked: the lock never reads empty
    with open(mine, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    try:
        for _ in range(2):
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is not None and _alive(owner):
                    raise ValueError(
                        f"compare: {run_dir} is being trained by process {owner} ({path}); "
                        "run other --algos / --seeds / --lr-grid in parallel, not the same runs"
                    ) from None
                if log:
                    log(f"note: {path} was left by process {owner}, which has ended; taking over")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        else:
            raise ValueError(f"compare: {path}: could not take the lock (another compare races)")
    finally:
        os.unlink(mine)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _lock_owner(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None  # unreadable or torn: treated as left by an ended process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def run_compare(
    base: TrainConfig,
    algos: list[str],
    seeds: int,
    out: str = "",
    *,
    seed_base: int = 0,
    lr_grid: dict[str, list[float]] | None = None,
    critic_lr_ratio: float | None = None,
    select: str = "eval-auc",
    select_seeds: int = 0,
    log=print,
) -> str:
    """Run (or reuse / resume) every (algo, lr, seed), then write results.md and curves.png
    from the run folders (:func:`~.compare_report.write_report`). Returns results.md's text."""
    if not base.eval_every:
        raise ConfigError("--eval-every: compare needs held-out evaluations (>= 1), got 0")
    if select not in SELECT:
        raise ConfigError(f"--select: {select!r} is not one of {', '.join(SELECT)}")
    if seeds < 1 or seed_base < 0:
        raise ConfigError(f"--seeds / --seed-base: need >= 1 / >= 0, got {seeds} / {seed_base}")
    if select_seeds and seeds - select_seeds < 2:
        raise ConfigError(
            f"--select-seeds: {select_seeds} of --seeds {seeds} leave {seeds - select_seeds} "
            "seeds to report; need >= 2"
        )
    if seed_base + seeds > SEEDS:
        raise ConfigError(
            f"--seed-base: the last seed {seed_base} + {seeds} - 1 must be < {SEEDS} (the seeds "
            "that own disjoint training tasks)"
        )
    out = out or os.path.join("runs", f"compare-{base.env}")
    grid = lr_grid or parse_lr_grid(None, algos)
    configs = [
        run_config(base, algo, lr, seed, out, critic_lr_ratio)
        for algo in algos
        for lr in grid[algo]
        for seed in range(seed_base, seed_base + seeds)
    ]
    for cfg in configs:  # refuse a mixed folder before any run starts
        check_run_folder(cfg)
    os.makedirs(out, exist_ok=True)
    for cfg in configs:
        run_one(cfg, log)
    return write_report(out, algos=algos, select=select, log=log, select_seeds=select_seeds)


def _silent(*args, **kwargs) -> None:
    pass


def _stamp() -> dict:
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load": round(os.getloadavg()[0], 2),
    }


def _record_segment(run_dir: str, start: dict, first: int, last: int) -> None:
    """Append one (start, end, iterations, machine, commit) segment to the run's record."""
    path = os.path.join(run_dir, RUN_RECORD)
    record = {"segments": []}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    record["segments"].append(
        {"start": start, "end": _stamp(), "iterations": [first, last], **machine_info()}
    )
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
