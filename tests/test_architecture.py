"""Layer rules of the package (issue 12; ``../shared/docs/design.md``), checked on the source's imports:

    structures, ops, config, io, console  (ground floor)
      ◄ data, modeling, supervision        (each imports only the ground floor and itself)
      ◄ methods ◄ engine ◄ recipes ◄ cli

Every ``import`` statement counts, also those inside functions: a lazy import is still a dependency. A
module may import its own package and any lower layer, never a higher one or a sibling package of its
layer, and the module graph has no cycle. The engine drives methods without branching on their names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import boxmask.config
from boxmask.methods import METHODS

SRC = Path(boxmask.config.__file__).resolve().parent

LAYERS = {
    "structures": 0, "ops": 0, "config": 0, "io": 0, "console": 0,
    "data": 1, "modeling": 1, "supervision": 1,
    "methods": 2,
    "engine": 3,
    "recipes": 4,
    "cli": 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("boxmask",) + parts)


def _imports(path: Path) -> set[str]:
    """boxmask modules imported anywhere in ``path`` (absolute names; ``from pkg import mod`` resolves to
    ``pkg.mod`` when ``mod`` is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "boxmask")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "boxmask":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_top_level_module_has_a_layer():
    tops = {_top(m) for m in _graph() if m != "boxmask"}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"


def test_no_import_goes_up_or_sideways():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _top(mod), _top(dep)
            if a == b:
                continue
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and LAYERS[a] > 0):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layer rules:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The parser sees relative, absolute and function-level imports (the check above cannot pass vacuously)."""
    deps = _imports(SRC / "modeling" / "solo_targets.py")
    assert "boxmask.ops" in deps
    deps = _imports(SRC / "engine" / "module.py")
    assert {"boxmask.methods", "boxmask.modeling", "boxmask.structures", "boxmask.config"} <= deps
    assert "boxmask.engine.inference" in deps, "a function-level import counts"


METHOD_NAMES = {m.key for m in METHODS.values()} | {m.title.lower() for m in METHODS.values()}


@pytest.mark.parametrize("path", sorted((SRC / "engine").glob("*.py")), ids=lambda p: p.name)
def test_engine_has_no_method_name_branch(path):
    """No comparison in the engine against a method's name (``supervision.type == "sim"`` and the like)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                bad += [v.value for v in values if isinstance(v, ast.Constant) and v.value in METHOD_NAMES]
    assert not bad, f"{path.name} compares against method names {bad}"


def test_methods_registry_matches_the_config_choices():
    from boxmask.config import SUPERVISION_TYPES

    assert set(METHODS) == set(SUPERVISION_TYPES)
    for key, cls in METHODS.items():
        assert cls.key == key and cls.title and cls.architectures
