"""The package's import graph (scripts/import_graph.py): no import cycle, and no import from a
lower layer (validation helpers; backends: reference, kernels, cpu; the batch package) into a
higher one (ops, the package top level, trainer and integrations). The checker itself is tested
on small graphs."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def ig():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_graph_has_no_cycle_and_no_upward_import(ig):
    graph = ig.edges(ig.discover())
    assert ig.problems(graph) == []


def test_graph_covers_both_source_folders_and_lazy_imports(ig):
    graph = ig.edges(ig.discover())
    assert "steppo_fast.kernels.step_loss.ops" in graph  # mapped from kernels/steppo_fast_kernels
    assert "steppo_fast.trainer.loop" in graph
    # a function-level import is an edge too (the dispatcher's traceable import of a backend)
    assert "steppo_fast.cpp" in graph["steppo_fast._dispatch"]
    # relative imports resolve: ops.loss -> _validate, the compiled extension is a node
    assert "steppo_fast._validate" in graph["steppo_fast.ops.loss"]
    assert "steppo_fast._C" in graph["steppo_fast.cpp._registry"]


def test_checker_reports_cycles_and_upward_imports(ig):
    assert ig.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert ig.cycles({"a": {"a"}}) == [["a"]]
    assert ig.cycles({"a": {"b"}, "b": set()}) == []
    upward = {
        "steppo_fast.reference.loss": {"steppo_fast.ops.loss"},
        "steppo_fast.kernels.scan.ops": {"steppo_fast"},
        "steppo_fast._validate": {"steppo_fast.trainer.loop"},
        "steppo_fast.ops.loss": {"steppo_fast.reference.loss"},  # downward: fine
        "steppo_fast.batch.records": {"steppo_fast.ops.loss"},  # batch below ops
        "steppo_fast.kernels.segment.ops": {"steppo_fast.batch"},  # backends below batch
        "steppo_fast.ops.segments": {"steppo_fast.batch.step_batch"},  # downward: fine
        "steppo_fast.envs.quest": {"steppo_fast.trainer.loop"},  # unranked: not checked
    }
    found = ig.layer_violations({k: set(v) for k, v in upward.items()})
    assert len(found) == 5
    assert found[0].startswith("steppo_fast._validate (validation) imports steppo_fast.trainer")


def test_cli_prints_text_and_dot(ig, capsys):
    assert ig.main([]) == 0
    text = capsys.readouterr().out
    assert "steppo_fast.ops.loss -> " in text
    assert ig.main(["--dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph") and '"steppo_fast.cpp._registry" -> "steppo_fast._C";' in dot
    assert ig.main(["--check"]) == 0


def test_no_backend_imports_the_reference_dispatch_or_ops(ig):
    graph = ig.edges(ig.discover())
    assert ig.separation_violations(graph) == []
    backends = [m for m in graph if m.startswith(("steppo_fast.kernels", "steppo_fast.cpp"))]
    assert (
        "steppo_fast.cpp.logprobs" in backends and "steppo_fast.kernels.step_loss.ops" in backends
    )
    # shared names come from the leaf module, not from the reference
    assert "steppo_fast._defs" in graph["steppo_fast.kernels.step_loss.ops"]
    assert "steppo_fast._defs" in graph["steppo_fast.reference.loss"]
    assert graph["steppo_fast._defs"] == set()


def test_separation_check_catches_a_backend_importing_upward(ig):
    bad = {
        "steppo_fast.kernels.scan.ops": {"steppo_fast.reference"},
        "steppo_fast.cpp.ops": {"steppo_fast.reference.loss", "steppo_fast._defs"},
        "steppo_fast.cpp": {"steppo_fast._dispatch"},
        "steppo_fast.kernels": {"steppo_fast.ops.loss"},
        "steppo_fast.reference.loss": {"steppo_fast._defs"},  # allowed
        "steppo_fast.ops.loss": {"steppo_fast.reference.loss"},  # allowed (ops above backends)
    }
    found = ig.separation_violations(bad)
    assert len(found) == 4
    assert found[0].startswith("steppo_fast.cpp (backend) imports steppo_fast._dispatch")
    assert any("kernels.scan.ops (backend) imports steppo_fast.reference" in f for f in found)
    # the two edges to the reference are same-rank: only the separation rule catches them
    assert len(ig.layer_violations(bad)) == 2
