"""The README's printed outputs against real runs: every number it shows comes from a command
that CI runs (issue 17). Results depend on the kind of CPU and the thread count; the demos run on
one thread unless told otherwise, so on the machine the README names they are exact."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import ROOT
from scnas.cli.demo_commands import summary_lines

README = (ROOT / "README.md").read_text()
DEMO_RUN = os.environ.get("SCNAS_DEMO_RUN")


def readme_block(command: str) -> list[str]:
    """The lines a README console block prints after ``$ COMMAND`` (up to the next prompt or fence)."""
    lines = README.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"$ {command}"))
    out = []
    for line in lines[start + 1:]:
        if line.startswith("$ ") or line.startswith("```"):
            break
        out.append(line)
    return out


def minutes_promised() -> tuple[int, int]:
    low, high = re.search(r"(\d+) to (\d+) minutes on 2\s+CPU cores", README).groups()
    return int(low), int(high)


@pytest.mark.skipif(not DEMO_RUN, reason="needs a finished 'scnas demo -o demo-run' in SCNAS_DEMO_RUN (.ci/run sets it)")
def test_the_quickstart_shows_what_the_demo_printed():
    summary = json.loads((Path(DEMO_RUN) / "summary.json").read_text())
    summary["genotype"] = "demo-run/search/genotype.yaml"   # as the README's command names its folder
    summary["files"] = {k: "demo-run/" + v.split("/demo-run/", 1)[-1].removeprefix("demo-run/")
                        for k, v in summary["files"].items()}
    done, files = (line.strip() for line in summary_lines(summary, "demo-run"))
    shown = [line for line in README.split("\n") if line.startswith("done in ")]
    assert len(shown) == 1
    assert shown[0].split(". ", 1)[1] == done.split(". ", 1)[1], "the README's demo result is not this run's"
    assert files in README
    low, high = minutes_promised()
    seconds_shown = int(re.match(r"done in (\d+) s", shown[0]).group(1))
    assert 60 * low <= seconds_shown <= 60 * high   # the example agrees with the range the text states
    # (the run's own time is not asserted: speed is measured in benchmarks, and CI machines vary)


@pytest.mark.slow
def test_the_search_demo_prints_what_the_readme_shows(cli, tmp_path):
    shown = readme_block("scnas search --demo -o demo-search")
    result = cli("--threads", "1", "search", "--demo", "-o", tmp_path / "demo-search")
    assert result.code == 0, result
    printed = [line.replace(str(tmp_path) + "/", "") for line in result.out.strip().split("\n")]
    assert printed == shown


@pytest.mark.parametrize("command", ["scnas validate uresnet tests/conformance/invalid/unknown-op.yaml",
                                     "scnas build uresnet --stem 68 --in-channels 4 --classes 3 --patch 128 128 128"])
def test_the_readme_blocks_that_print_figures_show_what_the_command_prints(cli, command, monkeypatch):
    import shlex

    monkeypatch.chdir(ROOT)
    result = cli(*shlex.split(command)[1:])
    printed = (result.out + result.err).split("\n")
    shown = [line for line in readme_block(command) if line.strip() and line.strip() != "..."]
    assert shown
    for line in shown:   # "(... )" in the README shortens a long note: the text before it must match
        head = line.split("...")[0].rstrip("( ")
        assert any(p.startswith(head) for p in printed), f"README shows {line!r}; the command printed:\n{result.out}"
