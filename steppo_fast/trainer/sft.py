"""``steppo sft``: behaviour cloning of the policy on an environment's scripted solver.

Demonstrations: ``demos`` episodes on training-range task seeds ``SFT_SEED_BASE +
(seed << 20) + k`` (below the held-out seeds ``EVAL_SEED_BASE``, so evaluation stays held
out), played by the env's solver (:data:`SOLVERS`). A fraction ``noise_frac`` of them (the
first ``round(noise_frac * demos)`` of a seeded shuffle) are *noisy*: every action is a
uniformly random grammar action instead (the env's random policy), and cloning them pulls the
policy towards random behaviour on purpose, to make a weak starting policy for RL. A fraction
``truncate_frac`` (the next ``round(truncate_frac * demos)`` of the same shuffle, so no
demonstration is both) are *truncated*: the solver's episode of ``n`` steps keeps only its first
``k`` steps, ``k`` uniform in ``1..n-1`` (seeded), so the later situations of the task are seen
less often.

Records are built exactly as :func:`~.rollout.rollout` builds them (same prompt / observation
framing, action tokens, grammar masks), then ``StepBatch.from_trajectories`` and the trainer's
forward (:func:`~.policy.hidden_states`, :func:`~.update.action_logprobs`: log-probs of action
tokens only, renormalised under the grammar mask, at ``temperature``). The loss of one
gradient step is the token-mean NLL over the action tokens of ``batch`` demonstrations drawn
uniformly (seeded)::

    L = -(1 / A) * sum_a log pi(action_a | context_a)        A = action tokens in the batch

AdamW (``sft_lr``), ``steps`` steps. Output: ``OUT/model`` (HF format, the format
``steppo train`` exports, written through ``model.tmp`` and a swap) and ``OUT/sft.json`` (the
knobs, the model config and the demonstration NLL before / after). Word tokenizer only (a
``--model`` folder with its own tokenizer is a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable

import torch

from .. import StepBatch
from ..envs import doors, haystack, make_env, quest
from ..envs.tokenizer import WordTokenizer
from .config import TrainConfig
from .fields import knob
from .masking import make_grammar_masks
from .policy import build_policy, build_tokenizer, hidden_states
from .rollout import observation_ids, prompt_ids
from .runfiles import atomic_write_text, replace_dir
from .update import action_logprobs
from .warmstart import load_init, quiet_transformers

SFT_SEED_BASE = 1 << 39  # + (run seed << 20) + k: < 2**40 = the first held-out seed
MAX_DEMOS = 1 << 20

# env name -> solver(env, observations so far) -> the next action text
SOLVERS: dict[str, Callable] = {
    "doors": lambda env, obs: doors.scripted_action(obs),
    "quest": lambda env, obs: quest.scripted_action(obs),
    "haystack": lambda env, obs: haystack.scripted_action(obs, env.n_pages),
    "haystack-small": lambda env, obs: haystack.scripted_action(obs, env.n_pages),
}


@dataclasses.dataclass
class SFTConfig:
    """The behaviour-cloning knobs (flags ``--demos`` ...; checked with the field table)."""

    demos: int = knob(64, "solver demonstrations (episodes)", ge=1, le=MAX_DEMOS)
    steps: int = knob(100, "gradient steps", ge=0)
    noise_frac: float = knob(0.0, "fraction of demonstrations with random actions", ge=0, le=1)
    truncate_frac: float = knob(
        0.0, "fraction of demonstrations cut after a random number of steps", ge=0, le=1
    )
    batch: int = knob(16, "demonstrations per gradient step", ge=1)
    sft_lr: float = knob(3e-3, "behaviour-cloning learning rate (AdamW)", gt=0)


def demonstrations(cfg: TrainConfig, sft: SFTConfig, tokenizer: WordTokenizer):
    """``(trajectories, masks)``: rollout-format records of the demonstrations and, per
    trajectory, the dense grammar masks [A_b, V] of its action tokens (``None`` without a
    grammar)."""
    if cfg.env not in SOLVERS:
        raise ValueError(f"--env: {cfg.env!r} has no scripted solver ({', '.join(SOLVERS)})")
    solve = SOLVERS[cfg.env]
    n_noisy, n_cut = round(sft.noise_frac * sft.demos), round(sft.truncate_frac * sft.demos)
    if n_noisy + n_cut > sft.demos:
        raise ValueError(
            f"--truncate-frac: {sft.truncate_frac} x {sft.demos} demonstrations = {n_cut} cut "
            f"ones plus {n_noisy} noisy ones (--noise-frac) exceed the {sft.demos} demonstrations"
        )
    order = list(range(sft.demos))
    random.Random(f"sft-noise:{cfg.seed}").shuffle(order)
    noisy = set(order[:n_noisy])
    cut = set(order[n_noisy : n_noisy + n_cut])
    rng = random.Random(f"sft-actions:{cfg.seed}")
    cut_rng = random.Random(f"sft-cut:{cfg.seed}")
    grammar_masks = None
    trajectories, masks = [], []
    for k in range(sft.demos):
        env = make_env(cfg.env)
        if grammar_masks is None and env.grammar is not None:
            grammar_masks = make_grammar_masks(env.grammar, tokenizer)
        seed = SFT_SEED_BASE + (cfg.seed << 20) + k
        observations = [env.reset(seed)]
        context = prompt_ids(tokenizer, observations[0])
        steps, rows = [], []  # rows: per step, the grammar mask rows of its action tokens
        while True:
            text = env.grammar.sample(rng) if k in noisy else solve(env, observations)
            action = tokenizer.encode(text)
            if grammar_masks is not None:
                rows.append([grammar_masks.allowed(tuple(action[:j])) for j in range(len(action))])
            obs, reward, terminated, truncated, _ = env.step(text)
            steps.append({"prompt_ids": list(context), "action_ids": action, "reward": reward})
            observations.append(obs)
            if terminated or truncated or len(steps) >= env.max_steps:
                break
            context += action + observation_ids(tokenizer, obs, action)
        if k in cut:
            if len(steps) < 2:
                raise ValueError(
                    f"--truncate-frac: demonstration {k} has {len(steps)} step; a cut one keeps "
                    "1..n-1 of its n >= 2 steps"
                )
            keep = cut_rng.randint(1, len(steps) - 1)
            steps, rows, terminated = steps[:keep], rows[:keep], False
        trajectories.append({"steps": steps, "terminated": bool(terminated), "group": k})
        flat = [r for step_rows in rows for r in step_rows]
        masks.append(torch.stack(flat) if flat else None)
    return trajectories, masks


def demo_nll(policy, trajectories, masks, cfg: TrainConfig) -> torch.Tensor:
    """Token-mean NLL (fp32 scalar, differentiable) of the action tokens of ``trajectories``."""
    batch = StepBatch.from_trajectories(trajectories, layout=cfg.layout)
    hidden = hidden_states(policy, batch, cfg.forward)
    m = None if masks[0] is None else torch.cat(masks)
    logp, _ = action_logprobs(policy, hidden, batch, m, cfg.temperature, cfg.impl)
    return -logp.float().mean()


def run_sft(cfg: TrainConfig, sft: SFTConfig, log=print) -> tuple[dict, torch.nn.Module]:
    """Clone the solver into the policy ``cfg`` builds; write ``cfg.out``/model and sft.json.
    Returns the summary written to sft.json and the trained policy (eval mode)."""
    import os

    cfg = cfg.resolved()
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(cfg)
    if not isinstance(tokenizer, WordTokenizer):
        raise ValueError(f"--model: steppo sft needs the word tokenizer, {cfg.model!r} has its own")
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg, tokenizer)
    if cfg.init:
        load_init(policy, cfg.init)
    trajectories, masks = demonstrations(cfg, sft, tokenizer)
    policy.eval()
    with torch.no_grad():
        before = float(demo_nll(policy, trajectories, masks, cfg))
    opt = torch.optim.AdamW(policy.parameters(), lr=sft.sft_lr)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # host-side: picks list indices
    policy.train()
    for step in range(sft.steps):
        size = (min(sft.batch, len(trajectories)),)
        pick = torch.randint(len(trajectories), size, generator=gen, device="cpu").tolist()
        loss = demo_nll(policy, [trajectories[i] for i in pick], [masks[i] for i in pick], cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % max(1, sft.steps // 5) == 0:
            log(f"sft step {step + 1}/{sft.steps} | nll {float(loss.detach()):.4f}")
    policy.eval()
    with torch.no_grad():
        after = float(demo_nll(policy, trajectories, masks, cfg))
    os.makedirs(cfg.out, exist_ok=True)
    with quiet_transformers():
        replace_dir(os.path.join(cfg.out, "model"), policy.save_pretrained)
    summary = {
        "sft": dataclasses.asdict(sft),
        "config": cfg.to_dict(),
        "demo_nll_before": before,
        "demo_nll_after": after,
        "demo_actions": sum(len(s["action_ids"]) for t in trajectories for s in t["steps"]),
    }
    atomic_write_text(os.path.join(cfg.out, "sft.json"), json.dumps(summary, indent=1) + "\n")
    return summary, policy
