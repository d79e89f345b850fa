"""Search benchmark: peak memory and time of one search step (Theta step + alpha step, as
``scnas search`` takes it) for pair / one / full sampling and each activation-checkpointing
mode, each configuration in its own process, beside the memory planner's prediction.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step; on the CPU the growth
of the process's peak RSS from before the model was built (weights, gradients and optimiser
state included, as in the prediction; RSS also holds the CPU kernels' scratch buffers, which
the prediction, made for a GPU, leaves out). The prediction is the planner's for the same
draws (``typical``: one seeded draw at uniform alpha), without its 512 MiB workspace
allowance on the CPU.

Run: python benchmarks/search_memory.py [--quick] [--stem 8] [--device cpu|cuda] [--amp off|fp16|bf16]
(pair sampling with every checkpointing mode; one and full without checkpointing, for the comparison)
     python benchmarks/search_memory.py --device cuda --stem 48 --patches 128 --modes pair --amp fp16   # the paper's
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from common import measure_steps, rss_bytes


def predict(mode: str, patch: int, stem: int, device: str, amp: str, checkpoint: str) -> float:
    """The planner's peak (MiB) for the measured step: the same draws; on the CPU without the
    GPU workspace allowance."""
    from scnas.build import BuildConfig
    from scnas.build.memory_plan import WORKSPACE_BYTES
    from scnas.genotype import PAPER_OPS
    from scnas.search.supernet_memory import search_step_profile

    config = BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)
    profile = search_step_profile(config, 4, list(PAPER_OPS), sampling=mode, amp=amp, checkpoint=checkpoint, batch=1,
                                  draw_kind="typical")
    return (profile.estimate(1, (patch,) * 3).peak - (WORKSPACE_BYTES if device == "cpu" else 0)) / 2**20


def measure(mode: str, patch: int, stem: int, steps: int, device: str, amp: str, checkpoint: str) -> dict:
    """Run in a fresh process: build, one warm-up step, ``steps`` timed steps."""
    import torch

    from scnas.build import BuildConfig
    from scnas.genotype import PAPER_OPS
    from scnas.search import Architecture, SuperNet
    from scnas.search.sampling import choices_from, draw, host_copy
    from scnas.engine.steps import Precision, accumulate_exact, fused_if_available, guarded_step

    ops = list(PAPER_OPS)
    config = BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)
    torch.manual_seed(0)
    dev = torch.device(device)
    before = rss_bytes()
    net = SuperNet(config, 4, ops).to(dev)
    net.set_checkpointing(checkpoint)
    arch = Architecture(4, ops, torch.Generator().manual_seed(0)).to(dev)
    alphas = list(arch.alphas.values())
    fused = fused_if_available(dev)
    theta_opt = torch.optim.Adam(net.parameters(), 0.025, betas=(0.1, 0.001), **fused)
    alpha_opt = torch.optim.Adam(alphas, 0.003, betas=(0.5, 0.999), **fused)
    theta_precision, alpha_precision = Precision(amp, dev), Precision(amp, dev)
    x = torch.randn(1, 4, patch, patch, patch, device=dev)
    y = torch.randint(0, 3, (1, patch, patch, patch), device=dev)
    # the planner's "typical" draw: one seeded draw at uniform alpha, for both steps
    uniform = {name: torch.zeros_like(a, device="cpu") for name, a in arch.alphas.items()}
    draws = {name: draw(a, mode, 5.0, generator=torch.Generator().manual_seed(0)) for name, a in uniform.items()}

    def step() -> None:
        host_copy(arch.alphas)
        with torch.no_grad():
            theta_choices = choices_from(arch.alphas, draws, 5.0)
        theta_opt.zero_grad(set_to_none=True)
        loss = accumulate_exact(lambda v: net(v, theta_choices), [(x, y)], theta_precision.backward,
                                precision=theta_precision)
        guarded_step(theta_opt, list(net.parameters()), theta_precision, loss=loss, max_norm=12.0)
        theta_opt.zero_grad(set_to_none=True)
        grads = []
        loss = accumulate_exact(lambda v: net(v, choices_from(arch.alphas, draws, 5.0)), [(x, y)],
                                lambda s: grads.extend(alpha_precision.gradients(s, alphas)), precision=alpha_precision)
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad
        guarded_step(alpha_opt, alphas, alpha_precision, loss=loss)

    peak, seconds = measure_steps(step, steps, device, before)
    return {"mode": mode, "patch": patch, "stem": stem, "device": device, "amp": amp, "checkpoint": checkpoint,
            "peak_mib": peak, "step_s": seconds}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stem", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"])
    parser.add_argument("--patches", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=["pair", "one", "full"])
    parser.add_argument("--checkpoints", nargs="+", default=["off", "cells", "edges"],
                        help="modes measured for pair sampling; one and full are measured without checkpointing")
    parser.add_argument("-o", "--output", default="benchmarks/results/search_memory.json")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATCH", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.stem, args.steps, args.device, args.amp,
                                 args.child[2])))
        return
    import torch
    from rich.console import Console
    from rich.table import Table

    patches = args.patches or ([16, 32] if args.quick else [32, 64])
    rows = []
    for patch in patches:
        for mode in args.modes:
            for checkpoint in (args.checkpoints if mode == "pair" else ["off"]):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(patch), checkpoint, "--stem",
                                      str(args.stem), "--steps", str(args.steps), "--device", args.device, "--amp",
                                      args.amp], capture_output=True, text=True)
                if out.returncode:
                    rows.append({"mode": mode, "patch": patch, "checkpoint": checkpoint, "error": out.stderr[-300:]})
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["predicted_mib"] = predict(mode, patch, args.stem, args.device, args.amp, checkpoint)
                rows.append(row)
    good = [r for r in rows if "error" not in r]
    for row in good:
        full = next((r for r in good if r["patch"] == row["patch"] and r["mode"] == "full"
                     and r["checkpoint"] == row["checkpoint"]), None)
        unchecked = next((r for r in good if r["patch"] == row["patch"] and r["mode"] == row["mode"]
                          and r["checkpoint"] == "off"), None)
        row["memory_vs_full"] = row["peak_mib"] / full["peak_mib"] if full else None
        row["time_vs_unchecked"] = row["step_s"] / unchecked["step_s"] if unchecked else None
        row["predicted_vs_measured"] = row["predicted_mib"] / row["peak_mib"]
    table = Table("patch", "sampling", "checkpointing", "peak MiB", "planner MiB", "planner / peak", "step s",
                  "time / unchecked", "memory / full",
                  title=f"one search step (Theta + alpha), supernet stem {args.stem}, 4 nodes, 8 ops, batch 1, "
                        f"{args.device}, amp {args.amp}; each in its own process")
    for r in rows:
        if "error" in r:
            table.add_row(f"{r['patch']}^3", r["mode"], r["checkpoint"], "failed", "", "", "", "", r["error"][-60:])
            continue
        ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
        table.add_row(f"{r['patch']}^3", r["mode"], r["checkpoint"], f"{r['peak_mib']:.0f}", f"{r['predicted_mib']:.0f}",
                      ratio(r["predicted_vs_measured"]), f"{r['step_s']:.2f}", ratio(r["time_vs_unchecked"]),
                      ratio(r["memory_vs_full"]))
    Console().print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    Path(args.output).write_text(json.dumps({"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                                         "device": device_name}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
