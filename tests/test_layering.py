"""The package's import structure: no import cycle, no upward import from ``advantages``, no
``_private`` name imported across modules. Static (the source's import statements, function-level
ones included), so a lazy import cannot hide a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grpo_kernels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path):
    """(imported module, imported name or None) of every grpo_kernels import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grpo_kernels"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, None) if sub in MODULES else (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("grpo_kernels"):
                    yield alias.name, None


def _graph() -> dict:
    # a package's __init__ is not an edge of its submodules' imports (importing a.b runs a first anyway)
    return {m: {d for d, _ in _imports(p) if d != m and not m.startswith(d + ".")} for m, p in MODULES.items()}


def _cycle_from(graph: dict, start: str):
    stack = [(start, [start])]
    while stack:
        node, path = stack.pop()
        for dep in graph.get(node, ()):
            if dep == start:
                return path + [start]
            if dep not in path:
                stack.append((dep, path + [dep]))
    return None


#: the layers below the loss driver: checks -> options -> epilogue -> advantages / objective ...
CORE = ("checks", "options", "epilogue", "advantages", "validation", "objective", "verl_objective", "metrics",
        "autodiff", "advantage_kernels", "reference")


def test_no_import_cycle_in_the_core_layers():
    graph = _graph()
    for name in CORE:
        cycle = _cycle_from(graph, f"grpo_kernels.{name}")
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_advantages_imports_no_backend():
    deps = _graph()["grpo_kernels.advantages"]
    assert not any(d.startswith("grpo_kernels.backends") for d in deps), sorted(deps)
    assert deps <= {"grpo_kernels.checks", "grpo_kernels.epilogue"}, sorted(deps)


def test_no_private_name_imported_across_core_modules():
    for name in CORE + ("backends.base", "backends.torch_chunked", "backends.triton.row_kernels",
                        "backends.triton.objective_kernel", "backends.triton.advantages_kernel"):
        path = MODULES[f"grpo_kernels.{name}"]
        for module, imported in _imports(path):
            private = [p for p in module.split(".") + [imported or ""] if p.startswith("_")]
            assert not private, f"{name} imports {module}.{imported or ''}"
