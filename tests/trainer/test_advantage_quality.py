"""bench/advantage_quality.py: the optimal-action labels and the sign-agreement scores."""

import importlib.util
import pathlib

import torch

from steppo_fast.envs import default_tokenizer, make_env
from steppo_fast.envs.quest import scripted_action

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "advantage_quality.py"
_spec = importlib.util.spec_from_file_location("advantage_quality", SCRIPT)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
optimal_labels, scores = _mod.optimal_labels, _mod.scores


def _episode(seed: int, wrong_at: int | None, tok) -> tuple[dict, list[bool]]:
    """A quest episode played by the solver, except step ``wrong_at`` (a detour); the record
    in rollout format and the expected labels (computed here from the env, not the script)."""
    env = make_env("quest")
    obs = [env.reset(seed)]
    steps, expected = [], []
    for k in range(env.max_steps):
        best = scripted_action(obs)
        action = best
        if k == wrong_at:
            action = "open chest" if best != "open chest" else "go " + best.split()[-1]
            action = "take gold" if action == best else action
        expected.append(action == best)
        steps.append({"action_ids": tok.encode(action) + [tok.end_id], "reward": 0.0})
        o, _, terminated, truncated, _ = env.step(action)
        obs.append(o)
        if terminated or truncated:
            break
    return {"seed": seed, "steps": steps}, expected


def test_labels_follow_the_solver_from_every_state():
    tok = default_tokenizer()
    trajs, expected = [], []
    for seed, wrong in ((3, None), (4, 0), (5, 2)):
        t, e = _episode(seed, wrong, tok)
        trajs.append(t)
        expected += e
    labels = optimal_labels("quest", tok, trajs)
    assert labels == expected
    assert not all(labels) and sum(labels) >= len(labels) - 2  # the two detours, nothing else


def test_scores_of_perfect_opposite_and_silent_advantages():
    opt = torch.tensor([True, False, True, False, True])
    y = opt.double() * 2 - 1
    perfect = scores(y * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]), opt)
    assert perfect["agree"] == 1.0 and perfect["mass"] == 1.0 and perfect["zero"] == 0.0
    flipped = scores(-y, opt)
    assert flipped["agree"] == 0.0 and flipped["mass"] == -1.0
    part = scores(torch.tensor([1.0, 1.0, 0.0, -1.0, 0.0]), opt)
    # nonzero: (+,opt) right, (+,sub) wrong, (-,sub) right -> 2/3; mass (1 - 1 + 1) / 3
    assert abs(part["agree"] - 2 / 3) < 1e-12 and abs(part["mass"] - 1 / 3) < 1e-12
    assert part["zero"] == 0.4
    assert scores(torch.zeros(5), opt)["agree"] is None


def test_within_episode_part_removes_the_episode_mean():
    within = _mod.within
    traj = torch.tensor([0, 0, 0, 1, 1])
    assert within(torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0]), traj).eq(0).all()  # grpo-like
    got = within(torch.tensor([3.0, 0.0, 0.0, 1.0, -1.0]), traj)
    assert torch.allclose(got, torch.tensor([2.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64))
