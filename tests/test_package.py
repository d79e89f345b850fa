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
                for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands, "README has no Quickstart commands"
    for command in commands:
        assert command in ci, f".ci/run does not run README's {command!r}"


def test_no_unsafe_loading_in_the_package():
    for path in (ROOT / "scnas").rglob("*.py"):
        text = path.read_text()
        assert "yaml.load(" not in text and not re.search(r"(?<![.\w])(eval|exec)\(", text), path
        assert not re.search(r"^\s*(import|from) (c?pickle|dill|joblib)\b", text, re.M), path
        assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", text)), path
