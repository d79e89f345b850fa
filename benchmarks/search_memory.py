"""Search benchmark: peak memory and step time of one search step (Theta step + alpha step)
for pair vs one vs full sampling, same supernet and input, each in its own process (peak
RSS on CPU; max_memory_allocated on CUDA), at several patch sizes, with ratios to full.

Run: python benchmarks/search_memory.py [--quick] [--stem 8] [-o benchmarks/results/search_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(mode: str, patch: int, stem: int, steps: int, device: str) -> dict:
    """Run in a fresh process: build, one warm-up step, ``steps`` timed steps."""
    import torch

    from scnas.build import BuildConfig
    from scnas.build.losses import soft_jaccard_loss
    from scnas.genotype import PAPER_OPS
    from scnas.search import SAMPLERS, Architecture, SuperNet

    torch.manual_seed(0)
    net = SuperNet(BuildConfig(stem_channels=stem, in_channels=4, num_classes=3), 4, list(PAPER_OPS)).to(device)
    arch = Architecture(4, list(PAPER_OPS), torch.Generator().manual_seed(0)).to(device)
    theta_opt = torch.optim.Adam(net.parameters(), 0.025, betas=(0.1, 0.001))
    alpha_opt = torch.optim.Adam(arch.parameters(), 0.003, betas=(0.5, 0.999))
    x = torch.randn(1, 4, patch, patch, patch, device=device)
    y = torch.randint(0, 3, (1, patch, patch, patch), device=device)
    generator = torch.Generator().manual_seed(1)
    sample = SAMPLERS[mode]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        with torch.no_grad():
            weights = {n: sample(a, 5.0, generator) for n, a in arch.alphas.items()}
        theta_opt.zero_grad()
        soft_jaccard_loss(net(x, weights), y).backward()
        theta_opt.step()
        weights = {n: sample(a, 5.0, generator) for n, a in arch.alphas.items()}
        alpha_opt.zero_grad()
        alphas = list(arch.alphas.values())
        for alpha, grad in zip(alphas, torch.autograd.grad(soft_jaccard_loss(net(x, weights), y), alphas)):
            alpha.grad = grad
        alpha_opt.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    return {"mode": mode, "patch": patch, "stem": stem, "device": device, "peak_mib": peak,
            "step_s": sorted(times)[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stem", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patches", type=int, nargs="+", default=None)
    parser.add_argument("-o", "--output", default="benchmarks/results/search_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.stem, args.steps, args.device)))
        return
    from rich.console import Console
    from rich.table import Table

    patches = args.patches or ([16, 32] if args.quick else [32, 48, 64])
    rows = []
    for patch in patches:
        for mode in ("pair", "one", "full"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(patch), "--stem", str(args.stem),
                                  "--steps", str(args.steps), "--device", args.device],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for row in rows:
        full = next(r for r in rows if r["patch"] == row["patch"] and r["mode"] == "full")
        row["memory_vs_full"] = row["peak_mib"] / full["peak_mib"]
        row["time_vs_full"] = row["step_s"] / full["step_s"]
    table = Table("patch", "sampling", "peak MiB", "step s", "memory / full", "time / full",
                  title=f"one search step (Theta + alpha), supernet stem {args.stem}, 4 nodes, 8 ops, batch 1, "
                        f"{args.device}; each in its own process")
    for r in rows:
        table.add_row(f"{r['patch']}^3", r["mode"], f"{r['peak_mib']:.0f}", f"{r['step_s']:.2f}",
                      f"{r['memory_vs_full']:.2f}x", f"{r['time_vs_full']:.2f}x")
    Console().print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": {"python": platform.python_version()}, "rows": rows},
                                            indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
