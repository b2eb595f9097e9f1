"""The README's "API in 20 lines" example runs as written and does what its comments say."""

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def api_example() -> str:
    text = README.read_text()
    section = text[text.index("## The API in 20 lines") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(capsys):
    code = api_example()
    assert "step_policy_loss" in code and "loss.backward()" in code
    scope = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), scope)
    batch, loss, stats = scope["batch"], scope["loss"], scope["stats"]
    # layout="auto": the second step's prompt extends the first step's prompt + action
    assert batch.num_seqs == 2 and batch.num_steps == 3 and batch.num_trajs == 2
    assert batch.num_actions == 6
    assert math.isfinite(loss.item()) and set(stats) >= {"clip_frac", "approx_kl", "ratio_mean"}
    # on-policy (old_logp = logp.detach()): every ratio is 1, nothing clipped
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0
    assert scope["hidden"].grad is not None and torch.isfinite(scope["hidden"].grad).all()
    assert "StepBatch" in capsys.readouterr().out
