"""Documentation that must follow the code, and the demo that the Quickstart runs."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from scnas.cli.reference import render


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render(), \
        "docs/cli.md is out of date: run 'python -m scnas.cli.reference > docs/cli.md'"


def test_every_command_is_in_the_reference():
    text = render()
    for command in ("validate", "show", "diff", "convert", "schema", "genotype random", "build", "export-onnx", "info",
                    "draw", "data phantom", "data prepare", "data check", "search", "train", "predict", "evaluate",
                    "demo", "plan", "cv", "derive"):
        assert f"## `scnas {command}`" in text, command


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(cli, tmp_path):
    result = cli("demo", "-o", tmp_path / "demo", "--quick")
    assert result.code == 0, result
    assert "[9/9] evaluate" in result.out and "done in" in result.out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert 0.0 <= summary["validation_dice_mean"] <= 1.0 and summary["validation_cases"]
    for key in ("cells", "model", "onnx", "dice"):
        assert (tmp_path / "demo" / summary["files"][key].split("/demo/", 1)[1]).exists() or \
            __import__("pathlib").Path(summary["files"][key]).exists()
    assert cli("demo", "-o", tmp_path / "demo").code == 1      # never overwrites a demo folder
