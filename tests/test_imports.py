"""Dependencies run one way: no import cycle between or inside factorlm's packages, no private reach.

The import graph is read from the source with ``ast`` (module-level, function-level and
``TYPE_CHECKING`` imports alike: a lazy import hides a cycle, it does not remove it), so the
test needs no import of the package and names the file and line of every offending edge.

- (a) no cycle between top-level packages (``factorlm.passes``, ``factorlm.compress``...);
  ``errors``, ``_common`` and ``options`` are leaves anyone may import, so they import only leaves;
- (b) no cycle between the modules of one package;
- (c) no import of another package's private module or name (``_common`` is the shared home).

``ALLOWED_*`` hold the known edges that their owners are still removing; the lead empties them.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import factorlm

ROOT = Path(factorlm.__file__).parent
#: Top-level packages any package may import; they import only each other.
LEAVES = frozenset({"errors", "_common", "options"})

#: Known package edges that close a cycle, (importer, imported) -> owner and plan.
#: Remove an entry when its owner breaks the edge; the lead empties this list at the end.
ALLOWED_PACKAGE_EDGES: dict[tuple[str, str], str] = {}

#: Known module edges that close a cycle inside one package, (importer, imported) -> owner.
ALLOWED_MODULE_EDGES: dict[tuple[str, str], str] = {}

#: Known private imports across packages, (importer module, "module:name") -> owner.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    """One import: importer module, imported module, the names it takes, and where."""

    source: str
    target: str
    names: tuple[str, ...]
    where: str


def module_name(path: Path, root: Path = ROOT) -> str:
    """``factorlm.x.y`` for ``root/x/y.py`` (``factorlm.x`` for ``root/x/__init__.py``)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_imports(
    source: str, module: str, *, is_package: bool, known: Iterable[str], where: str = ""
) -> list[Edge]:
    """Every ``factorlm`` import in ``source`` as edges to the modules of ``known``.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
    """
    modules = set(known)
    package = module if is_package else module.rpartition(".")[0]
    edges: list[Edge] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "factorlm" or alias.name.startswith("factorlm."):
                    edges.append(Edge(module, alias.name, (), f"{where}:{node.lineno}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target != "factorlm" and not target.startswith("factorlm."):
                continue
            plain: list[str] = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    edges.append(Edge(module, sub, (), f"{where}:{node.lineno}"))
                else:
                    plain.append(alias.name)
            if plain:
                edges.append(Edge(module, target, tuple(plain), f"{where}:{node.lineno}"))
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]  # importlib.import_module("factorlm.x"); f-strings are not seen
            name = arg.value if isinstance(arg, ast.Constant) else None
            if isinstance(name, str) and (name == "factorlm" or name.startswith("factorlm.")):
                edges.append(Edge(module, name, (), f"{where}:{node.lineno}"))
    return edges


def _is_import_module(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def collect(root: Path = ROOT) -> tuple[set[str], list[Edge]]:
    """All modules under ``root`` and every import edge between them."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    edges: list[Edge] = []
    for path in paths:
        edges += parse_imports(
            path.read_text(encoding="utf-8"),
            module_name(path, root),
            is_package=path.name == "__init__.py",
            known=modules,
            where=str(path.relative_to(root.parent)),
        )
    return modules, edges


def top(module: str) -> str:
    """The top-level package of a factorlm module (``factorlm`` itself for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle path ``[a, b, ..., a]`` per strongly connected component that has a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})

    def connect(v: str) -> None:  # Tarjan; graphs here are small, so recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in nodes:
        if v not in index:
            connect(v)
    cycles: list[list[str]] = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, set()):
            continue
        # Shortest path from start back to start inside the component (breadth first).
        parents: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt: list[str] = []
            for v in frontier:
                for w in sorted(graph.get(v, set()) & members):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        parents[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        assert end is not None
        path = [end]
        while path[-1] != start:
            path.append(parents[path[-1]])
        cycles.append([start, *reversed(path[:-1]), start] if end != start else [start, start])
    return cycles


def cycles_to_cut(graph: Mapping[str, set[str]], limit: int = 30) -> list[list[str]]:
    """Cycles until none is left, cutting each one's closing edge: every knot, not just one."""
    rest = {k: set(v) for k, v in graph.items()}
    found: list[list[str]] = []
    while len(found) < limit:
        cycles = find_cycles(rest)
        if not cycles:
            break
        for cycle in cycles:
            rest[cycle[-2]].discard(cycle[-1])
        found += cycles
    return found


def describe(cycle: list[str], where: Mapping[tuple[str, str], list[str]]) -> str:
    """``a -> b -> a`` with the first file:line of each edge."""
    hops = [
        f"  {a} -> {b}   ({', '.join(where[(a, b)][:2])})" for a, b in itertools.pairwise(cycle)
    ]
    return " -> ".join(cycle) + "\n" + "\n".join(hops)


def package_graph(
    edges: Iterable[Edge], allowed: Mapping[tuple[str, str], str] = ALLOWED_PACKAGE_EDGES
) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    for edge in edges:
        a, b = top(edge.source), top(edge.target)
        if a == b or (a, b) in allowed:
            continue
        graph.setdefault(a, set()).add(b)
        where.setdefault((a, b), []).append(f"{edge.where} imports {edge.target}")
    return graph, where


def module_graphs(
    edges: Iterable[Edge], allowed: Mapping[tuple[str, str], str] = ALLOWED_MODULE_EDGES
) -> tuple[dict[str, dict[str, set[str]]], dict[tuple[str, str], list[str]]]:
    graphs: dict[str, dict[str, set[str]]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    for edge in edges:
        pkg = top(edge.source)
        if pkg != top(edge.target) or edge.source == edge.target:
            continue
        if (edge.source, edge.target) in allowed:
            continue
        graphs.setdefault(pkg, {}).setdefault(edge.source, set()).add(edge.target)
        where.setdefault((edge.source, edge.target), []).append(edge.where)
    return graphs, where


def private_imports(edges: Iterable[Edge]) -> list[tuple[tuple[str, str], str]]:
    """Imports of a private module or name of another top-level package."""
    found: list[tuple[tuple[str, str], str]] = []
    for edge in edges:
        if top(edge.source) == top(edge.target):
            continue
        parts = edge.target.split(".")[1:]
        private_parts = [p for p in parts if p.startswith("_") and p != "_common"]
        if parts and parts[0] == "_common":
            private_parts = [p for p in parts[1:] if p.startswith("_")]
        names = [n for n in edge.names if n.startswith("_") and not n.startswith("__")]
        if private_parts:
            found.append(((edge.source, edge.target), f"{edge.where} imports {edge.target}"))
        for name in names:
            key = (edge.source, f"{edge.target}:{name}")
            found.append((key, f"{edge.where} imports {name} from {edge.target}"))
    return found


# --------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return collect()[1]


def test_the_graph_sees_the_package(edges: list[Edge]) -> None:
    modules, _ = collect()
    assert {"factorlm", "factorlm.planning", "factorlm.passes.analysis"} <= modules
    pairs = {(e.source, e.target) for e in edges}
    assert ("factorlm.planning.lowrank", "factorlm.planning.schema") in pairs
    assert ("factorlm.passes.kronecker", "factorlm.planning") in pairs


def test_no_cycle_between_top_level_packages(edges: list[Edge]) -> None:
    graph, where = package_graph(edges)
    cycles = cycles_to_cut(graph)
    assert not cycles, "import cycles between factorlm packages:\n" + "\n".join(
        describe(c, where) for c in cycles
    )


def test_leaves_import_only_leaves(edges: list[Edge]) -> None:
    bad = sorted(
        f"{e.where} imports {e.target}"
        for e in edges
        if top(e.source) in LEAVES
        and top(e.target) not in LEAVES | {top(e.source)}
        and (top(e.source), top(e.target)) not in ALLOWED_PACKAGE_EDGES
    )
    assert not bad, (
        f"{sorted(LEAVES)} are imported by anyone, so they import no other package:\n"
        + "\n".join(bad)
    )


def test_no_cycle_between_modules_of_one_package(edges: list[Edge]) -> None:
    graphs, where = module_graphs(edges)
    found = [describe(c, where) for graph in graphs.values() for c in cycles_to_cut(graph)]
    assert not found, "import cycles inside a package:\n" + "\n".join(found)


def test_no_private_import_across_packages(edges: list[Edge]) -> None:
    bad = [text for key, text in private_imports(edges) if key not in ALLOWED_PRIVATE]
    assert not bad, "private names of another package:\n" + "\n".join(sorted(bad))


def test_allow_lists_name_only_edges_that_exist(edges: list[Edge]) -> None:
    """A stale entry would hide a regression: every allowed edge must still be in the code."""
    packages = {(top(e.source), top(e.target)) for e in edges}
    modules = {(e.source, e.target) for e in edges}
    private = {key for key, _ in private_imports(edges)}
    stale = [k for k in ALLOWED_PACKAGE_EDGES if k not in packages]
    stale += [k for k in ALLOWED_MODULE_EDGES if k not in modules]
    stale += [k for k in ALLOWED_PRIVATE if k not in private]
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


# --------------------------------------------------------------------------- the checker itself


def _sample(tmp_path: Path, files: Mapping[str, str]) -> list[Edge]:
    root = tmp_path / "factorlm"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return collect(root)[1]


def test_the_checker_finds_a_lazy_package_cycle_and_names_its_path(tmp_path: Path) -> None:
    edges = _sample(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "from factorlm.b.x import f\n",
            "b/__init__.py": "",
            "b/x.py": "def f():\n    from factorlm.c import g\n",
            "c.py": "import importlib\nimportlib.import_module('factorlm.a')\n",
            "errors.py": "",
        },
    )
    cycles = find_cycles(package_graph(edges, {})[0])
    assert cycles == [["a", "b", "c", "a"]]


def test_the_checker_finds_a_module_cycle_and_private_imports(tmp_path: Path) -> None:
    edges = _sample(
        tmp_path,
        {
            "__init__.py": "",
            "p/__init__.py": "",
            "p/one.py": "from factorlm.p import two\n",
            "p/two.py": "from .one import X\n",
            "p/_hidden.py": "",
            "q.py": "from factorlm.p import _hidden\nfrom factorlm.p.one import _y, __version__\n"
            "from factorlm._common.files import sha\nfrom factorlm._common._x import z\n",
        },
    )
    graphs, _ = module_graphs(edges, {})
    assert find_cycles(graphs["p"]) == [["factorlm.p.one", "factorlm.p.two", "factorlm.p.one"]]
    keys = sorted(key for key, _ in private_imports(edges))
    assert keys == [
        ("factorlm.q", "factorlm._common._x"),
        ("factorlm.q", "factorlm.p._hidden"),
        ("factorlm.q", "factorlm.p.one:_y"),
    ]
