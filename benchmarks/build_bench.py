"""Builder benchmark: build and forward time (torch eager CPU), where the forward time goes,
separable vs plain 3D pooling, and the stats of the stem-68 network at 4x128^3.

Run: python benchmarks/build_bench.py [--quick] [-o benchmarks/results/build.json]
Times are medians of repeated runs on this machine; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from common import median_time
from scnas.build import BuildConfig, build_network, network_stats
from scnas.build import network as network_module
from scnas.build import ops as ops_module
from scnas.build.ops import AvgPool3x3x3, MaxPool3x3x3
from scnas.genotype import builtin_genotype, load_genotype, random_genotype, short_hash

console = Console()
FOUND = Path(__file__).resolve().parent.parent / "docs" / "images" / "found-genotype.yaml"


@contextlib.contextmanager
def before_cheaper_ops():
    """The network as it ran before the cheaper formulations of docs/benchmarks.md ("Cheaper
    formulations"): every edge computes its own LeakyReLU, average pooling always pads
    explicitly. Same outputs; for before/after ratios in one process."""
    share, forward = network_module.SHARE_PREACTIVATION, AvgPool3x3x3.forward
    network_module.SHARE_PREACTIVATION = False
    AvgPool3x3x3.forward = lambda self, x: AvgPool3x3x3.explicit(x, self.stride)
    try:
        yield
    finally:
        network_module.SHARE_PREACTIVATION, AvgPool3x3x3.forward = share, forward


def _synchronized(function, device: str):
    if device != "cuda":
        return function
    return lambda: (function(), torch.cuda.synchronize())


def bench_before_after(genotypes: dict, stems: list[int], size: int, repeat: int, device: str = "cpu") -> list[dict]:
    """Forward time (inference mode) before / after the cheaper formulations, interleaved
    (before, after, before, ...) so that both see the same machine; medians of ``repeat``."""
    rows = []
    x = torch.randn(1, 4, size, size, size, device=device)
    for name, genotype in genotypes.items():
        for stem in stems:
            torch.manual_seed(0)
            net = build_network(genotype, BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)).to(device).eval()
            with torch.inference_mode():
                after = _synchronized(lambda: net(x), device)

                def before():
                    with before_cheaper_ops():
                        return after()
                before(), after()
                times = {"before": [], "after": []}
                for _ in range(repeat):
                    for key, function in (("before", before), ("after", after)):
                        start = time.perf_counter()
                        function()
                        times[key].append(time.perf_counter() - start)
                with before_cheaper_ops():
                    y_before = net(x)
                difference = (net(x) - y_before).abs().max().item()
            before_s, after_s = statistics.median(times["before"]), statistics.median(times["after"])
            rows.append({"genotype": name, "stem": stem, "input": [1, 4, size, size, size], "device": device,
                         "before_s": before_s, "after_s": after_s, "speedup": before_s / after_s,
                         "max_abs_diff": difference})
    return rows



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


KINDS = ("conv 3x3x3", "conv depthwise dilated", "conv 1x1x1", "conv other", "instance norm", "leaky relu",
         "pooling", "upsampling", "cat", "add", "optimizer", "others")
"""The groups of :func:`profile_kinds`, in table order ("conv other": transposed upsampling)."""

_POOL_LABELS = {AvgPool3x3x3: "scnas::avg_pool", MaxPool3x3x3: "scnas::max_pool"}


def _conv_kind(event) -> str | None:
    # (input, weight, ...) forward; (grad_output, input, weight, ...) backward
    shapes = getattr(event, "input_shapes", None) or []
    backward = event.name.endswith("_backward")
    if len(shapes) < 3 or len(shapes[1 + backward]) != 5:
        return None
    c_in, weight = shapes[backward][1], shapes[1 + backward]
    kernel = tuple(weight[2:])
    if kernel == (1, 1, 1):
        return "conv 1x1x1"
    if kernel == (3, 3, 3):
        return "conv depthwise dilated" if weight[1] == 1 and c_in > 1 else "conv 3x3x3"
    return "conv other"


def _kind_of_name(event) -> str | None:
    name, low = event.name, event.name.lower()
    if name.startswith("aten::") and "convolution" in name:
        return _conv_kind(event)
    if name.startswith("scnas::") or "pool3d" in low or "constantpadnd" in low:
        return "pooling"
    if "instance_norm" in low or "batch_norm" in low or "batchnormbackward" in low:
        return "instance norm"
    if "leaky_relu" in low or "leakyrelubackward" in low:
        return "leaky relu"
    if "upsample" in low:
        return "upsampling"
    if name == "aten::cat" or name == "CatBackward0":
        return "cat"
    if name in ("aten::add", "aten::add_", "AddBackward0"):
        return "add"
    if name.startswith("Optimizer.") or name.startswith("aten::_fused_adam"):
        return "optimizer"
    return None


def _kind(event) -> str:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    for outer in reversed(chain):  # the outermost recognised op decides (e.g. instance_norm's reshapes)
        kind = _kind_of_name(outer)
        if kind is not None:
            return kind
    return "others"


def profile_kinds(net: nn.Module, x: torch.Tensor, train: bool = False, repeat: int = 1) -> dict[str, float]:
    """Milliseconds per call spent in each of :data:`KINDS`: a forward pass (``train`` False,
    inference mode, eval) or a training step (train mode, forward, soft Dice loss, backward,
    Adam step), profiled with torch.profiler after one warm-up call. On CUDA each op's own
    device (kernel) time counts, on the CPU its self CPU time. "pooling" includes the explicit
    padding and division of scnas's average pooling (labelled with record_function) and their
    backward; "others" holds the loss, views, copies, zeros and the like."""
    cuda = x.device.type == "cuda"
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4) if train else None
    target = None

    def step():
        nonlocal target
        if not train:
            with torch.inference_mode():
                return net(x)
        out = net(x)
        out = out[0] if isinstance(out, list) else out
        if target is None:
            target = torch.rand_like(out)
        probs = out.softmax(1)
        loss = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    handles, open_labels = [], []
    for module in net.modules():
        label = _POOL_LABELS.get(type(module))
        if label is not None:
            def enter(m, args, label=label):
                open_labels.append(torch.profiler.record_function(label).__enter__())

            def leave(m, args, out):
                open_labels.pop().__exit__(None, None, None)
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    net.train(train)
    try:
        step()
        if cuda:
            torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(repeat):
                step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
        net.eval()
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us:
            totals[_kind(event)] += us / 1000 / repeat
    return totals


def profile_table(genotypes: dict, stem: int, size: int, device: str, repeat: int = 1) -> list[dict]:
    """:func:`profile_kinds` for forward and training step of each genotype at 1x4x``size``^3."""
    rows = []
    for name, genotype in genotypes.items():
        torch.manual_seed(0)
        net = build_network(genotype, BuildConfig(stem_channels=stem, in_channels=4, num_classes=3)).to(device)
        x = torch.randn(1, 4, size, size, size, device=device)
        for mode in ("forward", "train step"):
            times = profile_kinds(net, x, train=mode == "train step", repeat=repeat)
            rows.append({"genotype": name, "mode": mode, "stem": stem, "size": size, "device": device,
                         "total_ms": sum(times.values()), "ms": times})
    return rows


def print_profile_table(rows: list[dict], title: str) -> None:
    table = Table("kind", *(f"{r['genotype']} {r['mode']}" for r in rows), title=title)
    for kind in KINDS:
        table.add_row(kind, *(f"{r['ms'][kind]:.1f} ({r['ms'][kind] / r['total_ms']:.0%})" for r in rows))
    table.add_row("total ms", *(f"{r['total_ms']:.1f}" for r in rows))
    console.print(table)


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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: only the before/after forward ratios and the profile by kind, on the GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the before/after forward ratios and the profile by kind")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.manual_seed(0)
    size, repeat, stems = (32, 1, [8, 16]) if args.quick else (64, 3, [16, 32, 68])
    genotypes = {"uresnet": builtin_genotype("uresnet"), "random-0": random_genotype(0), "found": load_genotype(FOUND)}
    where = f"torch {torch.__version__} eager " + (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads")

    before_after = bench_before_after(genotypes, stems, size, max(repeat, 3), args.device)
    table = Table("genotype", "stem", "before s", "after s", "speedup", "max |diff|",
                  title=f"forward before / after the cheaper formulations (shared LeakyReLU, torch's avg pooling), "
                        f"{where}, input 1x4x{size}^3, interleaved, medians")
    for r in before_after:
        table.add_row(r["genotype"], str(r["stem"]), f"{r['before_s']:.3f}", f"{r['after_s']:.3f}",
                      f"{r['speedup']:.2f}x", f"{r['max_abs_diff']:.1e}")
    console.print(table)

    profile_size = 32 if args.quick else 64
    kinds = {}
    for label, context in (("before", before_cheaper_ops), ("after", contextlib.nullcontext)):
        with context():
            kinds[label] = profile_table({"uresnet": genotypes["uresnet"], "found": genotypes["found"]}, 16,
                                         profile_size, args.device)
        print_profile_table(kinds[label], f"where the time goes ({label}), ms and share: stem 16, 1x4x{profile_size}^3, "
                                          f"{where}; train step = forward, loss, backward, Adam at batch 1")
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": where, "processor": platform.processor() or platform.machine()},
              "quick": args.quick, "before_after": before_after, "profile_kinds": kinds}
    if args.profile_only or args.device == "cuda":
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.output}")
        return

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
    result.update({"networks": networks, "profiles": profiles, "pooling": pooling,
                   "stem68_uresnet_128": baseline.to_dict()})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
