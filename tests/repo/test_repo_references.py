"""Nothing in the repository refers to a file the repository does not contain: no citation of
documents that live outside it (the contract is docs/design.md), and every repo-relative path
written in a tracked text file (``docs/<name>.md``, ``bench/<name>.py``, Markdown links) exists."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".yaml", ".yml", ".cfg", ".h", ".cpp", ""}
# Names of documents that exist only outside this repository (spelled in pieces so that this
# file does not match itself).
OUTSIDE = [
    re.compile(p) for p in (r"\bDESIGN" + r"\.md", r"\bTOOLCHAIN" + r"\.md", r"\.\./" + "shared")
]
# A path rooted at one of the repo's top-level folders, with a file suffix.
TOP = ("docs", "bench", "tests", "scripts", "steppo_fast", "kernels", "csrc", ".ci")
_TOPS = "|".join(map(re.escape, TOP))
PATH = re.compile(
    r"(?<![\w./-])((?:" + _TOPS + r")/[\w./-]*\w\.(?:md|py|sh|cpp|h|json|png|toml|txt))"
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    files = [ROOT / n for n in out.split("\0") if n]
    return [f for f in files if f.suffix in TEXT_SUFFIXES and f.is_file()]


def find_missing(path: Path, text: str) -> list[str]:
    """Every reference in ``text`` (of file ``path``) to a file the repository lacks."""
    bad = [f"cites {m.group(0)!r}" for p in OUTSIDE for m in p.finditer(text)]
    for m in PATH.finditer(text):
        if not (ROOT / m.group(1)).exists():
            bad.append(f"names missing {m.group(1)!r}")
    if path.suffix == ".md":
        for m in LINK.finditer(text):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                bad.append(f"links to missing {target!r}")
    return bad


def test_no_reference_to_a_file_outside_the_repo():
    problems = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in find_missing(path, text)]
    assert problems == []


def test_the_checker_flags_outside_citations_missing_paths_and_links():
    readme = ROOT / "README.md"
    assert find_missing(readme, "see docs/design.md and bench/README.md") == []
    text = "see " + "DESIGN" + ".md, ../" + "shared/x, docs" + "/nowhere.md and [a](gone.md)"
    found = find_missing(readme, text)
    assert len(found) == 4, found
    assert find_missing(readme, "[ok](docs/design.md#3-functional-api)") == []
