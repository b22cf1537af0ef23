"""The layering of ARCHITECTURE.md, checked on the source: imports point down, never in a circle.

Every module under src/ditlab is parsed with `ast` (nothing is imported). A module may import
modules of a lower layer, or of its own unit; train and eval never import each other, nor do
the L1 packages. Only cli.py imports ditlab modules inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ditlab"

# A unit is a top-level module or package of ditlab; some share one (`diffusion` is the
# official-name alias of `objectives`, `sampling` belongs with `runs`, L0 is one foundation).
UNIT = {"diffusion": "objectives", "sampling": "runs", "config": "base", "errors": "base", "io": "base",
        "__init__": "base", "__main__": "cli"}
LAYER = {"base": 0, "models": 1, "codecs": 1, "data": 1, "objectives": 1, "runs": 2, "train": 3, "eval": 3,
         "commands": 4, "experiments": 4, "cli": 5}


def unit_of(module: str) -> str:
    first = module.split(".")[1] if "." in module else "__init__"
    return UNIT.get(first, first)


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = SRC) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported ditlab module, line, inside a function) for every import of ditlab in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("ditlab"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("ditlab"):
                for a in child.names:  # `from ditlab.x import y`: y is a module when one of that name exists
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in known else child.module, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def edges(root: Path = SRC) -> list[tuple[str, str, int, bool]]:
    mods = modules(root)
    known = set(mods)
    return [(m, target, line, fn) for m, path in mods.items() for target, line, fn in imports(path, known)]


def upward_imports(root: Path = SRC) -> list[str]:
    wrong = []
    for source, target, line, _ in edges(root):
        su, tu = unit_of(source), unit_of(target)
        if su != tu and LAYER[tu] >= LAYER[su]:
            wrong.append(f"{source}:{line} imports {target} (layer {LAYER[tu]} from layer {LAYER[su]})")
    return wrong


def find_cycle(root: Path = SRC) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for source, target, _, _ in edges(root):
        if source != target:
            graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in modules()}
    assert units <= set(LAYER), units - set(LAYER)


def test_imports_point_down():
    wrong = upward_imports()
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    cycle = find_cycle()
    assert cycle is None, " -> ".join(cycle)


def test_only_the_cli_imports_ditlab_lazily():
    lazy = [f"{s}:{line} imports {t}" for s, t, line, fn in edges() if fn and unit_of(s) != "cli"]
    assert not lazy, "\n".join(lazy)


@pytest.mark.parametrize("file, line, expect", [
    ("models/dit.py", "from ditlab.train import trainer", "upward"),  # L1 -> L3
    ("train/trainer.py", "from ditlab.eval import metrics", "upward"),  # train and eval are peers
    ("objectives/flow.py", "from ditlab import models", "upward"),  # objectives never import models
    ("models/layers.py", "import ditlab.models.dit", "cycle"),  # dit imports layers
])
def test_the_checks_catch_a_planted_import(tmp_path, file, line, expect):
    import shutil

    root = tmp_path / "ditlab"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__", "assets", "configs"))
    target = root / file
    target.write_text(target.read_text() + "\n" + line + "\n")
    if expect == "upward":
        assert any(file.replace("/", ".").removesuffix(".py") in w for w in upward_imports(root))
    else:
        assert find_cycle(root) is not None
