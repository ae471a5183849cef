"""The package's layers import downward only, and its modules import each other without cycles.

Every import counts, function-level ones included; only imports under ``if TYPE_CHECKING:``
(annotations, never run) are left out.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "wan_worker"
#: Bottom to top: a module may import its own layer and the layers before it.
LAYERS = ("contract", "infra", "runtime", "stages", "serving")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules (``layer.module``) that ``path`` imports: ``from wan_worker.layer.m
    import x``, ``from wan_worker.layer import m``, ``import wan_worker.layer.m``."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("wan_worker."):
            base = node.module.removeprefix("wan_worker.")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("wan_worker.") for a in node.names if a.name.startswith("wan_worker."))
    return (found & modules) - {module_name(path)}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        for dep in deps
        if rank[dep.split(".")[0]] > rank[module.split(".")[0]]
    )


def test_every_module_sits_in_a_layer_folder():
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


def test_layers_import_downward_only_and_without_cycles():
    graph = import_graph()
    assert {"runtime.models", "stages.enhance", "runtime.accel", "serving.worker", "serving.flow"} <= set(graph)
    assert "runtime.models" in graph["stages.enhance"]  # the graph sees real edges
    assert upward_imports(graph) == []
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_checker_finds_upward_imports_and_cycles_through_function_level_imports():
    graph = {"contract.a": {"stages.b"}, "stages.b": {"contract.a"}, "infra.c": set()}
    assert upward_imports(graph) == ["contract.a -> stages.b"]
    assert find_cycle(graph) in (["contract.a", "stages.b", "contract.a"], ["stages.b", "contract.a", "stages.b"])


def test_imports_of_reads_every_import_form(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "stages").mkdir()
    path = tmp_path / "stages" / "x.py"
    path.write_text(
        "from wan_worker.contract.jobs import Job\n"
        "import wan_worker.infra.net\n"
        "def f():\n    from wan_worker.runtime import models\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wan_worker.serving.worker import Worker\n"
    )
    modules = {"contract.jobs", "infra.net", "runtime.models", "serving.worker", "stages.x"}
    assert imports_of(path, modules) == {"contract.jobs", "infra.net", "runtime.models"}
