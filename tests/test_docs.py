"""Documentation that must follow the code, and the demo that the Quickstart runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
                    "demo", "plan", "cv", "derive", "export-bundle"):
        assert f"## `scnas {command}`" in text, command


@pytest.mark.slow
def test_the_demo_runs_the_whole_chain(cli, tmp_path):
    # CI runs the README's full demo first (SCNAS_DEMO_RUN): its folder is checked here rather
    # than running the whole chain a second time; elsewhere the quick demo runs.
    if os.environ.get("SCNAS_DEMO_RUN"):
        folder = Path(os.environ["SCNAS_DEMO_RUN"])
    else:
        folder = tmp_path / "demo"
        result = cli("demo", "-o", folder, "--quick")
        assert result.code == 0, result
        assert "[9/9] evaluate" in result.out and "done in" in result.out
    summary = json.loads((folder / "summary.json").read_text())
    assert 0.0 <= summary["validation_dice_mean"] <= 1.0 and summary["validation_cases"]
    for key in ("cells", "model", "onnx", "dice"):
        # summary.json names files as the demo was called: absolute, or relative to where it ran
        # (CI runs `scnas demo -o demo-run` in the folder that holds demo-run)
        written = Path(summary["files"][key])
        assert (written if written.is_absolute() else folder.parent / written).exists(), written
    assert (folder / "search" / "genotype.yaml").exists() and (folder / "train" / "model.safetensors").exists()
    assert cli("demo", "-o", folder).code == 1      # never overwrites a demo folder
