"""The package shows the farm's two sides: builder/, client/ and what both use, common/.

Every import is counted, the ones inside functions too (they load as surely,
only later), so a cycle or a side reaching into the other fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "agent" / "nixfarm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The nixfarm modules that `path` imports, as dotted names."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name for name in names if name in MODULES) or found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module_name(path)}


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def side(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("builder", "client", "common") else "top"


def test_every_module_belongs_to_a_side() -> None:
    assert {side(m) for m in MODULES} == {"top", "builder", "client", "common"}
    # At the top: the package, `python -m nixfarm` and the command line that calls both sides.
    assert {m for m in MODULES if side(m) == "top"} == {"nixfarm", "nixfarm.__main__", "nixfarm.cli"}


def test_the_sides_do_not_reach_into_each_other() -> None:
    allowed = {
        "common": {"common", "top"},
        "builder": {"builder", "common", "top"},
        "client": {"client", "common", "top"},
    }
    crossing = [
        (m, dep)
        for m, deps in GRAPH.items()
        if side(m) in allowed
        for dep in deps
        if side(dep) not in allowed[side(m)] or dep == "nixfarm.cli"
    ]
    assert crossing == []


def test_no_import_cycles() -> None:
    """Depth-first search for a back edge; reports the first cycle found."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    cycles = [cycle for m in sorted(GRAPH) if m not in state and (cycle := visit(m))]
    assert cycles == []


def test_the_graph_sees_imports_inside_functions() -> None:
    """The checks above would pass on an empty graph: the lazy imports must be in it."""
    assert "nixfarm.builder.commands" in GRAPH["nixfarm.builder.gateway"]  # imported in run()
    assert "nixfarm.common.snapshot" in GRAPH["nixfarm.client.farmview"]  # imported in a function
    assert {"nixfarm.builder.commands", "nixfarm.client.commands"} <= GRAPH["nixfarm.cli"]
