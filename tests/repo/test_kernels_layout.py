"""The Triton package's one rule, read from the source (nothing imported): one folder per op
family; ``kernel*.py`` hold the ``@triton.jit`` code only (no torch, no launch), ``ops.py`` the
host side (no ``@triton.jit``); a family imports only its own files and the shared ``_common`` /
``_configs`` modules, never another family."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "kernels" / "steppo_fast_kernels"
FAMILIES = ("segment", "scan", "logprobs", "step_loss")


def _jit_functions(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if "triton.jit" in ast.unparse(deco):
                    found.append(node.name)
    return found


def _imports(tree) -> list[tuple[int, str]]:
    """(level, module) of every import statement (level 0 = absolute)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(node.level, f"{node.module or ''}:{a.name}") for a in node.names]
    return out


def layout_problems(root: Path = ROOT) -> list[str]:
    problems = []
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__")
    if folders != sorted(FAMILIES):
        problems.append(f"family folders {folders} != {sorted(FAMILIES)}")
    for family in FAMILIES:
        files = sorted(p.name for p in (root / family).glob("*.py"))
        if "ops.py" not in files or "__init__.py" not in files:
            problems.append(f"{family}: needs __init__.py and ops.py, has {files}")
        for name in files:
            rel = f"{family}/{name}"
            tree = ast.parse((root / family / name).read_text())
            jit, imports = _jit_functions(tree), _imports(tree)
            if name.startswith("kernel"):
                if not jit:
                    problems.append(f"{rel}: a kernel file without @triton.jit code")
                if any(level == 0 and mod.split(".")[0] == "torch" for level, mod in imports):
                    problems.append(f"{rel}: imports torch (kernel files hold jit code only)")
            elif jit:
                problems.append(f"{rel}: @triton.jit {jit} outside a kernel*.py file")
            elif name not in ("ops.py", "__init__.py"):
                problems.append(f"{rel}: only __init__.py, ops.py and kernel*.py belong here")
            for level, mod in imports:
                module, _, name = mod.partition(":")
                target = (module or name).split(".")[0]  # from .. import x / from ..x import y
                if level == 2 and target not in ("_common", "_configs"):
                    problems.append(f"{rel}: imports another family ({target})")
                if level == 0 and target.startswith("steppo_fast.kernels."):
                    problems.append(f"{rel}: absolute import into the kernels package ({target})")
    return problems


def test_every_family_follows_the_rule():
    assert layout_problems() == []


def test_the_rule_check_catches_violations(tmp_path):
    for family in FAMILIES:
        (tmp_path / family).mkdir()
        (tmp_path / family / "__init__.py").write_text("")
        (tmp_path / family / "ops.py").write_text("import torch\n")
        (tmp_path / family / "kernel.py").write_text(
            "import triton\n@triton.jit\ndef k(x):\n    pass\n"
        )
    (tmp_path / "scan" / "ops.py").write_text("import triton\n@triton.jit\ndef k(x):\n    pass\n")
    (tmp_path / "segment" / "kernel.py").write_text(
        "import torch\nimport triton\n@triton.jit\ndef k(x):\n    pass\n"
    )
    (tmp_path / "logprobs" / "launch.py").write_text("from ..step_loss import ops\n")
    (tmp_path / "step_loss" / "ops.py").write_text("from .. import scan\nfrom .. import _configs\n")
    found = layout_problems(tmp_path)
    assert any("scan/ops.py: @triton.jit" in p for p in found)
    assert any("segment/kernel.py: imports torch" in p for p in found)
    assert any("logprobs/launch.py: only" in p for p in found)
    assert any("logprobs/launch.py: imports another family (step_loss)" in p for p in found)
    assert any("step_loss/ops.py: imports another family (scan)" in p for p in found)
    assert len(found) == 5, found
