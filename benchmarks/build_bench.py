"""Builder benchmark: build and forward time (torch eager CPU), where the forward time goes,
separable vs plain 3D pooling, and the stats of the stem-68 network at 4x128^3.

Run: python benchmarks/build_bench.py [--quick] [-o benchmarks/results/build.json]
Times are medians of repeated runs on this machine; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from common import median_time
from scnas.build import BuildConfig, build_network, network_stats
from scnas.build import ops as ops_module
from scnas.build.ops import AvgPool3x3x3, MaxPool3x3x3
from scnas.genotype import builtin_genotype, random_genotype, short_hash

console = Console()



def bench_networks(genotypes: dict, stems: list[int], size: int, repeat: int) -> list[dict]:
    rows = []
    x = torch.randn(1, 4, size, size, size)
    for name, genotype in genotypes.items():
        for stem in stems:
            config = BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)
            build_s = median_time(lambda: build_network(genotype, config), repeat)
            net = build_network(genotype, config).eval()
            with torch.inference_mode():
                forward_s = median_time(lambda: net(x), repeat)
                net_cl = net.to(memory_format=torch.channels_last_3d)
                x_cl = x.contiguous(memory_format=torch.channels_last_3d)
                forward_cl_s = median_time(lambda: net_cl(x_cl), repeat)
                net = net.to(memory_format=torch.contiguous_format)
                ops_module.ROUTE_BATCH1_TO_ONEDNN = False  # torch's own conv dispatch, for the ratio
                forward_torch_dispatch_s = median_time(lambda: net(x), repeat)
                ops_module.ROUTE_BATCH1_TO_ONEDNN = True
            stats = network_stats(genotype, config, (size, size, size))
            rows.append({"genotype": name, "hash": short_hash(genotype), "stem": stem, "input": [1, 4, size, size, size],
                         "build_s": build_s, "forward_s": forward_s,
                         "forward_channels_last_s": forward_cl_s, "channels_last_speedup": forward_s / forward_cl_s,
                         "forward_torch_dispatch_s": forward_torch_dispatch_s,
                         "onednn_routing_speedup": forward_torch_dispatch_s / forward_s, "params": stats.params, "gmacs": stats.macs / 1e9,
                         "gmacs_per_s": stats.macs / 1e9 / forward_s})
    return rows


def profile_forward(genotype, stem: int, size: int, top: int = 8) -> list[dict]:
    net = build_network(genotype, BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)).eval()
    x = torch.randn(1, 4, size, size, size)
    with torch.inference_mode():
        net(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def separable_max(x: torch.Tensor, s: int) -> torch.Tensor:
    """Box max as three 1D maxes: the reformulation the issue suggested, measured for the record."""
    x = F.max_pool3d(x, (3, 1, 1), (s, 1, 1), (1, 0, 0))
    x = F.max_pool3d(x, (1, 3, 1), (1, s, 1), (0, 1, 0))
    return F.max_pool3d(x, (1, 1, 3), (1, 1, s), (0, 0, 1))


def separable_avg(x: torch.Tensor, s: int) -> torch.Tensor:
    x = F.avg_pool3d(x, (3, 1, 1), (s, 1, 1), (1, 0, 0), count_include_pad=False)
    x = F.avg_pool3d(x, (1, 3, 1), (1, s, 1), (0, 1, 0), count_include_pad=False)
    return F.avg_pool3d(x, (1, 1, 3), (1, 1, s), (0, 0, 1), count_include_pad=False)


def bench_pooling(shape: tuple[int, ...], repeat: int) -> list[dict]:
    """torch's 3D pooling vs the separable form vs scnas's op, inference and training."""
    rows = []
    for stride in (1, 2):
        variants = [
            ("max_pool_3x3x3", nn.MaxPool3d(3, stride, 1), lambda x, s=stride: separable_max(x, s), MaxPool3x3x3(stride)),
            ("avg_pool_3x3x3", nn.AvgPool3d(3, stride, 1, count_include_pad=False),
             lambda x, s=stride: separable_avg(x, s), AvgPool3x3x3(stride)),
        ]
        for name, plain, separable, ours in variants:
            x = torch.randn(*shape)
            with torch.inference_mode():
                times = {key: median_time(lambda f=f: f(x), repeat) for key, f in
                         (("plain", plain), ("separable", separable), ("scnas", ours))}
                diff = (plain(x) - ours(x)).abs().max().item()
            xg = x.clone().requires_grad_(True)
            train = {key: median_time(lambda f=f: f(xg).sum().backward(), repeat) for key, f in
                     (("plain", plain), ("scnas", ours))}
            rows.append({"op": name, "stride": stride, "input": list(shape),
                         **{f"{k}_ms": v * 1000 for k, v in times.items()},
                         "separable_speedup": times["plain"] / times["separable"],
                         "scnas_speedup": times["plain"] / times["scnas"],
                         "train_plain_ms": train["plain"] * 1000, "train_scnas_ms": train["scnas"] * 1000,
                         "train_scnas_speedup": train["plain"] / train["scnas"], "max_abs_diff": diff})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    parser.add_argument("-o", "--output", default="benchmarks/results/build.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    size, repeat, stems = (32, 1, [8, 16]) if args.quick else (64, 3, [16, 32, 68])
    genotypes = {"uresnet": builtin_genotype("uresnet"), "random-0": random_genotype(0)}

    networks = bench_networks(genotypes, stems, size, repeat)
    table = Table("genotype", "stem", "params", "GMACs", "build s", "forward s", "GMAC/s", "oneDNN routing speedup",
                  "channels-last speedup",
                  title=f"build and forward, torch {torch.__version__} eager CPU, {torch.get_num_threads()} threads, "
                        f"input 1x4x{size}^3")
    for r in networks:
        table.add_row(r["genotype"], str(r["stem"]), f"{r['params']:,}", f"{r['gmacs']:.2f}", f"{r['build_s']:.3f}",
                      f"{r['forward_s']:.3f}", f"{r['gmacs_per_s']:.1f}", f"{r['onednn_routing_speedup']:.2f}x",
                      f"{r['channels_last_speedup']:.2f}x")
    console.print(table)

    profiles = {name: profile_forward(g, stems[1], size) for name, g in genotypes.items()}
    for name, rows in profiles.items():
        table = Table("aten op", "self ms", "share", "calls", title=f"where the forward goes: {name}, stem {stems[1]}")
        for r in rows:
            table.add_row(r["op"], f"{r['self_ms']:.1f}", f"{r['share']:.0%}", str(r["calls"]))
        console.print(table)

    pooling = bench_pooling((1, 16, 32, 32, 32) if args.quick else (1, 32, 64, 64, 64), repeat)
    table = Table("op", "stride", "torch 3D ms", "separable ms", "scnas ms", "scnas speedup", "train speedup",
                  "max |diff|", title=f"3x3x3 pooling on {'x'.join(map(str, pooling[0]['input']))}: inference "
                                      "(train = forward+backward), same input, one run")
    for r in pooling:
        table.add_row(r["op"], str(r["stride"]), f"{r['plain_ms']:.1f}", f"{r['separable_ms']:.1f}",
                      f"{r['scnas_ms']:.1f}", f"{r['scnas_speedup']:.2f}x", f"{r['train_scnas_speedup']:.2f}x",
                      f"{r['max_abs_diff']:.1e}")
    console.print(table)

    baseline = network_stats(builtin_genotype("uresnet"), BuildConfig(stem_channels=68, in_channels=4, num_classes=3),
                             (128, 128, 128))
    console.print(f"uresnet, stem 68, 1x4x128^3: {baseline.params / 1e6:.2f} M params, {baseline.macs / 1e9:.1f} GMACs, "
                  f"{baseline.flops / 1e9:.1f} GFLOPs, training activations ~{baseline.train_activation_bytes / 2**30:.1f} GiB, "
                  f"inference ~{baseline.inference_activation_bytes / 2**30:.1f} GiB")
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine()},
              "quick": args.quick, "networks": networks, "profiles": profiles, "pooling": pooling,
              "stem68_uresnet_128": baseline.to_dict()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
