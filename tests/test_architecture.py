"""The import graph of `app/` points one way: a module imports its own layer or the layers
below it, never one above, and no chain of imports comes back to where it started.

Every import counts, including those inside functions: an import moved into a function to
dodge a cycle at start-up is still a dependency a reader has to carry.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# Highest first. A module belongs to the layer of the longest prefix below that matches it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Assembles the application and runs it: builds the services, mounts the routers.
    ("entry", ("app.__main__", "app.cli", "app.main", "app.serve", "app.startup")),
    # Speaks HTTP, FHIR REST and HL7 v2: parses requests, calls services, renders answers.
    ("wire", ("app.fhir", "app.ingest", "app.web", "app.middleware", "app.auth.deps")),
    # The use cases: one write path for REST, Bundles and HL7, searches, reports, exports.
    ("services", ("app.services",)),
    # The database, the response engine and its report model, the HL7 v2 codec, the audit
    # trail, settings.
    ("domain", ("app.store", "app.engine", "app.hl7", "app.report", "app.audit", "app.settings")),
    # Who is asking and what they may do: tokens, principals, roles, the access policy.
    ("auth", ("app.auth",)),
    # The leaf: dates, errors, codes, limits, the request's identity, metrics and logging.
    ("kit", ("app.kit", "app.metrics", "app.logs")),
)
# The package itself (its docstring is the CLI's help text) matches no prefix of its own.
_TOP = "app"
_RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    if module == _TOP:
        return "kit"
    best, best_prefix = None, ""
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > len(best_prefix):
                best, best_prefix = name, prefix
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    names: tuple[str, ...]
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(APP.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(APP.rglob("*.py"))}


def _imports(modules: dict[str, Path]) -> Iterator[Import]:
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "app" or alias.name.startswith("app."):
                        yield Import(name, alias.name, (), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target != "app" and not target.startswith("app."):
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:  # `from app.kit import dates`
                        yield Import(name, submodule, (), node.lineno)
                    else:
                        yield Import(name, target, (alias.name,), node.lineno)


def _graph() -> tuple[dict[str, Path], list[Import]]:
    modules = _modules()
    return modules, list(_imports(modules))


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        layer_of(module)


def test_imports_point_down() -> None:
    _, imports = _graph()
    upward = [
        f"{i.importer} ({layer_of(i.importer)}) imports {i.imported} "
        f"({layer_of(i.imported)}), line {i.line}"
        for i in imports
        if _RANK[layer_of(i.imported)] < _RANK[layer_of(i.importer)]
    ]
    assert upward == []


def test_the_wire_reaches_the_database_only_through_services() -> None:
    """The wire builds no store objects (queries, criteria, rows): what it needs of the
    database is a service's to ask for, so the rules of a search or a write live in one
    layer."""
    _, imports = _graph()
    direct = [
        f"{i.importer} imports {i.imported}, line {i.line}"
        for i in imports
        if layer_of(i.importer) == "wire"
        and (i.imported == "app.store" or i.imported.startswith("app.store."))
    ]
    assert direct == []


def test_no_import_cycle() -> None:
    modules, imports = _graph()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for i in imports:
        # A package's __init__ re-exporting its own modules is not a dependency back on it.
        if i.imported in modules and not i.importer.startswith(i.imported + "."):
            edges[i.importer].add(i.imported)
    cycles = _cycles(edges)
    assert cycles == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_private_name_imported_from_another_module() -> None:
    """A leading underscore means "this module's business": a name another module needs
    is public, and lives where both can see it."""
    _, imports = _graph()
    private = [
        f"{i.importer} imports {name} from {i.imported}, line {i.line}"
        for i in imports
        for name in i.names
        if name.startswith("_") and name != "__doc__"
    ]
    assert private == []


def test_the_checks_catch_what_they_are_for() -> None:
    """The checks themselves: an upward edge ranks lower, a cycle is found."""
    assert _RANK[layer_of("app.services.resources")] > _RANK[layer_of("app.fhir.routes")]
    assert layer_of("app.auth.deps") == "wire"
    assert layer_of("app.auth.policy") == "auth"
    assert layer_of("app.kit.dates") == "kit"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
