"""The static import graph of a Python package, read from its source with ``ast``.

Used by ``tests/test_import_graph.py``, which holds the rules; ``python
tests/test_import_graph.py`` prints a readable report (cycles, rule violations, function-level
imports per file).

Nodes are modules: ``pkg/a/b.py`` is ``pkg.a.b``; ``pkg/a/__init__.py`` is the package node
``pkg.a`` (a folder without ``__init__.py`` is a namespace package and has no node: it runs no
code). Every import statement counts wherever it stands (module level, class body, function,
``if TYPE_CHECKING``): a function-level import is a dependency that is only deferred. So does
``importlib.import_module("pkg....")`` with a literal name.

Import targets:
* ``import pkg.a.b`` and ``from pkg.a import b`` (``b`` a submodule) import ``pkg.a.b``;
* ``from pkg.a import name`` (``name`` not a submodule) imports ``pkg.a``;
* relative imports are resolved against the importer's package.

Parent packages: importing ``pkg.a.b`` first runs ``pkg/__init__`` and ``pkg/a/__init__``, so it
also has an *implied* edge to each of those packages, except the packages that contain the
importer (and the importer itself). Python has already started those before the importer runs
(a child module is only ever executed after its parent package), so importing them again is a
no-op: an edge from ``pkg.a.b`` to its own parent ``pkg.a`` would only invent a cycle with every
``__init__`` that imports its children. A cycle through a parent's ``__init__`` that can fail at
run time needs the child to take a *name* from that ``__init__`` (``from pkg.a import thing``),
and that explicit import is always an edge.
"""
from __future__ import annotations

import ast
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    file: Path
    line: int
    in_function: bool  # not run when the importer is imported
    implied: bool  # a parent package run by importing one of its submodules

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ImportGraph:
    package: str
    modules: dict[str, Path]  # module name -> source file
    imports: list[Import]  # imports of the package's own modules, self-imports left out
    unresolved: list[tuple[str, str]]  # (file:line, imported name) naming no module here

    def edges(self) -> dict[str, set[str]]:
        graph = {module: set() for module in self.modules}
        for imp in self.imports:
            graph[imp.importer].add(imp.target)
        return graph

    def first_import(self, importer: str, target: str) -> Import:
        return min((i for i in self.imports if i.importer == importer and i.target == target),
                   key=lambda i: (i.implied, i.in_function, i.line))


def module_name(package_dir: Path, file: Path) -> str:
    parts = [package_dir.name, *file.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_import_graph(package_dir: Path, root: Path | None = None) -> ImportGraph:
    """The import graph of the package in ``package_dir`` (its name is the folder's name).

    File paths in the graph are relative to ``root`` (default: the folder above the package).
    """
    package_dir = Path(package_dir)
    root = Path(root) if root else package_dir.parent
    package = package_dir.name
    files = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(package_dir, f): f for f in files}
    graph = ImportGraph(package, {m: f.relative_to(root) for m, f in modules.items()}, [], [])
    for module, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node, in_function in _import_nodes(tree):
            for base, name, line in _targets(node, module, file.name == "__init__.py"):
                _add(graph, module, base, name, line, in_function)
    graph.imports = list(dict.fromkeys(graph.imports))  # `from m import a, b`: one import of m
    return graph


def _import_nodes(tree: ast.AST):
    """(import node, inside a function?) for every import in a module, in source order."""
    stack = [(tree, False)]
    found = []
    while stack:
        node, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            child_in_function = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) or _is_import_module(child):
                found.append((child, in_function))
            stack.append((child, child_in_function))
    return sorted(found, key=lambda item: item[0].lineno)


def _is_import_module(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = node.args[0]
    return (name == "import_module" and isinstance(first, ast.Constant)
            and isinstance(first.value, str))


def _targets(node: ast.AST, module: str, is_package: bool):
    """(dotted name, name imported from it or None, line) of each import in an import node."""
    if isinstance(node, ast.Call):  # importlib.import_module("pkg.x")
        yield node.args[0].value, None, node.lineno
    elif isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, None, node.lineno
    else:
        base = _from_base(node, module, is_package)
        for alias in node.names:
            yield base, (None if alias.name == "*" else alias.name), node.lineno


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _add(graph: ImportGraph, importer: str, base: str, name: str | None, line: int,
         in_function: bool) -> None:
    """The import of ``base`` (``from base import name``: of the submodule ``name`` if any)."""
    if not _contains(graph.package, base):
        return
    if name and f"{base}.{name}" in graph.modules:
        target = f"{base}.{name}"
    elif base in graph.modules:
        target = base
    else:
        graph.unresolved.append((f"{graph.modules[importer]}:{line}", base))
        return
    file = graph.modules[importer]
    if target != importer:
        graph.imports.append(Import(importer, target, file, line, in_function, implied=False))
    for parent in _parents(target):
        if parent in graph.modules and not _contains(parent, importer):
            graph.imports.append(Import(importer, parent, file, line, in_function, implied=True))


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _contains(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


# --- cycles -------------------------------------------------------------------------------------

def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative), components of more than one module only."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(components)


def find_cycles(graph: ImportGraph) -> list[list[str]]:
    """A shortest cycle through each module that is on one, without repeats.

    Each cycle is a list ``[a, b, ..., a]`` starting at its alphabetically first module;
    shortest cycles first.
    """
    edges = graph.edges()
    cycles = set()
    for component in strongly_connected_components(edges):
        members = set(component)
        for start in component:
            path = _shortest_path(edges, start, start, members)
            first = path.index(min(path[:-1]))
            cycles.add(tuple(path[first:-1] + path[:first] + [path[first]]))
    return [list(c) for c in sorted(cycles, key=lambda c: (len(c), c))]


def _shortest_path(edges, start: str, goal: str, allowed: set[str]) -> list[str]:
    """Breadth-first: the shortest import chain start -> ... -> goal (start == goal: a cycle)."""
    previous = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges.get(node, ())):
            if child not in allowed or child in previous:
                continue
            previous[child] = node
            if child == goal:
                path = [goal]
                while path[-1] != start or len(path) == 1:
                    path.append(previous[path[-1]])
                return path[::-1]
            queue.append(child)
    return []


def reach_path(graph: ImportGraph, start: str, goal: str) -> list[str]:
    """The shortest import chain from ``start`` to ``goal`` ([] when it does not reach it)."""
    return _shortest_path(graph.edges(), start, goal, set(graph.modules))


def describe_chain(graph: ImportGraph, chain: list[str]) -> str:
    """``a -> b -> a`` followed by where each import is written."""
    steps = []
    for importer, target in zip(chain, chain[1:]):
        imp = graph.first_import(importer, target)
        how = " (runs its __init__)" if imp.implied else ""
        steps.append(f"    {importer} -> {target}  at {imp.where()}{how}")
    return " -> ".join(chain) + "\n" + "\n".join(steps)


def function_level_imports(graph: ImportGraph) -> Counter:
    """Import statements of the package's own modules written inside functions, per file."""
    statements = {(i.file, i.line) for i in graph.imports if i.in_function and not i.implied}
    return Counter(str(file) for file, _ in statements)
