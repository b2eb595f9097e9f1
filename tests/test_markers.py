"""The slow-group markers: registered in pyproject.toml, every group's module prefix matches a
test file (a renamed file cannot silently leave its group), and the rules of conftest."""

import re
from pathlib import Path

from conftest import SLOW_GROUPS, group_markers

TESTS = Path(__file__).resolve().parent


def test_groups_are_registered_and_match_test_files():
    text = (TESTS.parent / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    pytest_section = text[text.index("[tool.pytest.ini_options]") :]
    markers = pytest_section[pytest_section.index("markers = [") :].split("]", 1)[0]
    registered = set(re.findall(r'"(\w+):', markers))
    assert registered == {*SLOW_GROUPS, "slow", "numerics"}  # numerics: the second-code-path set
    assert "--strict-markers" in pytest_section
    for group, prefixes in SLOW_GROUPS.items():
        for prefix in prefixes:
            assert list(TESTS.glob(prefix + "*.py")), f"{group}: no test file matches {prefix!r}"


def test_group_rules():
    assert group_markers("test_trainer_cli", {}) == ["trainer", "slow"]
    assert group_markers("test_triton_scan", {}) == ["triton", "slow"]
    assert group_markers("test_triton_gpu_compile", {}) == ["gpu_compile", "slow"]
    assert group_markers("test_loss", {"impl": "triton", "n": 3}) == ["triton", "slow"]
    assert group_markers("test_loss", {"impl": "cpp"}) == []
    assert group_markers("test_batch", {}) == []
