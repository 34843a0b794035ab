"""The package's import structure, as docs/design.md draws it: no import circles at module level, no
private (`_name`) imports across modules, and the backends never import the driver (`graphprune.pipeline`),
not even inside a function. Read from the source with `ast`, so it costs nothing to run."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import graphprune

PACKAGE = Path(graphprune.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path):
    """(imported name, at module level?) for every `from graphprune... import x` and `import graphprune...`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top = set()
    for statement in tree.body:  # module level, also inside top-level if/try blocks (optional imports)
        top.add(statement)
        for child in ast.walk(statement):
            if isinstance(statement, (ast.If, ast.Try)):
                top.add(child)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "graphprune":
                continue
            for alias in node.names:
                yield target, alias.name, node in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "graphprune":
                    yield alias.name, None, node in top


def test_no_import_circles_at_module_level():
    graph = nx.DiGraph()
    for module, path in MODULES.items():
        for target, name, top in _imports(module, path):
            if not top:
                continue
            for candidate in (f"{target}.{name}", target):
                if candidate in MODULES and candidate != module:
                    graph.add_edge(module, candidate)
    # a package importing its own members is how registries fill (criteria/__init__ -> criteria.flap);
    # a member importing its package back at module level would be a circle and is kept
    cycles = [c for c in nx.simple_cycles(graph)]
    assert cycles == [], cycles[:5]


def test_no_private_names_are_imported_across_modules():
    private = [f"{module} imports {target}.{name}" for module, path in MODULES.items()
               for target, name, _ in _imports(module, path)
               if name and name.startswith("_") and not name.startswith("__") and target != module]
    assert private == []


def test_backends_never_import_the_driver():
    offending = [f"{module} imports {target}" for module, path in MODULES.items()
                 if module.startswith("graphprune.backends")
                 for target, _, _ in _imports(module, path) if target.startswith("graphprune.pipeline")]
    assert offending == []
