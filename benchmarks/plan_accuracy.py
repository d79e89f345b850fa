"""The memory planner at the paper's scale: its predictions beside the GPU measurements that
issue 11 reports (NVIDIA H200, torch 2.11, CUDA 13, main at 59355c3), and the plans it makes
for the paper's search and retraining settings. Runs on the CPU in a few minutes.

The measured figures are constants copied from the issue, not measured here. One difference
between that code and this one is emulated for the comparison: under CUDA autocast, that code
upsampled in float32 (this one keeps half precision), every edge computed its own LeakyReLU (this
one shares it per state) and average pooling always padded explicitly. Not emulated: the issue's checkpointing
experiment kept the skip sum outside the checkpointed cell (one level-0 tensor more), and its
random draws are not the planner's "typical" one.

Run: python benchmarks/plan_accuracy.py [-o benchmarks/results/plan_accuracy.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

GiB = 2**30

# (what, genotype or None for the search, stem, batch, amp, checkpointing, measured GiB); 128^3, 4 channels, 3 classes
MEASURED_H200 = [
    ("training step, batch 2", "uresnet", 68, 2, "off", "off", 25.5),
    ("training step, batch 2", "uresnet", 68, 2, "fp16", "off", 15.0),
    ("training step, batch 2", "docs/images/dense-genotype.yaml", 68, 2, "off", "off", 50.5),
    ("training step, batch 2", "docs/images/dense-genotype.yaml", 68, 2, "fp16", "off", 31.9),
    ("search step (pair), batch 1", None, 48, 1, "off", "off", 34.6),
    ("search step (pair), batch 1", None, 48, 1, "off", "cells", 11.7),
    ("search step (pair), batch 1", None, 48, 1, "bf16", "off", 21.3),
    ("search step (pair), batch 1", None, 48, 1, "bf16", "cells", 7.7),
    ("search step (pair), batch 1", None, 68, 1, "bf16", "off", 30.3),
    ("search step (pair), batch 1", None, 68, 1, "bf16", "cells", 10.8),
]


@contextlib.contextmanager
def measured_code():
    """The code the issue measured: CUDA autocast ran trilinear upsampling in float32, every edge
    computed its own pre-activation, and average pooling always padded explicitly."""
    import torch.nn.functional as F

    from scnas.build import network, ops

    saved = network._upsample, network.SHARE_PREACTIVATION, ops.TORCH_AVG_POOL
    network._upsample = lambda x, scale: F.interpolate(x.float(), scale_factor=scale, mode="trilinear",
                                                       align_corners=False)
    network.SHARE_PREACTIVATION = ops.TORCH_AVG_POOL = False
    try:
        yield
    finally:
        network._upsample, network.SHARE_PREACTIVATION, ops.TORCH_AVG_POOL = saved


def predict(genotype: str | None, stem: int, batch: int, amp: str, checkpoint: str, draw: str = "typical") -> float:
    from scnas.build import BuildConfig
    from scnas.build.memory_plan import training_step_profile
    from scnas.genotype import PAPER_OPS, load_genotype
    from scnas.search.supernet_memory import search_step_profile

    config = BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)
    if genotype is None:
        profile = search_step_profile(config, 4, list(PAPER_OPS), sampling="pair", amp=amp, checkpoint=checkpoint,
                                      batch=batch, draw_kind=draw)
    else:
        profile = training_step_profile(load_genotype(genotype), config, amp, checkpoint=checkpoint, batch=batch)
    return profile.estimate(batch, (128, 128, 128)).peak / GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="benchmarks/results/plan_accuracy.json")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from scnas.build import BuildConfig
    from scnas.build.memory_plan import MemoryPlanError, plan_training_step
    from scnas.genotype import PAPER_OPS, load_genotype
    from scnas.search.supernet_memory import plan_search_step

    console = Console()
    rows = []
    table = Table("step", "network", "stem", "amp", "checkpointing", "H200 GiB", "planner GiB", "planner / H200",
                  title="planner vs the H200 measurements of issue 11 (128^3; the measured code emulated)")
    for what, genotype, stem, batch, amp, checkpoint, measured in MEASURED_H200:
        with measured_code():
            predicted = predict(genotype, stem, batch, amp, checkpoint)
        rows.append({"what": what, "genotype": genotype or "supernet", "stem": stem, "batch": batch, "amp": amp,
                     "checkpoint": checkpoint, "measured_gib": measured, "predicted_gib": predicted})
        table.add_row(what, genotype or "supernet (typical draw)", str(stem), amp, checkpoint, f"{measured:.1f}",
                      f"{predicted:.1f}", f"{predicted / measured:.2f}x")
    console.print(table)

    paper = Table("step", "network", "stem", "amp", "checkpointing", "typical GiB", "bound GiB",
                  title="this code at 128^3, batch 1 per process: the search's peak per checkpointing mode")
    search_rows = []
    for stem, amp in ((48, "off"), (48, "fp16"), (68, "fp16")):
        for checkpoint in ("off", "cells", "edges"):
            typical, bound = (predict(None, stem, 1, amp, checkpoint, draw) for draw in ("typical", "bound"))
            search_rows.append({"stem": stem, "amp": amp, "checkpoint": checkpoint, "typical_gib": typical,
                                "bound_gib": bound})
            paper.add_row("search (pair)", "supernet", str(stem), amp, checkpoint, f"{typical:.1f}", f"{bound:.1f}")
    console.print(paper)

    plans = Table("run", "budget", "plan", "predicted peak",
                  title="what scnas would run with at the paper's settings (128^3; retraining batch 8, search batch 1)")
    plan_rows = []
    settings = [("retrain uresnet, stem 68, fp16", "uresnet"), ("retrain found cells, stem 68, fp16",
                                                                "docs/images/dense-genotype.yaml")]
    for budget in (24, 16, 12):
        for label, genotype in settings:
            try:
                plan = plan_training_step(load_genotype(genotype), BuildConfig(stem_channels=68, in_channels=4,
                                                                               num_classes=3),
                                          "fp16", patch=(128, 128, 128), share=8, checkpoint="auto", micro_batch=None,
                                          available=budget * GiB)
                text, peak = f"checkpointing {plan.checkpoint}, micro-batch {plan.micro_batch}", plan.estimate.peak
            except MemoryPlanError as exc:
                text, peak = f"refused: {exc}", None
            plan_rows.append({"run": label, "budget_gib": budget, "plan": text, "peak_gib": peak and peak / GiB})
            plans.add_row(label, f"{budget} GiB", text, f"{peak / GiB:.1f} GiB" if peak else "-")
        for stem in (48, 68):
            label = f"search (pair), stem {stem}, fp16"
            try:
                plan = plan_search_step(BuildConfig(stem_channels=stem, in_channels=4, num_classes=3), 4,
                                        list(PAPER_OPS), sampling="pair", amp="fp16", patch=(128, 128, 128), share=1,
                                        checkpoint="auto", micro_batch=None, available=budget * GiB)
                text, peak = f"checkpointing {plan.checkpoint}, micro-batch {plan.micro_batch}", plan.estimate.peak
            except MemoryPlanError as exc:
                text, peak = f"refused: {exc}", None
            plan_rows.append({"run": label, "budget_gib": budget, "plan": text, "peak_gib": peak and peak / GiB})
            plans.add_row(label, f"{budget} GiB", text, f"{peak / GiB:.1f} GiB" if peak else "-")
    console.print(plans)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"versus_h200": rows, "search": search_rows, "plans": plan_rows},
                                            indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
