"""The slow-group markers: registered in pyproject.toml, every group's file pattern matches a
test file (a moved or renamed file cannot silently leave its group), and the rules of conftest."""

import re
from fnmatch import fnmatch
from pathlib import Path

from _csr import LAYOUTS
from conftest import LARGE_CASES, NUMERIC_FILES, ONE_THREAD_FILES, SLOW_GROUPS, TESTS, group_markers


def _test_files() -> list[str]:
    return [p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")]


def test_groups_are_registered_and_match_test_files():
    text = (TESTS.parent / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    pytest_section = text[text.index("[tool.pytest.ini_options]") :]
    markers = pytest_section[pytest_section.index("markers = [") :].split("]", 1)[0]
    registered = set(re.findall(r'"(\w+):', markers))
    assert registered == {*SLOW_GROUPS, "slow", "numerics"}  # numerics: the second-code-path set
    assert "--strict-markers" in pytest_section
    files = _test_files()
    patterns = [p for group in SLOW_GROUPS.values() for p in group]
    for pattern in [*patterns, *ONE_THREAD_FILES, *NUMERIC_FILES]:
        assert any(fnmatch(f, pattern) for f in files), f"no test file matches {pattern!r}"


def test_every_test_file_is_in_a_family_folder():
    # tests/ itself holds the helpers (_*.py) and conftest.py only
    assert [f for f in _test_files() if "/" not in f] == []


def test_test_basenames_are_unique():
    # pytest's default "prepend" import mode imports each test file by its basename (the test
    # folders have no __init__.py): two files of one name in two folders would collide
    names = [Path(f).name for f in _test_files()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_group_rules():
    assert group_markers("trainer/test_trainer_cli.py", {}) == ["trainer", "slow"]
    assert group_markers("model/test_layouts_model.py", {}) == ["trainer", "slow"]
    assert group_markers("scan/test_triton_scan.py", {}) == ["triton", "slow"]
    assert group_markers("gpu_compile/test_triton_gpu_compile.py", {}) == ["gpu_compile", "slow"]
    assert group_markers("step_loss/test_loss.py", {"impl": "triton", "n": 3}) == [
        "triton",
        "slow",
    ]
    assert group_markers("step_loss/test_loss.py", {"impl": "cpp"}) == []
    assert group_markers("batch/test_batch.py", {}) == []
    # a group marker set by hand: the group and slow
    assert group_markers("cpp/test_cpp_threads.py", {}, ("subprocess",)) == ["subprocess", "slow"]
    assert group_markers("envs/test_haystack.py", {}, ("trainer",)) == ["trainer", "slow"]
    assert group_markers("scan/test_cpp_advantages.py", {"name": "many_short"}) == [
        "large",
        "slow",
    ]
    assert group_markers("scan/test_cpp_advantages.py", {"name": "hand"}) == []


def test_large_cases_name_real_layouts():
    # a renamed layout would silently leave the large group
    from test_cpp_loss import EDGE_CASES

    assert set(LARGE_CASES) <= set(LAYOUTS) | set(EDGE_CASES)
