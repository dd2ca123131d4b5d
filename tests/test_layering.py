"""ptfast's import graph: no circles (lazy imports inside functions count too) and data flowing one way.

Layers, lowest first: ``_env``/``errors``/``config``/``__version__``/``_native_spec`` → ``kernels`` → ``ops`` and
``native`` → ``_cache``/``_table_encoder``/``encoder``/``prefix_encoder`` → ``bank_io`` → ``serving`` →
``integrations`` → ``bench`` and the CLI. A module may import from its own layer or below, never above (docs/design.md).
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ptfast")


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict:
    """``{module: {imported ptfast module, ...}}`` over every import statement, module-level or not."""
    modules = dict(_modules())
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module or "") if node.level else node.module
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in modules:  # "ptfast.kernels.common.alloc" -> "ptfast.kernels.common"
                    name = name.rpartition(".")[0]
                # ``from . import x`` names the enclosing package too: not an edge to its __init__
                if name and name != module and name.startswith("ptfast") and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def _cycles(graph: dict) -> list:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circles():
    graph = import_graph()
    graph = {m: {d for d in deps if d != "ptfast"} for m, deps in graph.items() if m != "ptfast"}  # the facade
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


LAYER = {
    "ptfast._env": 0,
    "ptfast.errors": 0,
    "ptfast.config": 0,
    "ptfast.__version__": 0,
    "ptfast._native_spec": 0,
    "ptfast.kernels": 1,
    "ptfast.ops": 2,
    "ptfast.native": 2,
    "ptfast._cache": 3,
    "ptfast._table_encoder": 3,
    "ptfast.encoder": 3,
    "ptfast.prefix_encoder": 3,
    "ptfast.bank_io": 4,
    "ptfast.serving": 5,
    "ptfast.integrations": 6,
    "ptfast.bench": 7,
    "ptfast.__main__": 7,
}


def _layer(module: str) -> int:
    while module not in LAYER:
        module = module.rpartition(".")[0]
        if not module:
            raise KeyError
    return LAYER[module]


@pytest.mark.parametrize("module", sorted(m for m in dict(_modules()) if m != "ptfast"))
def test_imports_flow_downwards(module):
    """A module imports from its own layer or below (the package facade ``ptfast`` aside)."""
    deps = import_graph()[module] - {"ptfast"}
    upward = sorted(d for d in deps if _layer(d) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports {[(d, _layer(d)) for d in upward]}"


def test_the_graph_is_read():
    """The reader finds known edges, lazy ones included (so an empty graph cannot pass the tests above)."""
    graph = import_graph()
    assert "ptfast.kernels.linear" in graph["ptfast.kernels.mlp_head"]
    assert "ptfast.kernels.mlp_head" in graph["ptfast.ops.mlp_head"]  # imported inside a function
    assert "ptfast._env" in graph["ptfast.native"]
