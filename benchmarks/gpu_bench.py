"""GPU speed (issue 13): sliding-window prediction and network forward/training-step times for
scnas beside MONAI's reference in the same process, as ratios.

1. Sliding window, overlap 0.5, Gaussian, 2 windows per batch, uresnet: scnas on the device
   (``Predictor.logits``: windows cut, predicted and blended where the network runs) in float32
   and fp16, the numpy path it replaced (windows through host memory), and MONAI's
   ``sliding_window_inference`` in float32 and fp16 autocast. Labels of each scnas variant are
   compared with scnas float32 (the weights are untrained: agreement there is a lower bound).
2. Networks: forward of 1x4xP^3 (ms) in fp32, fp16, bf16, fp16 channels-last, and one training
   step at batch 2 (forward, soft Jaccard, backward, Adam) in fp32, fp16, bf16, for uresnet,
   docs/images/found-genotype.yaml and random genotype 0 (scnas, stem 68), and MONAI's DynUNet in
   nnU-Net's 3d_fullres configuration (6 levels, 32-320 filters, instance norm, 31 M parameters).

On a GPU: the issue's sizes (volume 4x240x240x160, patch 128^3, stem 68), cudnn.benchmark on.
Without one (--device cpu, or no CUDA): the CPU half at small sizes (volume 4x96x96x80, patch
48^3, stem 8; fp32 and bf16 only), which checks the script and the CPU ratios.

MONAI is a benchmark-only dependency: pip install --no-deps monai (the device machine gets it from
../shared/scripts/offline-wheels.sh). Without MONAI the reference columns are left empty.
Run: python benchmarks/gpu_bench.py [--device cuda|cpu] [--quick] [--compile] [-o benchmarks/results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scnas.build import BuildConfig, build_network  # noqa: E402
from scnas.metrics import soft_jaccard_loss  # noqa: E402
from scnas.genotype import builtin_genotype, load_genotype, random_genotype  # noqa: E402
from scnas.engine.steps import Precision  # noqa: E402
from scnas.train.inference import sliding_window, sliding_window_logits  # noqa: E402
from scnas.train.predict import Predictor  # noqa: E402

console = Console(width=150)
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after two warm-up calls (cuDNN's algorithm search)."""
    for _ in range(2):
        function()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def autocast(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def dynunet(in_channels: int, classes: int, levels: int):
    """MONAI's DynUNet as nnU-Net configures 3d_fullres for a 128^3 patch: 3x3x3 kernels, strides
    1 then 2, filters 32 doubling to 320, instance norm, LeakyReLU 0.01, no deep supervision."""
    try:
        from monai.networks.nets import DynUNet
    except ImportError:
        return None
    filters = [min(32 * 2 ** i, 320) for i in range(levels)]
    return DynUNet(3, in_channels, classes, [[3, 3, 3]] * levels, [[1, 1, 1]] + [[2, 2, 2]] * (levels - 1),
                   [[2, 2, 2]] * (levels - 1), filters=filters, norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}), deep_supervision=False,
                   res_block=False)


def networks(stem: int, classes: int, levels: int) -> dict[str, torch.nn.Module | None]:
    config = BuildConfig(stem_channels=stem, in_channels=4, num_classes=classes)
    found = load_genotype(str(ROOT / "docs" / "images" / "found-genotype.yaml"))
    torch.manual_seed(0)
    return {f"uresnet, stem {stem}": build_network(builtin_genotype("uresnet"), config),
            f"found-genotype.yaml, stem {stem}": build_network(found, config),
            f"random genotype 0, stem {stem}": build_network(random_genotype(0), config),
            f"MONAI DynUNet (nnU-Net, {levels} levels)": dynunet(4, classes, levels)}


def bench_sliding_window(device: torch.device, size, patch: int, stem: int, repeat: int, precisions) -> dict:
    torch.manual_seed(0)
    net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=stem, in_channels=4, num_classes=4))
    net = net.eval().to(device)
    image = np.random.default_rng(0).normal(size=(4, *size)).astype(np.float32)
    rows, labels = [], {}

    def add(name, precision, function, keep=None):
        seconds = timed(function, device, repeat)
        rows.append({"implementation": name, "precision": precision, "seconds": seconds})
        if keep is not None:
            labels[(name, precision)] = keep()
        console.print(f"  {name} {precision}: {seconds:.3f} s")

    for precision in precisions:
        amp = {"fp32": "off"}.get(precision, precision)
        run_precision = Precision(amp, device)

        def run(batch, p=run_precision):
            with p.autocast():
                return net(batch)

        predictor = Predictor(run, {}, (patch,) * 3, num_classes=4, in_channels=4, backend="torch", device=device,
                              amp=amp)
        add("scnas, on the device", precision, lambda: predictor.logits(image), 
            lambda: predictor.logits(image).argmax(0).cpu().numpy())
        if precision == "fp32":
            def through_host(batch, p=run_precision):
                with torch.inference_mode(), p.autocast():
                    return net(torch.from_numpy(batch).to(device)).float().cpu().numpy()
            add("scnas, windows through host memory (the old data path)", precision,
                lambda: sliding_window(image, through_host, (patch,) * 3, num_classes=4))
        try:
            from monai.inferers import sliding_window_inference
        except ImportError:
            continue

        def monai(p=precision):
            with torch.inference_mode(), autocast(device, p):
                return sliding_window_inference(torch.from_numpy(image)[None].to(device), (patch,) * 3, 2, net,
                                                overlap=0.5, mode="gaussian")

        add("MONAI sliding_window_inference", precision, monai, lambda: monai()[0].argmax(0).cpu().numpy())
    reference = labels.get(("scnas, on the device", "fp32"))
    agreement = {f"{name} {precision}": float((found == reference).mean()) for (name, precision), found in labels.items()}
    return {"size": [4, *size], "patch": patch, "stem": stem, "rows": rows,
            "label_agreement_with_scnas_fp32": agreement}


def bench_networks(device: torch.device, patch: int, stem: int, repeat: int, precisions, compile: bool) -> list[dict]:
    rows = []
    levels = 1 + int(np.log2(patch // 4))      # nnU-Net pools down to a 4-voxel bottleneck: 6 levels at 128^3
    for name, net in networks(stem, 4, levels).items():
        if net is None:
            rows.append({"network": name, "missing": "MONAI is not installed"})
            continue
        net = net.to(device)
        row = {"network": name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
        x = torch.randn(1, 4, patch, patch, patch, device=device)
        net.eval()
        for precision in precisions:
            with torch.inference_mode(), autocast(device, precision):
                row[f"forward {precision} ms"] = 1000 * timed(lambda: net(x), device, repeat)
        if "fp16" in precisions and device.type == "cuda":
            net_cl = net.to(memory_format=torch.channels_last_3d)
            x_cl = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.inference_mode(), autocast(device, "fp16"):
                row["forward fp16 channels-last ms"] = 1000 * timed(lambda: net_cl(x_cl), device, repeat)
            net = net.to(memory_format=torch.contiguous_format)
        if compile:
            compiled = torch.compile(net)
            precision = "fp16" if device.type == "cuda" else "fp32"
            with torch.inference_mode(), autocast(device, precision):
                start = time.perf_counter()
                compiled(x)
                sync(device)
                row["compile s"] = time.perf_counter() - start
                row[f"forward {precision} compiled ms"] = 1000 * timed(lambda: compiled(x), device, repeat)
        net.train()
        xb = torch.randn(2, 4, patch, patch, patch, device=device)
        yb = torch.randint(0, 4, (2, patch, patch, patch), device=device)
        for precision in precisions:
            optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

            def step(p=precision, o=optimiser, s=scaler):
                o.zero_grad(set_to_none=True)
                with autocast(device, p):
                    logits = net(xb)
                loss = soft_jaccard_loss(logits.float(), yb)
                s.scale(loss).backward()
                s.step(o)
                s.update()

            row[f"train {precision} ms"] = 1000 * timed(step, device, max(2, repeat // 2))
        console.print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)))
        rows.append(row)
        net.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script (CPU or GPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forward passes")
    parser.add_argument("--skip-networks", action="store_true")
    parser.add_argument("-o", "--output", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.quick:
        size, patch, stem, net_patch, net_stem, repeat = (40, 40, 36), 16, 4, 16, 4, 2
    elif cuda:
        size, patch, stem, net_patch, net_stem, repeat = (240, 240, 160), 128, 68, 128, 68, 10
    else:
        size, patch, stem, net_patch, net_stem, repeat = (96, 96, 80), 48, 8, 64, 8, 3
    precisions = ("fp32", "fp16", "bf16") if cuda else ("fp32",)   # half precision is emulated on CPUs: 5-15x slower
    result = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "quick": args.quick}
    console.print(f"[bold]sliding window[/] on {result['device']}")
    result["sliding_window"] = bench_sliding_window(device, size, patch, stem, repeat,
                                                    ("fp32", "fp16") if cuda else ("fp32",))
    if not args.skip_networks:
        console.print("[bold]networks[/]")
        result["networks"] = bench_networks(device, net_patch, net_stem, repeat, precisions, args.compile)

    sw = result["sliding_window"]
    table = Table("implementation", "precision", "seconds", "x MONAI (same precision)", "labels = scnas fp32",
                  title=f"sliding window, uresnet stem {sw['stem']}, {'x'.join(map(str, sw['size']))}, patch "
                        f"{sw['patch']}^3, overlap 0.5, Gaussian, 2 windows per batch, {device.type}")
    monai = {r["precision"]: r["seconds"] for r in sw["rows"] if r["implementation"].startswith("MONAI")}
    for r in sw["rows"]:
        ratio = r["seconds"] / monai[r["precision"]] if r["precision"] in monai else float("nan")
        agree = sw["label_agreement_with_scnas_fp32"].get(f"{r['implementation']} {r['precision']}")
        table.add_row(r["implementation"], r["precision"], f"{r['seconds']:.3f}", f"{ratio:.2f}",
                      "" if agree is None else f"{agree:.4%}")
    console.print(table)
    if "networks" in result:
        columns = [c for c in dict.fromkeys(k for r in result["networks"] for k in r) if c not in ("network", "missing")]
        table = Table("network", *columns, title=f"networks, 1x4x{net_patch}^3 forward, batch-2 training step, ms, "
                                                 f"{device.type}")
        for r in result["networks"]:
            table.add_row(r["network"], *[f"{r[c]:.1f}" if c in r else r.get("missing", "") for c in columns])
        console.print(table)
        reference = next((r for r in result["networks"] if r["network"].startswith("MONAI") and "missing" not in r), None)
        if reference:
            for r in result["networks"]:
                ratios = {c: r[c] / reference[c] for c in columns if c in r and c in reference and c.endswith("ms")}
                r["x_dynunet"] = ratios
                console.print(f"{r['network']}: " + ", ".join(f"{c} {v:.2f}x" for c, v in ratios.items()))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
