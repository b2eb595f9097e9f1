"""Full StepPO in stock verl 0.9: the step critic (opt-in; load it explicitly).

``steppo_fast.integrations.verl`` registers the StepPO loss and estimators in verl's registries;
that is all verl's extension points allow. Two things of full StepPO have no extension point in
verl 0.9.x, so this module, when named in ``VERL_USE_EXTERNAL_MODULES`` (nothing else imports
it), installs the smallest wrappers that provide them, and logs one line saying so:

1. **Step GAE from the critic** (``algorithm.adv_estimator=steppo`` + ``critic.enable=True``).
   verl's ``compute_advantage`` hands the critic's ``values`` only to its built-in ``gae``. The
   wrapper calls the registered ``steppo`` estimator with ``batch=data.batch`` and
   ``non_tensor_batch=data.non_tensor_batch`` (it reads ``values`` and, when present,
   ``traj_uid`` / ``step_idx`` there): exactly the call verl PR #7473 makes for estimators
   that accept the batch. Every other estimator goes to verl's function unchanged. It replaces
   the name where the trainers look it up: ``verl.trainer.ppo.ray_trainer.compute_advantage``
   (legacy trainer, and the definition) and ``verl.trainer.ppo.v1.utils.compute_advantage``
   (the v1 trainer imports it by name). With ``gae`` it raises: this module's critic is
   trained only at step boundaries, which token-level GAE cannot use.
2. **The critic trained where StepPO reads it.** verl's trainers hand the critic worker its
   loss through the worker's own hook, ``set_loss_fn(partial(value_loss, config=critic_cfg))``,
   with ``value_loss`` imported from ``verl.workers.utils.losses`` (by name into
   ``verl.trainer.ppo.v1.trainer_base``; inside a function in the legacy and separation
   trainers). There is no registry for value losses, so the module points both names at
   :func:`step_value_loss`, which trains values at step boundaries only
   (:mod:`._verl_value`).
3. **Per-step rollout-vs-training metrics.** ``calculate_debug_metrics`` (logged when
   ``rollout.calculate_log_probs=True``) also returns :func:`._verl_metrics.step_logp_mismatch`.

Every replacement is checked to be verl's own function before it is replaced (a clear error
otherwise), is idempotent, and is undone by :func:`uninstall`. When verl passes the batch to
registered estimators (verl PR #7473), item 1 is verl's own behaviour and its wrapper can go:
see docs/verl.md.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging

import verl
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from . import verl as _registrations  # noqa: F401  (registers the steppo loss and estimators)
from ._verl_metrics import step_logp_mismatch
from ._verl_value import step_value_loss_rows

__all__ = ["install", "installed", "step_value_loss", "uninstall"]

logger = logging.getLogger(__name__)

SUPPORTED_VERL = "0.9."

if not verl.__version__.startswith(SUPPORTED_VERL):
    raise ImportError(
        f"steppo_fast.integrations.verl_critic: verl {verl.__version__} is not supported; this "
        f"module wraps verl {SUPPORTED_VERL}x internals (compute_advantage, value_loss). Remove it "
        "from VERL_USE_EXTERNAL_MODULES (steppo_fast.integrations.verl alone needs no patch)"
    )


def step_value_loss(config, model_output, data, dp_group=None):
    """verl critic loss (``TrainingWorker.set_loss_fn``): the value trained at step boundaries.

    Same contract as ``verl.workers.utils.losses.value_loss``: ``config`` is verl's
    ``CriticConfig`` (``cliprange_value``, ``loss_agg_mode``, ``loss_scale_factor``),
    ``model_output["values"]`` the critic's output (no-padding layout), ``data`` the micro-batch
    with ``values`` (rollout-time), ``returns``, ``response_mask`` and verl's global counts
    ``dp_size``, ``batch_num_tokens``, ``global_batch_size``. Returns ``(loss, metrics)``.
    """
    vpreds = no_padding_2_padding(model_output["values"], data)
    dp_size, num_tokens, num_rows = (
        data["dp_size"],
        data["batch_num_tokens"],
        data["global_batch_size"],
    )
    global_norm = (
        dp_size > 1
        or num_tokens is not None
        or num_rows is not None
        or config.loss_scale_factor is not None
    )
    padded = data.select("values", "returns", "response_mask").to_padded_tensor()
    loss, stats = step_value_loss_rows(
        vpreds,
        padded["values"],
        padded["returns"],
        padded["response_mask"],
        loss_agg_mode=config.loss_agg_mode,
        clip=config.cliprange_value,
        dp_size=dp_size,
        batch_num_tokens=num_tokens,
        global_batch_size=num_rows,
        loss_scale_factor=config.loss_scale_factor,
    )
    aggregation = AggregationType.SUM if global_norm else AggregationType.MEAN
    metrics = {
        "critic/vf_loss": Metric(value=loss, aggregation=aggregation),
        "critic/vf_clipfrac": stats["clip_frac"],
        "critic/vpred_mean": stats["vpred_mean"],
        "critic/steppo_return_mean": stats["return_mean"],
        "critic/steppo_num_steps": stats["num_steps"],
    }
    return loss, metrics


def _estimator_name(adv_estimator) -> str:
    return str(getattr(adv_estimator, "value", adv_estimator))


def _wrap_compute_advantage(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compute_advantage(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        name = _estimator_name(bound.arguments["adv_estimator"])
        if name == "gae":
            raise ValueError(
                "algorithm.adv_estimator: 'gae' reads the critic at every token, but "
                "steppo_fast.integrations.verl_critic trains it only at step boundaries; use "
                "adv_estimator=steppo, or remove the module from VERL_USE_EXTERNAL_MODULES"
            )
        if name != "steppo":
            return original(*args, **kwargs)
        data = bound.arguments["data"]
        if "values" not in data.batch.keys():
            raise ValueError(
                "algorithm.adv_estimator=steppo: data.batch has no 'values'; StepPO's step GAE "
                "needs the critic (critic.enable=True), or use adv_estimator=steppo_mc"
            )
        if "response_mask" not in data.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask

            data.batch["response_mask"] = compute_response_mask(data)
        # exactly what verl does for an estimator that accepts the batch (verl PR #7473)
        advantages, returns = get_adv_estimator_fn("steppo")(
            token_level_rewards=data.batch["token_level_rewards"],
            response_mask=data.batch["response_mask"],
            config=bound.arguments["config"],
            index=data.non_tensor_batch.get("uid", None),
            batch=data.batch,
            non_tensor_batch=data.non_tensor_batch,
            gamma=float(bound.arguments["gamma"]),
            lam=float(bound.arguments["lam"]),
        )
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        return data

    compute_advantage.__steppo_original__ = original
    return compute_advantage


def _wrap_debug_metrics(original):
    @functools.wraps(original)
    def calculate_debug_metrics(data):
        metrics = original(data)
        batch = data.batch
        if {"rollout_log_probs", "old_log_probs", "response_mask"} <= set(batch.keys()):
            metrics.update(
                step_logp_mismatch(
                    batch["rollout_log_probs"], batch["old_log_probs"], batch["response_mask"]
                )
            )
        return metrics

    calculate_debug_metrics.__steppo_original__ = original
    return calculate_debug_metrics


# (module, attribute, verl's own function: (module, attribute), wrapper factory or replacement)
_PATCHES = (
    ("verl.trainer.ppo.ray_trainer", "compute_advantage", _wrap_compute_advantage),
    ("verl.trainer.ppo.v1.utils", "compute_advantage", _wrap_compute_advantage),
    ("verl.workers.utils.losses", "value_loss", lambda _original: step_value_loss),
    ("verl.trainer.ppo.v1.trainer_base", "value_loss", lambda _original: step_value_loss),
    ("verl.utils.debug.metrics", "calculate_debug_metrics", _wrap_debug_metrics),
    ("verl.trainer.ppo.v1.trainer_base", "calculate_debug_metrics", _wrap_debug_metrics),
)
# the functions verl defines, which the names above must hold before they are replaced
_ORIGINS = {
    "compute_advantage": ("verl.trainer.ppo.ray_trainer", "compute_advantage"),
    "value_loss": ("verl.workers.utils.losses", "value_loss"),
    "calculate_debug_metrics": ("verl.utils.debug.metrics", "calculate_debug_metrics"),
}
_saved: dict[tuple[str, str], object] = {}


def installed() -> bool:
    """True while the wrappers are in place."""
    return bool(_saved)


def install() -> None:
    """Install the wrappers (idempotent). Raises ``RuntimeError`` naming the attribute when a
    name does not hold verl's own function (another patch got there first)."""
    if _saved:
        return
    originals = {}
    for name, (module, attr) in _ORIGINS.items():
        originals[name] = getattr(importlib.import_module(module), attr)
    plan = []
    for module_name, attr, make in _PATCHES:
        module = importlib.import_module(module_name)
        current = getattr(module, attr, None)
        if current is not originals[attr]:
            raise RuntimeError(
                f"{module_name}.{attr}: expected verl's own {attr}, found {current!r}; "
                "steppo_fast.integrations.verl_critic only wraps an unpatched verl 0.9.x"
            )
        plan.append((module, module_name, attr, current, make(originals[attr])))
    for module, module_name, attr, current, replacement in plan:
        _saved[(module_name, attr)] = current
        setattr(module, attr, replacement)
    logger.warning(
        "steppo_fast.integrations.verl_critic: installed on verl %s: compute_advantage routes "
        "adv_estimator=steppo to StepPO step GAE (others unchanged, gae refused); critic loss = "
        "step-boundary value loss; calculate_debug_metrics + per-step log-prob mismatch",
        verl.__version__,
    )


def uninstall() -> None:
    """Restore verl's own functions."""
    for (module_name, attr), original in _saved.items():
        setattr(importlib.import_module(module_name), attr, original)
    _saved.clear()


install()
