"""The package's layering (#18): imports only go down, and no two modules import each other, even lazily."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spinquant_onnx"
LAYERS = ["errors", "io", "graph", "rotation", "match", "rewrite", "core", "integrations", "cli"]


def _imports() -> dict[str, set[str]]:
    """module -> the spinquant_onnx modules it imports anywhere in its body (function-level imports too)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spinquant_onnx"):
                if node.module == "spinquant_onnx" or (PACKAGE.parent / node.module.replace(".", "/")).is_dir():
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("spinquant_onnx."))
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer() -> None:
    loose = [m for m in _imports() if m != "spinquant_onnx" and _layer(m) is None]
    assert loose == []


def test_imports_only_go_down() -> None:
    upward = [
        (module, target)
        for module, targets in _imports().items()
        for target in targets
        if _layer(module) is not None and _layer(target) is not None and _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = {m: {t for t in ts if t != m} for m, ts in _imports().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_passes_are_registered_in_pipeline_order() -> None:
    from spinquant_onnx.rewrite.base import registered

    expected = ["fuse_norms", "smooth", "r1", "r1_online", "r2", "r3", "float_channels", "r4"]
    assert [p.name for p in registered()] == expected
