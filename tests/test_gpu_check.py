"""benchmarks/gpu_check.py, the one command that checks every GPU claim: its CPU form runs here
so that the script cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    from conftest import load_script

    return load_script(SCRIPT)


def run_script(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "-o", str(out), "--work",
                           str(tmp_path / "work"), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tmp_path)
    return done, (json.loads(out.read_text()) if out.exists() else {})


def test_device_names_become_file_names():
    gpu_check = load_gpu_check()
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"
    assert gpu_check.slug("???") == "device"


def test_a_command_past_its_time_is_stopped_with_its_whole_process_group(tmp_path):
    gpu_check = load_gpu_check()
    started = time.perf_counter()
    # the shell's child (sleep) is in the group too: a kill of the shell alone would leave it running
    status, seconds, text = gpu_check.stream(["bash", "-c", "sleep 30 & echo child $!; wait; echo never"], "", 1.5,
                                             dict(os.environ), tmp_path)
    assert status is None and seconds < 10 and time.perf_counter() - started < 10
    assert "never" not in text
    child = Path(f"/proc/{int(text.split()[1])}")
    for _ in range(50):   # killed; reaped by init a moment later
        if not child.exists() or "State:\tZ" in (child / "status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child process outlived the timeout")


def test_the_printed_json_report_is_found_among_other_lines():
    gpu_check = load_gpu_check()
    assert gpu_check.json_in('note: x\n{\n "passed": true,\n "checks": []\n}\n') == {"passed": True, "checks": []}
    assert gpu_check.json_in("no report here") is None


@pytest.mark.slow   # the script in a child process: ~7 s of CPU
def test_items_past_the_budget_are_skipped_and_say_so(tmp_path):
    done, result = run_script(tmp_path, "--quick", "--budget", "1", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("cli", "memory", "speed", "augmentation"):
        assert result["items"][name]["status"] == "skipped"
        assert result["items"][name]["reason"].startswith("time budget")
    assert result["items"]["compile"] == {"status": "skipped", "reason": "CUDA only"}
    assert not any(r["status"] == "holds" for r in result["goals"] if r["item"] != "preflight")
    assert "==== gpu_check summary ====" in done.stdout
    assert "goals: 1 hold, 0 fail, 5 skipped" in (tmp_path / "gpu.txt").read_text()   # preflight's --help


@pytest.mark.slow
def test_the_cpu_form_runs_every_item_and_claims_nothing_it_cannot_measure(tmp_path):
    done, result = run_script(tmp_path, "--quick", "--budget", "1500")   # a busy CI machine must not cut items
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert result["device"] == "cpu" and result["quick"] is True
    assert {n: i["status"] for n, i in result["items"].items()} == {
        "cli": "done", "memory": "done", "speed": "done", "augmentation": "done", "compile": "skipped"}
    goals = result["goals"]
    assert not any(r["status"] == "FAILS" for r in goals)
    # the command line ran on the CPU, each command judged by its exit status
    held = {r["goal"].split(" ")[1] for r in goals if r["status"] == "holds" and r["goal"].startswith("`scnas ")}
    assert {"data", "search", "train", "predict", "export-onnx", "plan"} <= held
    # the background plan is given its share of the cores; the other commands choose their own threads
    assert result["data"]["memory"]["commands"]["plan uresnet"]["threads"] >= 1
    assert result["data"]["cli"]["commands"]["search fp16"]["threads"] is None
    assert any(r["status"] == "holds" and "verification passes" in r["goal"] for r in goals)
    assert any(r["status"] == "holds" and "CPUExecutionProvider" in r["goal"] for r in goals)
    # the GPU goals were measured at tiny sizes (the code ran) but are not judged on a CPU
    measured_elsewhere = [r for r in goals if r["item"] in ("memory", "speed", "augmentation")
                          and not r["goal"].startswith("`scnas ")]
    assert measured_elsewhere and all(r["status"] in ("skipped", "info") for r in measured_elsewhere)
    assert all(r["note"] for r in goals if r["status"] == "skipped")
    assert any("planner within" in r["goal"] and "GiB measured" in r["measured"] for r in goals)
    assert result["data"]["speed"]["sliding_window"]["rows"] and result["data"]["augmentation"]["train_step"]
    assert "goal" in done.stdout and "==== gpu_check summary ====" in done.stdout
