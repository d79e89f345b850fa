"""Training step time against torch threads, on a quiet machine and beside busy processes.

The demo's retraining step (uresnet, stem 8, batch 2 of 4x32^3, soft Jaccard, Adam) timed
with 1 .. usable cores threads, first alone, then with ``--busy`` processes spinning on other
cores (the "another job beside it" of issue 17). Each configuration runs in its own process, so
torch's thread pool starts fresh. The table shows what ``scnas.threads``' default would choose in
each situation once the load average has caught up (cores less the busy processes).

    python benchmarks/threads_bench.py            # table + benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scnas.threads import usable_cores  # noqa: E402

console = Console()

STEP = """
import sys, time, torch
from scnas.build import BuildConfig, build_network
from scnas.metrics import soft_jaccard_loss
from scnas.genotype import builtin_genotype
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=8, in_channels=4, num_classes=3))
optimiser = torch.optim.Adam(net.parameters(), 1e-3)
x, y = torch.randn(2, 4, 32, 32, 32), torch.randint(0, 3, (2, 32, 32, 32))
def step():
    optimiser.zero_grad()
    soft_jaccard_loss(net(x), y).backward()
    optimiser.step()
step()
began = time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
print((time.perf_counter() - began) / int(sys.argv[2]))
"""


def spin() -> None:
    while True:
        pass


def step_seconds(threads: int, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(steps)], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes beside the step (default 1)")
    parser.add_argument("-o", "--output", default="benchmarks/results/threads.json")
    args = parser.parse_args()
    cores = usable_cores()
    rows = []
    for busy in (0, args.busy):
        spinners = [mp.Process(target=spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        time.sleep(0.5)
        try:
            for threads in range(1, cores + 1):
                rows.append({"busy_processes": busy, "threads": threads,
                             "step_s": step_seconds(threads, args.steps),
                             "default_choice": threads == max(1, cores - busy)})
        finally:
            for p in spinners:
                p.terminate()
    quiet_best = min(r["step_s"] for r in rows if r["busy_processes"] == 0)
    for row in rows:
        row["vs_quiet_best"] = row["step_s"] / quiet_best
    table = Table("busy processes", "threads", "step (s)", "/ quiet best", "scnas default",
                  title=f"demo training step, {cores} usable cores, torch threads against other jobs")
    for row in rows:
        table.add_row(str(row["busy_processes"]), str(row["threads"]), f"{row['step_s']:.2f}",
                      f"{row['vs_quiet_best']:.2f}x", "yes" if row["default_choice"] else "")
    console.print(table)
    result = {"machine": {"python": platform.python_version(), "usable_cores": cores}, "steps": args.steps,
              "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
