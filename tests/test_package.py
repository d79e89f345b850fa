"""Invariants of the package itself."""

from __future__ import annotations

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


def test_layers_import_only_downwards():
    # train must not depend on export (nor the lower layers on train/export), lazy imports included.
    import ast
    from pathlib import Path

    import scnas

    root = Path(scnas.__file__).parent
    # integrations (nnU-Net, MONAI bundles) sit just below the CLI: they use train and export, and
    # nothing but the CLI uses them.
    above = ("scnas.integrations", "scnas.cli")
    forbidden = {"train": ("scnas.export", *above), "search": ("scnas.export", "scnas.train", *above),
                 "export": above, "build": ("scnas.export", "scnas.train", "scnas.search", *above),
                 "data": ("scnas.export", "scnas.train", "scnas.search", *above),
                 "genotype": ("scnas.build", "torch", *above), "integrations": ("scnas.cli",)}
    found = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                found += [f"{path.name}: {name}" for name in names if name.startswith(banned)]
    assert found == []
