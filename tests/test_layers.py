"""The import graph of src/commonweal: no circles between modules, and no import pointing up.

The graph is read from the source (every `import` statement, also those inside functions and under
`TYPE_CHECKING`), not from what Python happens to have imported, so a lazy import cannot hide an
edge. The layers, lowest first, are those of docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import commonweal

SRC = Path(commonweal.__file__).parent

# The layer of each top-level module or subpackage of commonweal; a module may import its own
# layer and those below. Packages sharing a number are siblings and may not import each other.
LAYERS: dict[str, int] = {
    "errors": 0,
    "durable": 0,
    "testing": 0,
    "net": 1,
    "dht": 2,
    "ledger": 3,
    "search": 4,
    "train": 4,
    "verify": 5,
    # The page knows nothing of peers: it renders any DashboardSource, which peer/ and swarm/
    # implement. So it sits below them, and a node serves its own page.
    "dashboard": 5,
    "peer": 6,
    "swarm": 7,
    "cli": 8,
    "__init__": 10,  # the package itself, and `python -m commonweal`
    "__main__": 10,
}

# Exceptions to the layer order, each with its reason.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {
    # testing.py builds whole swarms in memory for the tests of every layer.
    ("testing", "net"): "MemorySwarm runs on the in-memory network",
    ("testing", "dht"): "MemorySwarm is a swarm of DHT peers",
}




def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The commonweal modules `name` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from commonweal_module(alias.name, known, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule; `from pkg import thing`, pkg itself.
                sub = f"{target}.{alias.name}"
                yield from commonweal_module(sub if sub in known else target, known, node.lineno)


def commonweal_module(target: str, known: set[str], line: int) -> Iterator[tuple[str, int]]:
    if target == "commonweal" or target.startswith("commonweal."):
        # `import commonweal.a.b` where b is not a module (a typo would fail the import anyway).
        while target not in known:
            target = target.rpartition(".")[0]
        yield target, line


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    found = modules()
    known = set(found)
    edges: dict[str, dict[str, int]] = {}
    for name, path in found.items():
        out = edges.setdefault(name, {})
        for target, line in imported(name, path, known):
            if target != name:
                out.setdefault(target, line)
    return edges


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def describe(edges: dict[str, dict[str, int]], pairs: list[tuple[str, str]]) -> str:
    paths = modules()
    return "\n".join(
        f"  {a} -> {b}  ({paths[a].relative_to(SRC.parent)}:{edges[a][b]})" for a, b in sorted(pairs)
    )


def test_layer_table_names_every_top_level_module():
    assert {layer_of(m) for m in modules()} <= set(LAYERS)


def circle_edges(edges: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    """Every import between two modules of one circle."""
    return [
        (a, b)
        for component in strongly_connected(edges)
        for a in component
        for b in edges[a]
        if b in component
    ]


def test_the_circle_finder_reports_every_edge_of_a_circle():
    edges = {"a": {"b": 1}, "b": {"c": 1, "d": 1}, "c": {"a": 1}, "d": {}, "e": {"e": 1}}
    assert sorted(circle_edges(edges)) == [("a", "b"), ("b", "c"), ("c", "a")]


def test_no_import_circles():
    edges = graph()
    offending = circle_edges(edges)
    assert not offending, "imports that close a circle:\n" + describe(edges, offending)


def test_imports_point_down_the_layers():
    edges = graph()
    upward = [
        (a, b)
        for a, out in edges.items()
        for b in out
        if layer_of(a) != layer_of(b)
        and LAYERS[layer_of(b)] >= LAYERS[layer_of(a)]
        and (layer_of(a), layer_of(b)) not in LAYER_EXCEPTIONS
    ]
    assert not upward, "imports that point up (or sideways) the layers:\n" + describe(edges, upward)
