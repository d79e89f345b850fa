"""Training benchmark: peak memory and time of one retraining step (forward, soft Jaccard loss,
backward, Adam) for each activation-checkpointing mode and micro-batch, each configuration in
its own process, beside the memory planner's prediction.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the
process's peak RSS from before the model was built (RSS also holds the CPU kernels' scratch
buffers and what the allocator keeps, which the prediction, made for a GPU, leaves out; the
prediction is shown without its 512 MiB workspace allowance on the CPU).

Run: python benchmarks/train_memory.py [--quick] [--device cpu|cuda] [--amp off|fp16|bf16]
     python benchmarks/train_memory.py --device cuda --amp fp16 --stem 68 --patch 128 --batch 8 --micro 1 2 8
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from common import measure_steps, rss_bytes

GENOTYPES = {"uresnet": "uresnet", "dense": "docs/images/dense-genotype.yaml"}


def predict(genotype: str, stem: int, patch: int, micro: int, device: str, amp: str, checkpoint: str) -> float:
    from scnas.build import BuildConfig
    from scnas.build.memory_plan import WORKSPACE_BYTES, training_step_profile
    from scnas.genotype import load_genotype

    config = BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)
    profile = training_step_profile(load_genotype(GENOTYPES[genotype]), config, amp, checkpoint=checkpoint, batch=micro)
    return (profile.estimate(micro, (patch,) * 3).peak - (WORKSPACE_BYTES if device == "cpu" else 0)) / 2**20


def measure(genotype: str, stem: int, patch: int, batch: int, micro: int, steps: int, device: str, amp: str,
            checkpoint: str) -> dict:
    """In a fresh process: build, one warm-up step, ``steps`` timed steps of ``batch`` patches
    in micro-batches of ``micro``."""
    import torch

    from scnas.build import BuildConfig, build_network
    from scnas.genotype import load_genotype
    from scnas.engine.steps import Precision, accumulate_exact, fused_if_available, guarded_step, split_batch

    dev = torch.device(device)
    torch.manual_seed(0)
    before = rss_bytes()
    net = build_network(load_genotype(GENOTYPES[genotype]), BuildConfig(stem_channels=stem, in_channels=4,
                                                                        num_classes=3)).to(dev)
    net.set_checkpointing(checkpoint)
    params = list(net.parameters())
    optimiser = torch.optim.Adam(params, 3e-4, **fused_if_available(dev))
    precision = Precision(amp, dev)
    x = torch.randn(batch, 4, patch, patch, patch, device=dev)
    y = torch.randint(0, 3, (batch, patch, patch, patch), device=dev)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss = accumulate_exact(net, split_batch(x, y, micro), precision.backward, precision=precision)
        guarded_step(optimiser, params, precision, loss=loss, max_norm=12.0)

    peak, seconds = measure_steps(step, steps, device, before)
    return {"genotype": genotype, "stem": stem, "patch": patch, "batch": batch, "micro_batch": micro, "device": device,
            "amp": amp, "checkpoint": checkpoint, "peak_mib": peak, "step_s": seconds}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--genotypes", nargs="+", default=list(GENOTYPES), choices=list(GENOTYPES))
    parser.add_argument("--stem", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--micro", type=int, nargs="+", default=None, help="micro-batches (default: the batch, and 1)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"])
    parser.add_argument("--checkpoints", nargs="+", default=["off", "cells", "edges"])
    parser.add_argument("-o", "--output", default="benchmarks/results/train_memory.json")
    parser.add_argument("--child", nargs=3, metavar=("GENOTYPE", "MICRO", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.stem, args.patch, args.batch, int(args.child[1]), args.steps,
                                 args.device, args.amp, args.child[2])))
        return
    import torch
    from rich.console import Console
    from rich.table import Table

    if args.quick:
        args.stem, args.patch, args.genotypes = 8, 32, ["uresnet"]
    micros = args.micro or sorted({args.batch, 1}, reverse=True)
    rows = []
    for genotype in args.genotypes:
        for micro in micros:
            for checkpoint in args.checkpoints:
                out = subprocess.run([sys.executable, __file__, "--child", genotype, str(micro), checkpoint,
                                      "--stem", str(args.stem), "--patch", str(args.patch), "--batch", str(args.batch),
                                      "--steps", str(args.steps), "--device", args.device, "--amp", args.amp],
                                     capture_output=True, text=True)
                if out.returncode:
                    rows.append({"genotype": genotype, "micro_batch": micro, "checkpoint": checkpoint,
                                 "error": out.stderr[-300:]})
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["predicted_mib"] = predict(genotype, args.stem, args.patch, micro, args.device, args.amp, checkpoint)
                rows.append(row)
    good = [r for r in rows if "error" not in r]
    for row in good:
        base = next((r for r in good if r["genotype"] == row["genotype"] and r["checkpoint"] == "off"
                     and r["micro_batch"] == max(micros)), None)
        row["time_vs_plain"] = row["step_s"] / base["step_s"] if base else None
        row["predicted_vs_measured"] = row["predicted_mib"] / row["peak_mib"]
    table = Table("genotype", "micro-batch", "checkpointing", "peak MiB", "planner MiB", "planner / peak", "step s",
                  "time / plain",
                  title=f"one training step of {args.batch} patches of 4x{args.patch}^3, stem {args.stem}, {args.device}, "
                        f"amp {args.amp}; each in its own process; plain = no checkpointing, one micro-batch")
    for r in rows:
        if "error" in r:
            table.add_row(r["genotype"], str(r["micro_batch"]), r["checkpoint"], "failed", "", "", "", r["error"][-60:])
            continue
        ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
        table.add_row(r["genotype"], str(r["micro_batch"]), r["checkpoint"], f"{r['peak_mib']:.0f}",
                      f"{r['predicted_mib']:.0f}", ratio(r["predicted_vs_measured"]), f"{r['step_s']:.2f}",
                      ratio(r["time_vs_plain"]))
    Console().print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    Path(args.output).write_text(json.dumps({"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                                         "device": device_name}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
