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


def test_no_import_cycle_anywhere():
    graph = _graph()
    for name in MODULES:
        cycle = _cycle_from(graph, name)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _module_aliases(tree) -> dict:
    """local name -> grpo_kernels module, for every module imported under a name."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grpo_kernels"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("grpo_kernels") and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def test_no_private_name_used_across_any_modules():
    """Neither ``from grpo_kernels.x import _y`` nor ``x._y`` on an imported module, anywhere."""
    for name, path in MODULES.items():
        for module, imported in _imports(path):
            private = [p for p in module.split(".") + [imported or ""] if p.startswith("_") and p != "__init__"]
            assert not private, f"{name} imports {module}.{imported or ''}"
        tree = ast.parse(path.read_text())
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")


#: the float64 oracle is deliberately one naive, top-to-bottom function (it is what every fast path
#: is tested against); every other function stays short
LONG_FUNCTION_EXCEPTIONS = {"grpo_kernels.reference.reference_grpo_loss"}


def test_functions_and_modules_stay_short():
    for name, path in MODULES.items():
        text = path.read_text()
        assert len(text.splitlines()) <= 450, f"{name} has {len(text.splitlines())} lines (> 450)"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if f"{name}.{node.name}" not in LONG_FUNCTION_EXCEPTIONS:
                    assert length <= 80, f"{name}.{node.name} has {length} lines (> 80)"
