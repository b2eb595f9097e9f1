"""Draw and check the import graph of the steppo_fast package (stdlib only, no import executed).

Usage (from the repository root)::

    python scripts/import_graph.py            # text: one line per module, "a -> b, c"
    python scripts/import_graph.py --dot      # Graphviz dot (pipe into `dot -Tsvg`)
    python scripts/import_graph.py --check    # exit 1 naming every cycle and layer violation

Nodes are the package's modules: ``steppo_fast/**.py`` and the Triton package on disk in
``kernels/steppo_fast_kernels/**.py`` (installed as ``steppo_fast.kernels``). An edge ``a -> b``
is an ``import`` statement in ``a`` (at module level or inside a function: a lazy import is
still a dependency) naming module ``b`` of the package; ``from pkg import name`` points at
``pkg.name`` when that is a module (the compiled ``steppo_fast._C`` counts), else at ``pkg``.
Importing a submodule also runs its parents' ``__init__``; that implicit step is not an edge.

Checks:
- no cycle (strongly connected components of more than one module, or a self-import);
- layers: data flows records -> batch -> ops -> backends, with the trainer and integrations on
  top. Every module has a rank (``LAYERS``, first matching prefix wins) and no module imports a
  module of a higher rank: validation helpers and shared definitions (0) < backends (1:
  reference, kernels, cpp) < the batch package (2: records, packing, StepBatch, checks,
  micro-batches) < dispatch and public ops (3) < package top level (4) < trainer and
  integrations (5). So backends never import the batch, and the batch never imports ops, the
  top level, the trainer or the integrations. Modules without a rank (envs, ...) are not
  layer-checked;
- backends are siblings: the Triton and C++ backends (``steppo_fast.kernels``,
  ``steppo_fast.cpp``) never import the reference, the dispatcher or the public ops
  (``SEPARATE``); what they share with the reference lives in ``steppo_fast._defs`` (rank 0),
  and every fallback to the reference is a rule of ``steppo_fast._dispatch``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "steppo_fast"
# (on-disk folder, module prefix it is installed as)
SOURCES = (
    (ROOT / "steppo_fast", "steppo_fast"),
    (ROOT / "kernels/steppo_fast_kernels", "steppo_fast.kernels"),
)
# compiled modules (no .py source): leaves of the graph
EXTENSIONS = ("steppo_fast._C",)

# (module name or prefix, rank); a prefix "x." matches x's submodules, "x" only x itself
LAYERS = (
    ("steppo_fast._validate", 0),
    ("steppo_fast._defs", 0),
    ("steppo_fast.reference.", 1),
    ("steppo_fast.reference", 1),
    ("steppo_fast.kernels.", 1),
    ("steppo_fast.kernels", 1),
    ("steppo_fast.cpp.", 1),
    ("steppo_fast.cpp", 1),
    ("steppo_fast.batch.", 2),
    ("steppo_fast.batch", 2),
    ("steppo_fast._dispatch", 3),
    ("steppo_fast.ops.", 3),
    ("steppo_fast.ops", 3),
    ("steppo_fast", 4),
    ("steppo_fast.trainer.", 5),
    ("steppo_fast.trainer", 5),
    ("steppo_fast.integrations.", 5),
    ("steppo_fast.integrations", 5),
)
# (importer prefix, forbidden target prefix): same-rank modules kept apart (prefix rules as LAYERS)
_BACKENDS = ("steppo_fast.kernels", "steppo_fast.kernels.", "steppo_fast.cpp", "steppo_fast.cpp.")
_ABOVE = (
    "steppo_fast.reference",
    "steppo_fast.reference.",
    "steppo_fast._dispatch",
    "steppo_fast.ops",
    "steppo_fast.ops.",
)
SEPARATE = tuple((a, b) for a in _BACKENDS for b in _ABOVE)
RANK_NAMES = {
    0: "validation",
    1: "backend",
    2: "batch",
    3: "ops",
    4: "package top level",
    5: "trainer",
}


def discover() -> dict[str, Path | None]:
    """Module name -> file, for every module of the package (packages as their __init__;
    compiled extensions map to None)."""
    modules: dict[str, Path | None] = dict.fromkeys(EXTENSIONS)
    for folder, prefix in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of a (possibly relative) import target seen in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    graph = {name: set() for name in modules}
    for module, path in modules.items():
        if path is None:
            continue
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:  # a.b.attr -> a.b
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == PACKAGE:
                    graph[module].add(target)
    return graph


def rank(module: str) -> int | None:
    for prefix, value in LAYERS:
        if _matches(module, prefix):
            return value
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan, iterative), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge from a module to one of a higher rank, as readable lines."""
    out = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            a, b = rank(module), rank(target)
            if a is not None and b is not None and a < b:
                out.append(
                    f"{module} ({RANK_NAMES[a]}) imports {target} ({RANK_NAMES[b]}): "
                    "a lower layer must not import a higher one"
                )
    return out


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or (prefix.endswith(".") and module.startswith(prefix))


def separation_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge from a backend to the reference, the dispatcher or the ops (``SEPARATE``)."""
    out = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            if any(_matches(module, a) and _matches(target, b) for a, b in SEPARATE):
                out.append(
                    f"{module} (backend) imports {target}: a backend never imports the "
                    "reference, the dispatcher or the ops (fallbacks are rules of "
                    "steppo_fast._dispatch; shared names live in steppo_fast._defs)"
                )
    return out


def problems(graph: dict[str, set[str]]) -> list[str]:
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return found + layer_violations(graph) + separation_violations(graph)


def to_text(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing)'}" for m in sorted(graph))


def to_dot(graph: dict[str, set[str]]) -> str:
    lines = ["digraph steppo_fast {", "  rankdir=BT; node [shape=box, fontsize=10];"]
    for module in sorted(graph):
        label = module.removeprefix("steppo_fast.") if module != PACKAGE else PACKAGE
        lines.append(f'  "{module}" [label="{label}"];')
        lines += [f'  "{module}" -> "{target}";' for target in sorted(graph[module])]
    return "\n".join([*lines, "}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 on problems")
    args = parser.parse_args(argv)
    graph = edges(discover())
    if not args.check:
        print(to_dot(graph) if args.dot else to_text(graph))
    found = problems(graph)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
