"""Code versions: the hash of every project source file a module imports, transitively.

A job's id and a trained artifact's key hold the code version of the method (and of each metric,
model and the harness) that made them, so that no edit can leave a stale row or artifact in a
store. The version of module ``m`` covers ``m``'s own file and every module of ``bench`` or
``methods`` that an ``import`` statement anywhere in it names (inside functions too: bench
imports lazily), followed transitively. Imports under ``if TYPE_CHECKING:`` are not run and are
not followed. A package's ``__init__`` counts only where an import names the package itself
(``from bench.models import ModelBundle``), not when a submodule of it is imported: the
registration lists in ``methods/__init__.py`` do not make every method depend on every other.

The import graph is read from the files' syntax (``ast``), never by importing them, so the same
functions serve a copy of the tree (``root``) and ``tests/test_codeversion.py`` checks the graph
for cycles.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

from bench.paths import REPO

PACKAGES = ("bench", "methods")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The source file of project module ``name`` under ``root`` (a module or a package's
    ``__init__.py``), or None for a name outside the project or not a module (an attribute)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = Path(root).joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, skipping the bodies of ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


@cache
def _direct_imports(name: str, root: Path) -> tuple[str, ...]:
    """Project modules that ``name``'s file imports directly (sorted)."""
    path = module_file(name, root)
    if path is None:
        return ()
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b.c` binds a and runs a, a.b, a.b.c; the code used is a.b.c's
                if module_file(alias.name, root) is not None:
                    found.add(alias.name)
            continue
        if node.level:  # relative: from the package of this module
            pkg = name.split(".") if is_pkg else name.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if module_file(sub, root) is not None:  # `from pkg import submodule`
                found.add(sub)
            elif module_file(base, root) is not None:  # `from module import attribute`
                found.add(base)
    found.discard(name)
    return tuple(sorted(found))


def import_graph(root: Path = REPO) -> dict[str, tuple[str, ...]]:
    """Every project module under ``root`` and the project modules it imports."""
    graph = {}
    for pkg in PACKAGES:
        for f in sorted(Path(root, pkg).rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            name = ".".join(parts)
            graph[name] = _direct_imports(name, Path(root))
    return graph


def closure(name: str, root: Path = REPO) -> list[str]:
    """``name`` and every project module it imports, transitively (sorted)."""
    root = Path(root)
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        if m in seen or module_file(m, root) is None:
            continue
        seen.add(m)
        todo.extend(_direct_imports(m, root))
    return sorted(seen)


def cycles(graph: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module
    (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def code_version(*modules: str, root: Path = REPO) -> str:
    """Hash of the files of ``modules`` and of everything they import within the project: each
    file's path relative to ``root`` and its bytes."""
    root = Path(root)
    names = sorted({m for mod in modules for m in closure(mod, root)})
    h = hashlib.sha256()
    for m in names:
        f = module_file(m, root)
        assert f is not None
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def module_of(obj: object) -> str:
    """The module an object (a class, a function, or an instance of a class) was defined in."""
    mod = getattr(obj, "__module__", None)
    if not isinstance(mod, str) or isinstance(obj, str):
        mod = type(obj).__module__
    wrapped = getattr(obj, "__wrapped__", None)  # a registered metric: the statistic's module
    if wrapped is not None and getattr(wrapped, "__module__", None):
        mod = wrapped.__module__
    return mod
