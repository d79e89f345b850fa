"""Every GPU claim of scnas checked by one command: goal / measured / holds.

Items, in order of value, each in its own process (a crash or a hang costs one item, and CUDA
memory counts start from nothing):

1. preflight: the modules scnas needs, ``python -m scnas --help`` from the repository root;
2. cli: the command line on the device on a tiny phantom task: ``data phantom``; ``search`` and
   ``train`` with ``--amp fp16`` / ``bf16``, ``--checkpoint cells`` / ``edges`` and ``--compile``;
   ``predict --device cuda`` in fp16 (its labels beside float32's); ``export-onnx --fp16`` (loaded
   and run in onnxruntime; the CUDA provider only where onnxruntime has it);
3. memory: the planner against ``torch.cuda.max_memory_allocated`` for this code, training and
   search steps at 128^3 (benchmarks/train_memory.py and search_memory.py measure), and the
   paper's retraining (batch 8, 128^3, stem 68, fp16) as ``scnas plan`` plans it for 24 GiB;
4. speed: sliding window beside MONAI's, networks beside MONAI's DynUNet in nnU-Net's
   configuration, in one process (benchmarks/gpu_bench.py);
5. augmentation: the deferred augmentation's time on the device, a loader-fed training step
   against one on a fixed batch (benchmarks/data_bench.py);
6. compile: ``torch.compile`` of the stem-68 network's fp16 inference against eager.

A time budget (``--budget``, seconds) bounds the whole run: an item or step that would start
after it is skipped and says so, a running one is stopped at it. ``--quick`` is the CPU form
(tiny sizes; what CI runs): CUDA-only goals are listed as skipped with the reason, never as
holding. Exit status 1 when a goal fails or an item breaks.

Run (GPU): python benchmarks/gpu_check.py -o "$OUT/gpu-check.json"
Run (CPU, CI): python benchmarks/gpu_check.py --quick --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

GiB = 2**30
DENSE = str(ROOT / "docs" / "images" / "dense-genotype.yaml")
MODULES = ("torch", "numpy", "scipy", "pydantic", "yaml", "typer", "rich", "nibabel", "blosc2", "safetensors",
           "onnx", "onnxscript", "onnxconverter_common", "onnxruntime", "matplotlib", "graphviz", "monai")
CPU_ONLY_NOTE = "CUDA only: on the CPU this is emulated or measures something else"


def say(text: str) -> None:
    print(text, flush=True)


def slug(name: str) -> str:
    """A device name as a file name part: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def child_env(work: Path) -> dict:
    """The environment of every command: scnas importable from this checkout (no install
    needed), caches inside the work folder, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["SCNAS_CACHE"] = str(work / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stream(command: list[str], prefix: str, timeout: float, env: dict, cwd: Path) -> tuple[int | None, float, str]:
    """Run ``command`` in its own process group, echo its output lines with ``prefix``; stop the
    group at ``timeout`` seconds. Returns (exit status or None on timeout, seconds, the last
    200 lines)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=cwd, start_new_session=True, errors="replace")
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            del lines[:-200]
            print(f"{prefix}{line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status: int | None = process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)   # the group this call started, nothing else
        process.wait()
        status = None
    reader.join(timeout=5)
    return status, time.perf_counter() - started, "\n".join(lines)


class Item:
    """One item running in a child process: records goal rows and data into its result file
    after every row, so a run stopped at the budget keeps what it measured."""

    def __init__(self, name: str, args: argparse.Namespace):
        import torch

        self.name, self.args = name, args
        self.device = args.device
        self.cuda = args.device == "cuda"
        self.full = self.cuda and not args.quick
        self.work = Path(args.work)
        self.deadline = args.deadline
        self.out = Path(args.result)
        self.rows: list[dict] = []
        self.data: dict = {}
        self.env = child_env(self.work)
        self.lock = threading.RLock()   # commands run in threads record rows at once
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        from scnas.fileio import atomic_write_text

        atomic_write_text(self.out, json.dumps({"rows": self.rows, "data": self.data}, indent=1, default=str) + "\n")

    def record(self, goal: str, measured: str, holds: bool | None, status: str | None = None, note: str = "") -> None:
        status = status or {True: "holds", False: "FAILS", None: "skipped"}[holds]
        with self.lock:
            self.rows.append({"item": self.name, "goal": goal, "measured": measured, "holds": holds,
                              "status": status, "note": note})
            say(f"  -> {status}: {goal}: {measured}{f' ({note})' if note else ''}")
            self.save()

    def check(self, goal: str, measured: str, holds: bool, note: str = "") -> None:
        """A goal row: judged where it is meant (CUDA, full sizes), else measured but skipped."""
        if not self.full:
            self.record(goal, measured, None, "skipped", note or (CPU_ONLY_NOTE if not self.cuda else
                                                                 "--quick sizes say nothing about this goal"))
        else:
            self.record(goal, measured, bool(holds), note=note)

    def info(self, what: str, measured: str, note: str = "") -> None:
        self.record(what, measured, None, "info", note)

    def skip(self, goal: str, reason: str) -> None:
        self.record(goal, "", None, "skipped", reason)

    def not_measured(self, goal: str, why: str) -> None:
        """Skipped when the budget ran out, failed when something broke."""
        if why.startswith("time budget"):
            self.skip(goal, why)
        else:
            self.record(goal, why, False)

    def enough(self, seconds: float, goal: str) -> bool:
        """Whether ``seconds`` are left in the budget; if not, ``goal`` is recorded as skipped."""
        if self.left() >= seconds:
            return True
        self.skip(goal, f"time budget: needs ~{seconds:.0f} s, {max(0.0, self.left()):.0f} s left")
        return False

    def run(self, command: list[str], tag: str, cwd: Path | None = None, threads: int | None = None
            ) -> tuple[int | None, float, str]:
        """:func:`stream` until the deadline; past it, not started (status None, as if stopped).
        ``threads``: torch threads of the command (``SCNAS_THREADS``), else its own choice."""
        if self.left() < 2:
            return None, 0.0, ""
        env = self.env if threads is None else {**self.env, "SCNAS_THREADS": str(threads)}
        return stream(command, f"    [{tag}] ", self.left(), env, cwd or self.work)

    def scnas(self, tag: str, *args: str, threads: int | None = None) -> tuple[int | None, float, str]:
        """``python -m scnas ARGS`` (no console script needed), judged on its exit status."""
        status, seconds, text = self.run([sys.executable, "-m", "scnas", *args], tag, threads=threads)
        measured = f"exit {status}, {seconds:.1f} s"
        if status:
            measured += ": " + " / ".join(text.strip().splitlines()[-2:])[-300:]
        goal = f"`scnas {' '.join(Path(a).name if '/' in a else a for a in args)}` exits 0"
        with self.lock:
            self.data.setdefault("commands", {})[tag] = {"args": list(args), "exit": status, "seconds": seconds,
                                                         "threads": threads}
            if status is None:
                self.skip(goal, f"time budget: stopped after {seconds:.0f} s" if seconds else "time budget: not started")
            else:
                self.record(goal, measured, status == 0)
        return status, seconds, text


def json_in(text: str) -> dict | None:
    """The JSON object a command printed (from a line '{' to the last line '}')."""
    lines = text.splitlines()
    try:
        first = lines.index("{")
        last = len(lines) - 1 - lines[::-1].index("}")
        return json.loads("\n".join(lines[first:last + 1]))
    except ValueError:
        return None


def parallel(*jobs):
    """Run the callables at once (commands whose timings are not goals); returns their results."""
    results: list = [None] * len(jobs)

    def one(i, job):
        results[i] = job()

    threads = [threading.Thread(target=one, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- items -------------------------------------------------------------------------------------

def item_cli(it: Item) -> None:
    """The command line on the device, on a tiny phantom task."""
    dev = it.device
    if it.full:
        phantom = ["--cases", "6", "--channels", "4", "--classes", "4", "--shape", "64", "64", "48"]
        small = ["--stem", "8", "--patch", "32", "32", "32", "--epochs", "1", "--steps-per-epoch", "3", "--workers", "2"]
    else:
        phantom = ["--cases", "6", "--channels", "2", "--classes", "3", "--shape", "24", "24", "16"]
        small = ["--stem", "4", "--patch", "16", "16", "16", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0"]
    task = it.work / "task"
    status, _, _ = it.scnas("phantom", "data", "phantom", str(task), *phantom, "--spacing", "1", "1", "1", "--force")
    if status != 0:
        return
    data = ["--data", str(task), "--device", dev, "--seed", "0"]

    def search(amp, checkpoint):
        return lambda: it.scnas(f"search {amp}", "search", "-o", str(it.work / f"search-{amp}"), *data, *small,
                                "--amp", amp, "--checkpoint", checkpoint)

    if not it.enough(20, "search and train"):
        return
    if it.cuda:
        parallel(search("fp16", "cells"), search("bf16", "edges"))
    else:
        search("fp16", "cells")()
        it.skip("`scnas search --amp bf16 --checkpoint edges` exits 0", "CUDA form only (--quick runs one search)")
    found = it.work / "search-fp16" / "genotype.yaml"
    genotype = str(found) if found.exists() else "uresnet"
    train = ["train", "--batch-size", "2", *data, *small]

    def fit(amp, checkpoint, *extra, genotype=genotype):
        return lambda: it.scnas(f"train {amp}", *train[:1], genotype, *train[1:], "-o", str(it.work / f"train-{amp}"),
                                "--amp", amp, "--checkpoint", checkpoint, *extra)

    compiling: dict = {}
    if it.cuda:
        # the compiled run trains uresnet (the smallest graph) beside everything up to the export
        run = fit("bf16", "cells", "--compile", genotype="uresnet")
        compiling["thread"] = threading.Thread(target=lambda: compiling.update(result=run()), daemon=True)
        compiling["thread"].start()
        fit("fp16", "edges")()
    else:
        fit("bf16", "cells")()
        it.skip("`scnas train --compile` compiles (no eager fallback)",
                "CUDA form only: compiling a training step takes 30-60 s on 2 CPU cores")
    model = it.work / ("train-fp16" if it.cuda else "train-bf16") / "model.safetensors"
    if model.exists():
        predict_and_export(it, task, model)
    else:
        it.skip("predict and export", "time budget: not started" if it.left() < 2 else f"no model: {model.name} "
                                                                                    f"was not written")
    if compiling:
        compiling["thread"].join(timeout=max(1.0, it.left() + 5))
        text = compiling.get("result", (None, 0, ""))[2]
        compiled = re.search(r"compiled the network's forward and backward in ([0-9.]+) s", text)
        failed = re.search(r"--compile failed \(([^)]*)\)", text)
        it.record("`scnas train --compile` compiles (no eager fallback)",
                  f"compiled in {compiled.group(1)} s" if compiled else (failed.group(1) if failed else "no notice"),
                  bool(compiled))


def predict_and_export(it: Item, task: Path, model: Path) -> None:
    """``scnas predict`` (fp16; on CUDA also float32, labels compared) and ``export-onnx --fp16``."""
    import numpy as np

    dev = it.device
    image = sorted((task / "imagesTr").glob("*.nii.gz"))[0]

    def predict(amp):   # on CUDA with --tta: the mirroring on the device runs too
        return lambda: it.scnas(f"predict {amp}", "predict", str(model), "-i", str(image), "-o",
                                str(it.work / f"predict-{amp}"), "--device", dev, "--amp", amp,
                                *(["--tta"] if it.cuda else []))

    if it.enough(15, "`scnas predict` in fp16 and float32"):
        if it.cuda:
            parallel(predict("fp16"), predict("off"))
            import nibabel

            try:
                a, b = (np.asarray(nibabel.load(it.work / f"predict-{amp}" / image.name.replace("_0000", "")).dataobj)
                        for amp in ("fp16", "off"))
                it.info("fp16 prediction's labels = float32's (a model trained a few steps: near-ties, a lower bound)",
                        f"{(a == b).mean():.4%} of voxels")
            except (OSError, FileNotFoundError) as exc:
                it.info("fp16 prediction's labels = float32's", f"not compared: {exc}")
        else:
            predict("fp16")()
            it.skip("fp16 prediction's labels = float32's", "CUDA form only (fp16 is emulated on the CPU)")
    if not it.enough(20, "`scnas export-onnx --fp16`"):
        return
    onnx_file = it.work / "model-fp16.onnx"
    status, _, text = it.scnas("export-onnx fp16", "export-onnx", str(model), "-o", str(onnx_file), "--fp16", "--json")
    report = json_in(text) or {}
    it.record("`export-onnx --fp16` verification passes (onnxruntime against PyTorch)",
              ", ".join(f"{c.get('dtype')} {c.get('shape')}: max rel {c.get('max_rel', float('nan')):.1e}, labels "
                        f"{c.get('label_agreement', float('nan')):.2%}" for c in report.get("checks", []))
              or "no report", bool(report.get("passed")))
    if onnx_file.exists():
        import onnxruntime as ort

        providers = ort.get_available_providers()
        for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            goal = f"the fp16 ONNX file runs in onnxruntime's {provider}"
            if provider not in providers:
                it.skip(goal, f"unmeasured: this onnxruntime has {', '.join(providers)} (the CPU build)")
                continue
            try:
                session = ort.InferenceSession(str(onnx_file), providers=[provider])
                spec = session.get_inputs()[0]
                channels = spec.shape[1] if isinstance(spec.shape[1], int) else (4 if it.full else 2)
                x = np.random.default_rng(0).normal(size=(1, channels, 32, 32, 32)).astype(np.float32)
                started = time.perf_counter()
                out = session.run(None, {spec.name: x})[0]
            except Exception as exc:  # noqa: BLE001 - a provider that cannot load or run the file is the finding
                it.record(goal, f"{type(exc).__name__}: {str(exc).strip()[:200]}", False)
                continue
            it.record(goal, f"output {out.dtype} {list(out.shape)}, finite: {bool(np.isfinite(out).all())}, "
                            f"{time.perf_counter() - started:.2f} s", bool(np.isfinite(out).all()))


def measure_child(it: Item, script: str, *args: str) -> dict | None:
    """One configuration measured by a benchmark script's own fresh process (``--child``)."""
    status, _, text = it.run([sys.executable, str(BENCH / script), "--child", *args], script.split("_")[0], cwd=ROOT)
    if status != 0:
        return {"error": "time budget: stopped at the deadline" if status is None
                else (text.strip().splitlines() or ["no output"])[-1][-200:]}
    return json.loads(text.strip().splitlines()[-1])


def _predict(kind: str, *args) -> float:
    """The planner's peak (MiB) as the benchmark scripts compute it, in a pool process."""
    import torch

    torch.set_num_threads(2)
    import search_memory
    import train_memory

    return (train_memory if kind == "train" else search_memory).predict(*args)


def pool_workers(jobs: int) -> int:
    """Processes of :func:`planner_pool` (2 torch threads each): the cores less 4, halved, at most 6."""
    from scnas.threads import usable_cores

    return max(1, min(jobs, (usable_cores() - 4) // 2, 6))


def plan_threads(plans: int, pool: int) -> int:
    """Torch threads of each background ``scnas plan``: what the planner pool and one measuring
    process leave. Oversubscribed cores made both plans 10x slower than alone on a 16-core H200
    host (each simulated step 30 s instead of 3 s), so that the budget ran out before them."""
    from scnas.threads import usable_cores

    return max(1, (usable_cores() - 2 * pool - 2) // max(plans, 1))


def planner_pool(it: Item, jobs: list[tuple]) -> dict:
    """Start the planner's predictions (CPU work, seconds each) in processes, while the device
    measures; returns futures by job."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=pool_workers(len(jobs)), mp_context=multiprocessing.get_context("spawn"))
    futures = {job: pool.submit(_predict, *job) for job in jobs}
    pool.shutdown(wait=False)
    return futures


def predicted(it: Item, future) -> tuple[float | None, str]:
    """(MiB, "") or (None, why not)."""
    try:
        return future.result(timeout=max(1.0, it.left())), ""
    except TimeoutError:
        return None, "time budget: the prediction did not finish"
    except Exception as exc:  # noqa: BLE001 - the planner's failure is reported in the row
        return None, f"the planner failed: {type(exc).__name__}: {str(exc)[:200]}"


def item_memory(it: Item) -> None:
    """The planner against the measured peak for this code (no emulation of older code)."""
    stem_t, patch, stem_s = (68, 128, 48) if it.full else (4, 16, 4)
    stem_big = 68 if it.full else 4
    steps = "2"
    measured: dict = {}
    train_cases = [("uresnet", "fp16", "off"), ("uresnet", "fp16", "cells"), ("dense", "fp16", "off")]
    # (stem, amp, checkpointing, GiB docs/benchmarks.md says it needs at most at 128^3)
    search_cases = [(stem_s, "fp16", "cells", None), (stem_s, "fp16", "edges", 6), (stem_s, "off", "edges", 10),
                    (stem_big, "fp16", "cells", 12)]
    if not it.full:   # the CPU form checks the code path: one of each kind, dense for its file path
        train_cases, search_cases = train_cases[::2], search_cases[1:2]
    if not it.cuda:   # half precision is emulated on CPUs, 5-15x slower: the CPU form measures float32
        train_cases = [(g, "off", ck) for g, _, ck in train_cases]
        search_cases = [(stem, "off", ck, limit) for stem, _, ck, limit in search_cases]
    futures = planner_pool(it, [("train", g, stem_t, patch, 2, it.device, amp, ck) for g, amp, ck in train_cases]
                           + [("search", "pair", patch, stem, it.device, amp, ck) for stem, amp, ck, _ in search_cases])
    plans = start_plans(it, threads=plan_threads(2 if it.full else 1, pool_workers(len(futures))))
    for genotype, amp, checkpoint in train_cases:
        what = f"training step, {genotype} stem {stem_t}, batch 2, {patch}^3, {amp}, checkpointing {checkpoint}"
        goal = f"planner within +-20% of the measured peak: {what}"
        if not it.enough(15, goal):
            continue
        row = measure_child(it, "train_memory.py", genotype, "2", checkpoint, "--stem", str(stem_t), "--patch",
                            str(patch), "--batch", "2", "--steps", steps, "--device", it.device, "--amp", amp)
        if "error" in row:
            it.not_measured(goal, row["error"])
            continue
        measured[("train", genotype, checkpoint)] = row
        it.data.setdefault("training", []).append(row)
        say(f"  measured {row['peak_mib'] / 1024:.2f} GiB, step {row['step_s'] * 1e3:.0f} ms: {what}")
    for genotype, amp, checkpoint in train_cases:
        row = measured.get(("train", genotype, checkpoint))
        if row is None:
            continue
        what = f"training step, {genotype} stem {stem_t}, batch 2, {patch}^3, {amp}, checkpointing {checkpoint}"
        mib, why = predicted(it, futures[("train", genotype, stem_t, patch, 2, it.device, amp, checkpoint)])
        row["predicted_mib"] = mib
        if mib is None:
            it.not_measured(f"planner within +-20% of the measured peak: {what}", why)
            continue
        ratio = mib / row["peak_mib"]
        it.check(f"planner within +-20% of the measured peak: {what}",
                 f"{row['peak_mib'] / 1024:.2f} GiB measured, {mib / 1024:.2f} GiB predicted "
                 f"({ratio:.2f}x); step {row['step_s'] * 1e3:.0f} ms", abs(ratio - 1) <= 0.2)
    off, cells = measured.get(("train", "uresnet", "off")), measured.get(("train", "uresnet", "cells"))
    if off and cells:
        ratio = cells["step_s"] / off["step_s"]
        it.check("checkpointing cells costs <= 1.3x the step time (uresnet-68, batch 2, fp16)",
                 f"{cells['step_s'] * 1e3:.0f} ms / {off['step_s'] * 1e3:.0f} ms = {ratio:.2f}x", ratio <= 1.3)
    for stem, amp, checkpoint, limit in search_cases:
        what = f"search step (pair), stem {stem}, {patch}^3, {amp}, checkpointing {checkpoint}"
        goal = f"planner within +-20% of the measured peak: {what}"
        if not it.enough(15, goal):
            continue
        row = measure_child(it, "search_memory.py", "pair", str(patch), checkpoint, "--stem", str(stem), "--steps",
                            steps, "--device", it.device, "--amp", amp)
        if "error" in row:
            it.not_measured(goal, row["error"])
            continue
        it.data.setdefault("search", []).append(row)
        if limit:
            it.check(f"search at stem {stem}, {'float32' if amp == 'off' else amp}, checkpointing {checkpoint} "
                     f"needs <= {limit} GiB (docs/benchmarks.md)", f"{row['peak_mib'] / 1024:.2f} GiB",
                     row["peak_mib"] / 1024 <= limit)
        mib, why = predicted(it, futures[("search", "pair", patch, stem, it.device, amp, checkpoint)])
        row["predicted_mib"] = mib
        if mib is None:
            it.not_measured(goal, why)
            continue
        ratio = mib / row["peak_mib"]
        it.check(goal, f"{row['peak_mib'] / 1024:.2f} GiB measured, {mib / 1024:.2f} GiB predicted "
                       f"({ratio:.2f}x, typical draw); step {row['step_s'] * 1e3:.0f} ms", abs(ratio - 1) <= 0.2)
    retrain24(it, plans)


def start_plans(it: Item, threads: int) -> dict:
    """``scnas plan`` for the paper's retraining (batch 8, 128^3, stem 68, fp16) on 24 GiB, for
    uresnet and the dense genotype, started in the background (CPU work, ``threads`` torch
    threads each)."""
    stem, patch, budget = (68, 128, "24GiB") if it.full else (4, 16, "1GiB")
    jobs = {}
    for name, genotype in ([("uresnet", "uresnet"), ("dense", DENSE)] if it.full else [("uresnet", "uresnet")]):
        plan_file = it.work / f"plan-{name}.json"
        args = ("plan", genotype, "--stem", str(stem), "--patch", *[str(patch)] * 3, "--batch-size", "8", "--amp",
                "fp16", "--gpu-memory", budget, "--no-largest-stem", "-o", str(plan_file))
        thread = threading.Thread(target=it.scnas, args=(f"plan {name}", *args), kwargs={"threads": threads},
                                  daemon=True)
        thread.start()
        jobs[name] = (thread, plan_file, stem, patch, budget)
    return jobs


def retrain24(it: Item, jobs: dict) -> None:
    """The plans of :func:`start_plans`, measured."""
    for name, (thread, plan_file, stem, patch, budget) in jobs.items():
        goal = f"retraining {name} at batch 8 ({patch}^3, stem {stem}, fp16) fits {budget} as `scnas plan` plans it"
        thread.join(timeout=max(1.0, it.left()))
        if thread.is_alive() or not it.enough(15, goal):
            continue
        if not plan_file.exists():
            it.record(goal, "scnas plan failed", False)
            continue
        plan = json.loads(plan_file.read_text()).get("plan")
        if not plan:
            it.record(goal, "the planner refused", False)
            continue
        row = measure_child(it, "train_memory.py", name, str(plan["micro_batch"]), plan["checkpoint"], "--stem",
                            str(stem), "--patch", str(patch), "--batch", "8", "--steps", "1", "--device", it.device,
                            "--amp", "fp16" if it.cuda else "off")
        described = f"plan: checkpointing {plan['checkpoint']}, micro-batch {plan['micro_batch']}"
        if "error" in row:
            it.not_measured(goal, f"{row['error']} ({described})")
            continue
        predicted = plan["predicted_peak_bytes"] / GiB
        peak = row["peak_mib"] / 1024
        it.data.setdefault("retrain_batch8", {})[name] = {"plan": plan, "measured": row}
        it.check(goal, f"{described}; measured {peak:.2f} GiB, step {row['step_s']:.2f} s", peak <= 24)
        it.check(f"planner within +-20% of the measured peak: that plan ({name})",
                 f"{predicted:.2f} GiB predicted / {peak:.2f} GiB measured = {predicted / peak:.2f}x",
                 abs(predicted / peak - 1) <= 0.2)


def item_speed(it: Item) -> None:
    """Sliding window and networks beside MONAI in one process (benchmarks/gpu_bench.py)."""
    import torch

    import gpu_bench

    device = torch.device(it.device)
    size, patch, stem, repeat = ((240, 240, 160), 128, 68, 3) if it.full else ((40, 40, 36), 16, 4, 2)
    precisions = ("fp32", "fp16") if it.cuda else ("fp32",)
    try:
        import monai
        reference = f"MONAI {monai.__version__}"
    except ImportError:
        reference = None
    goal = f"sliding window on the device <= 1.0x MONAI's (uresnet stem {stem}, {'x'.join(map(str, size))}, " \
           f"patch {patch}^3)"
    if it.enough(40 if it.full else 5, goal):
        window = gpu_bench.bench_sliding_window(device, size, patch, stem, repeat, precisions)
        it.data["sliding_window"] = window
        seconds = {(r["implementation"].split(",")[0].split(" ")[0], r["implementation"], r["precision"]): r["seconds"]
                   for r in window["rows"]}
        for precision in precisions:
            ours = next((s for (who, name, p), s in seconds.items() if "on the device" in name and p == precision), None)
            theirs = next((s for (who, name, p), s in seconds.items() if who == "MONAI" and p == precision), None)
            host = next((s for (who, name, p), s in seconds.items() if "host" in name and p == precision), None)
            row_goal = goal.replace("<= 1.0x", f"in {precision} <= 1.0x")
            if theirs is None:
                it.skip(row_goal, f"scnas {ours:.2f} s; MONAI is not installed")
            else:
                it.check(row_goal, f"{ours:.2f} s / {reference} {theirs:.2f} s = {ours / theirs:.2f}x",
                         ours <= theirs)
            if host is not None:
                it.info("sliding window: device path against the old path through host memory",
                        f"{ours:.2f} s / {host:.2f} s = {ours / host:.2f}x")
        for name, share in window["label_agreement_with_scnas_fp32"].items():
            if not name.startswith("scnas, on the device fp32"):
                it.info(f"sliding-window labels of {name} = scnas fp32's (untrained weights: a lower bound)",
                        f"{share:.4%}")
    net_patch, net_stem, net_repeat = (128, 68, 5) if it.full else (16, 4, 2)
    net_precisions = ("fp16", "bf16") if it.cuda else ("fp32",)
    goal = f"networks beside MONAI's DynUNet (1x4x{net_patch}^3)"
    if not it.enough(45 if it.full else 8, goal):
        return
    rows = gpu_bench.bench_networks(device, net_patch, net_stem, net_repeat, net_precisions, False)
    it.data["networks"] = rows
    by = {r["network"].split(",")[0].split(" (")[0]: r for r in rows}
    ours, found, dyn = by.get("uresnet"), by.get("found-genotype.yaml"), by.get("MONAI DynUNet")
    p = net_precisions[0]
    if dyn is None or "missing" in dyn:
        it.skip(f"uresnet-{net_stem} {p} inference <= 1.5x DynUNet's, training step <= 2.0x", "MONAI is not installed")
    else:
        for kind, limit in (("forward", 1.5), ("train", 2.0)):
            key = f"{kind} {p} ms"
            ratio = ours[key] / dyn[key]
            it.check(f"uresnet-{net_stem} {p} {'inference' if kind == 'forward' else 'training step'} <= {limit}x "
                     f"MONAI DynUNet's (nnU-Net 3d_fullres)", f"{ours[key]:.1f} ms / {dyn[key]:.1f} ms = {ratio:.2f}x",
                     ratio <= limit)
    key = f"forward {p} ms"
    it.check(f"found-genotype.yaml stem {net_stem} {p} inference (1x4x{net_patch}^3) <= 60 ms",
             f"{found[key]:.1f} ms", found[key] <= 60)
    if "bf16" in net_precisions:
        for kind in ("forward", "train"):
            a, b = ours[f"{kind} fp16 ms"], ours[f"{kind} bf16 ms"]
            it.check(f"uresnet-{net_stem}: fp16 {kind} faster than bf16 (docs/memory.md)",
                     f"{a:.1f} ms / {b:.1f} ms = {a / b:.2f}x", a < b)
    if "forward fp16 channels-last ms" in ours:
        it.info(f"uresnet-{net_stem} fp16 inference in channels-last", f"{ours['forward fp16 channels-last ms']:.1f} ms"
                f" (contiguous {ours['forward fp16 ms']:.1f} ms)")


def item_augmentation(it: Item) -> None:
    """The augmentation left for the device, and the loader against the training step."""
    import numpy as np
    import torch

    from data_bench import train_step_times
    from scnas.data import Cache, PrepareSettings, prepare_dataset, write_phantom_dataset
    from scnas.data.augment import default_augmentation
    from scnas.data.loader import PatchDataset, RawBatch, to_device

    device = torch.device(it.device)
    shape, channels, patch = ((144, 144, 128), 4, 128) if it.full else ((32, 32, 24), 4, 16)
    task = write_phantom_dataset(it.work / "aug-task", cases=4, channels=channels, foreground_classes=3, shape=shape,
                                 spacing=(1.0, 1.0, 1.0), seed=0, force=True)
    prepare_dataset(task, it.work / "aug-cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    cache = Cache(it.work / "aug-cache")
    size = (patch,) * 3
    dataset = PatchDataset(cache, cache.case_ids, size, samples_per_epoch=64, seed=0,
                           augmentation=default_augmentation())
    dataset.deferred = True
    batches = [RawBatch([dataset[(0, 2 * i)], dataset[(0, 2 * i + 1)]]) for i in range(8 if it.full else 3)]
    times = []
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        x, y = to_device(batch, device, size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    augment_ms = 1e3 * float(np.median(times[1:]))
    it.data["deferred_augmentation_ms_per_batch_of_2"] = augment_ms
    say(f"  deferred augmentation: {augment_ms:.1f} ms per batch of 2 ({list(x.shape)})")
    goal = "loader-fed training step = fixed-batch step (uresnet-68, batch 2, fp16): the GPU never waits"
    if not it.enough(30 if it.full else 8, goal):
        return
    workers = 4 if it.full else 0
    steps = train_step_times(cache, patch, workers, 8 if it.full else 2, device)
    it.data["train_step"] = steps
    fixed, fed = steps["fixed_batch_ms"], steps["loader_fed_ms"]
    it.check("deferred augmentation on the device <= 5% of a training step (docs: 'a few ms beside 232 ms')",
             f"{augment_ms:.1f} ms per batch of 2 / step {fixed:.0f} ms = {augment_ms / fixed:.1%}",
             augment_ms <= 0.05 * fixed)
    it.check(goal.replace("uresnet-68", f"uresnet-{68 if it.cuda else 8}") + f" ({workers} loader workers)",
             f"fed {fed:.0f} ms / fixed {fixed:.0f} ms = {fed / fixed:.2f}x", fed <= 1.1 * fixed)


def item_compile(it: Item) -> None:
    """torch.compile of the stem-68 network's fp16 inference against eager."""
    import torch

    import gpu_bench
    from scnas.build import BuildConfig, build_network
    from scnas.engine.compiling import compiled_for_inference
    from scnas.genotype import builtin_genotype

    device = torch.device(it.device)
    torch.manual_seed(0)
    net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=68, in_channels=4, num_classes=3))
    net = net.to(device).eval()
    x = torch.randn(1, 4, 128, 128, 128, device=device)
    notes: list[str] = []
    run = compiled_for_inference(net, lambda text: (notes.append(text), say(f"  {text}")))

    def forward(function):
        with torch.inference_mode(), torch.autocast("cuda", torch.float16):
            return function(x)

    eager = 1e3 * gpu_bench.timed(lambda: forward(net), device, 5)
    started = time.perf_counter()
    forward(run)
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    compiled = 1e3 * gpu_bench.timed(lambda: forward(run), device, 5)
    failed = any("failed" in n for n in notes)
    it.record("torch.compile of uresnet-68 fp16 inference compiles (no eager fallback)",
              f"first call {first:.1f} s" + (f": {notes[0]}" if failed else ""), not failed)
    it.check("compiled uresnet-68 fp16 inference faster than eager (docs/cli.md: later steps run faster on a GPU)",
             f"{compiled:.1f} ms / eager {eager:.1f} ms = {compiled / eager:.2f}x", compiled < eager)


# (name, function, CUDA only, seconds it needs at least to be worth starting)
ITEMS = [("cli", item_cli, False, 30), ("memory", item_memory, False, 20), ("speed", item_speed, False, 30),
         ("augmentation", item_augmentation, False, 20), ("compile", item_compile, True, 60)]


def preflight(work: Path, rows: list[dict]) -> None:
    """The modules scnas and the references import (each imported, so a wheel that does not fit
    this Python or numpy shows here); ``python -m scnas --help`` from the root."""
    probe = ("import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
             "    except Exception as exc:\n        print(f'{name} ({type(exc).__name__}: {exc})'.splitlines()[0][:160])")
    _, _, text = stream([sys.executable, "-c", probe, *MODULES], "    [imports] ", 120, child_env(work), ROOT)
    broken = [line for line in text.splitlines() if line.split(" ")[0] in MODULES]   # not the warnings
    rows.append({"item": "preflight", "goal": "modules scnas and the references need", "holds": None, "status": "info",
                 "measured": "cannot import: " + "; ".join(broken) if broken else "all import", "note": ""})
    status, seconds, text = stream([sys.executable, "-m", "scnas", "--help"], "    [help] ", 60, child_env(work), ROOT)
    rows.append({"item": "preflight", "goal": "`python -m scnas --help` works from the repository root (no install)",
                 "measured": f"exit {status}, {seconds:.1f} s", "holds": status == 0,
                 "status": "holds" if status == 0 else "FAILS", "note": ""})


def report(result: dict) -> str:
    """The goals as a rich table, then as plain lines (for logs: the last lines of a cut-off
    output hold the verdicts); returns the plain lines."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table("item", "goal", "measured", "holds", title=f"GPU claims on {result['device']} "
                  f"({'quick' if result['quick'] else 'full'}; {result['elapsed_s']:.0f} s of {result['budget_s']:.0f})")
    colour = {"holds": "green", "FAILS": "red", "skipped": "yellow", "info": "cyan", "error": "red"}
    for r in result["goals"]:
        verdict = {"holds": "yes", "FAILS": "NO"}.get(r["status"], r["status"])
        note = f" ({r['note']})" if r.get("note") else ""
        table.add_row(r["item"], r["goal"], f"{r['measured']}{note}", f"[{colour.get(r['status'], 'white')}]{verdict}")
    console.print(table)
    lines = ["==== gpu_check summary ===="]
    lines.append(f"device {result['device']}, torch {result['torch']}, cuda {result['cuda']}, python "
                 f"{result['python']}, {'--quick' if result['quick'] else 'full sizes'}, {result['elapsed_s']:.0f} s "
                 f"(budget {result['budget_s']:.0f} s)")
    for name, item in result["items"].items():
        reason = f": {item['reason']}" if item.get("reason") else ""
        lines.append(f"item {name}: {item['status']}, {item.get('seconds', 0):.0f} s{reason}")
    for r in result["goals"]:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"[{r['status']}] {r['item']}: {r['goal']} | {r['measured']}{note}")
    counts = {s: sum(r["status"] == s for r in result["goals"]) for s in ("holds", "FAILS", "skipped", "info")}
    lines.append(f"goals: {counts['holds']} hold, {counts['FAILS']} fail, {counts['skipped']} skipped, "
                 f"{counts['info']} information; items broken: "
                 f"{sum(i['status'] == 'error' for i in result['items'].values())}")
    text = "\n".join(lines) + "\n"
    say("\n" + text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU form CI runs)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for the whole run (default 420): later items and steps are skipped, a running "
                             "one is stopped")
    parser.add_argument("--only", nargs="+", choices=[name for name, *_ in ITEMS], help="run only these items")
    parser.add_argument("--work", type=Path, help="keep the phantom task, runs and models here (default: a temporary "
                                                  "folder, removed)")
    parser.add_argument("-o", "--output", type=Path,
                        help="the JSON (default: benchmarks/results/gpu-DEVICE.json, -quick.json with --quick); "
                             "the plain summary goes beside it (.txt)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    if args.child:
        item = Item(args.child, args)
        dict((n, f) for n, f, *_ in ITEMS)[args.child](item)
        return 0

    started = time.time()
    deadline = started + args.budget
    cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    output = args.output or BENCH / "results" / f"gpu-{slug(device_name)}{'-quick' if args.quick else ''}.json"
    result = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
              "python": platform.python_version(), "quick": args.quick, "budget_s": args.budget,
              "command": " ".join(sys.argv), "items": {}, "goals": [], "data": {}}
    from scnas.fileio import atomic_write_text

    def save() -> None:
        result["elapsed_s"] = time.time() - started
        atomic_write_text(output, json.dumps(result, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        work = (args.work or Path(temporary)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        say(f"gpu_check on {device_name} (torch {torch.__version__}), budget {args.budget:.0f} s, work folder {work}")
        preflight(work, result["goals"])
        for r in result["goals"]:
            say(f"  -> {r['status']}: {r['goal']}: {r['measured']}")
        for name, _, cuda_only, least in ITEMS:
            if args.only and name not in args.only:
                continue
            left = deadline - time.time()
            if cuda_only and not cuda:
                result["items"][name] = {"status": "skipped", "reason": "CUDA only"}
                result["goals"].append({"item": name, "goal": (item_compile.__doc__ or name).strip(), "measured": "",
                                        "holds": None, "status": "skipped", "note": "CUDA only"})
                continue
            if left < least:
                result["items"][name] = {"status": "skipped", "reason": f"time budget: {left:.0f} s left"}
                result["goals"].append({"item": name, "goal": f"item {name}", "measured": "", "holds": None,
                                        "status": "skipped", "note": f"time budget: {max(left, 0):.0f} s left"})
                save()
                continue
            say(f"\n== {name} ({left:.0f} s of the budget left)")
            (work / name).mkdir(exist_ok=True)
            out = work / f"{name}.result.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", args.device,
                       "--work", str(work / name), "--deadline", str(deadline), "--result", str(out)]
            status, seconds, text = stream(command + (["--quick"] if args.quick else []), "", left + 5,
                                           child_env(work), ROOT)
            part = json.loads(out.read_text()) if out.exists() else {"rows": [], "data": {}}
            result["goals"].extend(part["rows"])
            result["data"][name] = part["data"]
            entry = {"status": "done" if status == 0 else "error", "seconds": seconds}
            if status is None:
                entry["reason"] = "stopped at the time budget"
            elif status:
                entry["reason"] = f"exit {status}: " + " / ".join(text.strip().splitlines()[-3:])[-400:]
            result["items"][name] = entry
            if status != 0:
                result["goals"].append({"item": name, "goal": f"item {name} runs to its end",
                                        "holds": False if status else None, "status": "FAILS" if status else "skipped",
                                        "measured": entry["reason"], "note": ""})
            save()
        save()
        summary = output.with_suffix(".txt")
        atomic_write_text(summary, report(result))
    say(f"wrote {output} and {summary}")
    broken = any(r["status"] == "FAILS" for r in result["goals"])
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
