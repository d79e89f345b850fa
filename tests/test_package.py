"""Invariants of the package itself."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import ROOT


def test_genotype_package_does_not_import_torch():
    code = "import sys, scnas.genotype, scnas.cli.genotype_commands; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for block in re.findall(r"```(?:bash|sh)\n(.*?)```", quickstart, re.S)
                for line in block.splitlines() if line.strip() and not line.strip().startswith(("#", "git clone"))]
    assert len(commands) == 2, "README's Quickstart: clone, then command 1 (install, demo) and 2 (tests)"
    for command in commands:
        assert command in ci, f".ci/run does not run README's {command!r}"


def test_no_unsafe_loading_in_the_package():
    for path in (ROOT / "scnas").rglob("*.py"):
        text = path.read_text()
        assert "yaml.load(" not in text and not re.search(r"(?<![.\w])(eval|exec)\(", text), path
        assert not re.search(r"^\s*(import|from) (c?pickle|dill|joblib)\b", text, re.M), path
        assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", text)), path


# The rooms of the package by layer, lowest first; docs/development.md draws the same picture.
# A module may import its own room and the rooms of lower layers, never a room beside or above
# it; imports inside functions count. Every module must be in a room.
LAYERS = (
    {"base": ("scnas", "scnas.errors", "scnas.fileio", "scnas.byte_sizes", "scnas.defaults", "scnas.threads",
              "scnas.metrics", "scnas.figures", "scnas.progress", "scnas.records")},
    {"genotype": ("scnas.genotype",)},
    {"build": ("scnas.build",), "data": ("scnas.data",)},
    {"engine": ("scnas.engine",)},
    {"search": ("scnas.search",), "train": ("scnas.train",), "export": ("scnas.export",)},
    {"apps": ("scnas.apps",), "integrations": ("scnas.integrations",)},
    {"cli": ("scnas.cli", "scnas.__main__")},
)
TORCH_FREE = ("scnas.genotype", "scnas.defaults", "scnas.engine.settings", "scnas.byte_sizes")
"""Modules that import no torch, not even through the scnas modules they import."""


def _modules() -> dict[str, tuple]:
    """Every module of the package: name -> (path, parsed source)."""
    root = ROOT / "scnas"
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("scnas", *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ast.parse(path.read_text()))
    return modules


def _imports(modules) -> dict[str, set[str]]:
    """name -> what it imports, at the top or inside functions: scnas modules by their full name
    (``from scnas.build import ops`` is scnas.build.ops), anything else by its top-level package.
    The lazy re-exports in the package's own ``__init__`` (``scnas.build_network``...) are left
    out: they are what the package offers, not what it needs."""
    graph = {}
    for name, (path, tree) in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in _import_nodes(tree, lazy=name != "scnas"):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("scnas"):
                    while target not in modules:  # import scnas.build.ops.X -> scnas.build.ops
                        target = target.rpartition(".")[0]
                    found.add(target)
                else:
                    found.add(target.partition(".")[0])
        graph[name] = found - {name}
    return graph


def _import_nodes(tree, lazy: bool):
    """The import statements of a module, with those inside functions when ``lazy``."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif lazy or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo += ast.iter_child_nodes(node)


def _room(module: str) -> tuple[int, str] | None:
    """(layer, room) of a module; None when no room holds it."""
    for level, rooms in enumerate(LAYERS):
        for room, members in rooms.items():
            if any(module == member or (member != "scnas" and module.startswith(member + "."))
                   for member in members):
                return level, room
    return None


def test_every_module_has_a_room_and_imports_only_downwards():
    graph = _imports(_modules())
    homeless = [name for name in graph if _room(name) is None]
    assert homeless == [], "put these modules in a room of LAYERS (and docs/development.md)"
    wrong = []
    for name, targets in graph.items():
        level, room = _room(name)
        for target in sorted(t for t in targets if t.startswith("scnas")):
            target_level, target_room = _room(target)
            if target_room != room and target_level >= level:
                wrong.append(f"{name} ({room}) imports {target} ({target_room})")
    assert wrong == []


def test_the_torch_free_modules_reach_no_torch():
    graph = _imports(_modules())
    for start in TORCH_FREE:
        seen, todo = set(), [name for name in graph if name == start or name.startswith(start + ".")]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += [target for target in graph[name] if target.startswith("scnas")]
        assert not [name for name in seen if "torch" in graph[name]], start


def test_no_import_cycles_even_inside_functions():
    graph = _imports(_modules())
    graph = {name: {t for t in targets if t in graph} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                stack = path + [name]
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert cycles == []


def test_the_layers_in_the_docs_are_the_tested_ones():
    text = (ROOT / "docs" / "development.md").read_text()
    drawn = text.split("<!-- layers -->", 2)[1]
    lines = [line.strip() for line in drawn.strip().strip("`").strip().splitlines()]
    expected = [", ".join(rooms) for rooms in reversed(LAYERS)]
    assert [line.split(":")[0] for line in lines] == expected
    base = lines[-1].split(":", 1)[1]
    assert [name.strip() for name in base.split(",")] == [m.removeprefix("scnas.") for m in LAYERS[0]["base"][1:]]


MEASUREMENT_OR_HISTORY = re.compile(
    r"\bissue \d+|\b[ABH]\d00\b|\b\d+(\.\d+)?\s*ms\b|\b\d+\.\d+\s*s\b|\btook \d|\b\d+ of \d+ runs"
    r"|\bscnas \d+\.\d+\b|\b\d+(\.\d+)?x (faster|slower)\b")
"""Issue numbers, GPU models, timings, run counts, old versions: what goes stale in a docstring."""


def test_docstrings_carry_no_measurements_or_history():
    # Docstrings say what and why; figures live in docs/benchmarks.md, history in commit messages.
    found = []
    for name, (path, tree) in _modules().items():
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            for statement in body if isinstance(body, list) else []:
                if (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                        and isinstance(statement.value.value, str)):
                    found += [f"{name}:{statement.lineno}: {match.group(0)!r}"
                              for match in MEASUREMENT_OR_HISTORY.finditer(statement.value.value)]
    assert found == []
