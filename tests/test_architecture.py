"""The layers of the package, and the rule that imports only point down (docs/ARCHITECTURE.md).

Every `import` in every module is read from its source (ast), including imports inside functions.
A module may import modules of its own layer or of a lower one, never of a higher one, and no set of
modules may import each other in a circle. There is no allow-list: a new exception is a new layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "exaone"

# Lowest first. A module's layer is that of the longest prefix listed for it.
LAYERS = [
    ["exaone", "exaone.core"],  # the version; the empty core package (both by exact name only)
    ["exaone.core.errors"],
    ["exaone.core.config", "exaone.core.qmath"],
    ["exaone.core.kernels"],
    ["exaone.core.model", "exaone.core.sampling"],
    ["exaone.core.io"],
    ["exaone.core.formats"],
    # the TensorRT-LLM checkpoint format: what the loader needs to read one
    ["exaone.core.trtllm", "exaone.core.trtllm.names", "exaone.core.trtllm.linear",
     "exaone.core.trtllm.weight_only",
     "exaone.core.trtllm.config", "exaone.core.trtllm.reader"],  # fmt: skip
    ["exaone.core.loader"],
    ["exaone.core.reference", "exaone.core.generate", "exaone.core.trtllm.kv_calib"],
    ["exaone.core.trtllm.convert", "exaone.core.engine", "exaone.core.hub"],
    ["exaone.core.runner"],
    ["exaone.quant"],
    ["exaone.build"],
    ["exaone.eval"],
    ["exaone.serve"],
    ["exaone.cli"],
]


EXACT = {"exaone", "exaone.core"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            within = module == prefix or (module.startswith(prefix + ".") and prefix not in EXACT)
            if within and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return found


def imports(module: str, source: str | None = None) -> set[str]:
    """The exaone modules `module` imports, anywhere in its source (a name imported from a package
    resolves to its submodule when there is one)."""
    path = MODULES.get(module)
    tree = ast.parse(source if source is not None else path.read_text())
    is_package = path is not None and path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]).strip(".")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    found.discard(module)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_imports_point_down():
    upward = [
        f"{m} (layer {layer(m)}) imports {dep} (layer {layer(dep)})"
        for m, deps in sorted(GRAPH.items())
        for dep in sorted(deps)
        if layer(dep) > layer(m)
    ]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(map(str, cycles))


def test_the_checker_sees_imports_inside_functions():
    """Deferred imports count like top-level ones, and names resolve to the submodule imported."""
    source = "def f():\n    from exaone.core import loader\n    from exaone.core.io.manifest import now"
    assert imports("exaone.core.config", source) == {"exaone.core.loader", "exaone.core.io.manifest"}
