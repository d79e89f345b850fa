"""Prediction benchmark: scnas's sliding window against MONAI's ``sliding_window_inference``
(overlap 0.5, Gaussian) on the same model and volume (time, peak memory, max difference, each
in its own process), the onnxruntime against the torch backend, and cases per minute for a
realistic volume (4x240x240x155 at 1 mm, resampled to 0.7 mm) on CPU.

MONAI is a benchmark-only dependency: pip install --no-deps monai
Run: python benchmarks/predict_bench.py [--quick] [-o benchmarks/results/predict.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _model(stem: int, folder: Path | None = None):
    import torch

    from scnas.build import BuildConfig, build_network

    from scnas.genotype import builtin_genotype

    torch.manual_seed(0)
    return build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=stem, in_channels=4, num_classes=4)).eval()


def child(kind: str, size: tuple[int, ...], patch: int, stem: int, weighting: str) -> dict:
    import torch

    net = _model(stem)
    image = np.random.default_rng(0).normal(size=(4, *size)).astype(np.float32)
    if kind == "scnas":
        from scnas.train.inference import sliding_window

        def predict(batch):
            with torch.inference_mode():
                return net(torch.from_numpy(batch)).numpy()

        def run():
            return sliding_window(image, predict, (patch,) * 3, num_classes=4, overlap=0.5, batch_size=2,
                                  gaussian=weighting == "gaussian")
    else:
        from monai.inferers import sliding_window_inference

        def run():
            with torch.inference_mode():
                return sliding_window_inference(torch.from_numpy(image)[None], (patch,) * 3, 2, net, overlap=0.5,
                                                mode=weighting)[0].numpy()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()  # warm-up: lazy imports, oneDNN kernels
    start = time.perf_counter()
    logits = run()
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    np.save(sys.argv[-1], logits)
    return {"kind": kind, "weighting": weighting, "seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-o", "--output", default="benchmarks/results/predict.json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        kind, size, patch, stem, weighting = args.child
        print(json.dumps(child(kind, tuple(int(s) for s in size.split("x")), int(patch), int(stem), weighting)))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    size, patch, stem = ((48, 48, 40), 32, 8) if args.quick else ((160, 160, 128), 64, 16)
    result: dict = {"quick": args.quick}
    rows = []
    comparisons = {}
    with tempfile.TemporaryDirectory() as folder:
        for weighting in ("gaussian", "constant"):
            outputs = {}
            for kind in ("scnas", "monai"):
                target = Path(folder) / f"{kind}-{weighting}.npy"
                out = subprocess.run([sys.executable, __file__, "--child", kind, "x".join(map(str, size)), str(patch),
                                      str(stem), weighting, str(target)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                outputs[kind] = np.load(target)
            comparisons[weighting] = {
                "max_abs_diff": float(np.abs(outputs["scnas"] - outputs["monai"]).max()),
                "label_agreement": float((outputs["scnas"].argmax(0) == outputs["monai"].argmax(0)).mean())}
    result["sliding_window"] = {"size": list(size), "patch": patch, "stem": stem, "rows": rows,
                                "comparison": comparisons}
    table = Table("implementation", "weighting", "seconds", "peak MiB", title=f"sliding window, uresnet stem {stem}, 4x"
                  f"{'x'.join(map(str, size))}, patch {patch}^3, overlap 0.5, batch 2 windows, CPU")
    for r in rows:
        table.add_row(r["kind"], r["weighting"], f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}")
    console.print(table)
    for weighting, c in comparisons.items():
        console.print(f"{weighting}: max |scnas - MONAI| {c['max_abs_diff']:.3g}, labels agree on "
                      f"{c['label_agreement']:.2%} of voxels")

    # Full prediction of a realistic case with both backends.
    from scnas.build import save_model
    from scnas.export import export_onnx
    from scnas.train import predict_folder
    import nibabel as nib

    shape = (60, 60, 40) if args.quick else (240, 240, 155)
    case_patch = 32 if args.quick else 128
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        from scnas.data.phantom import make_case

        rng = np.random.default_rng(0)
        contrasts = np.array([[100, 150, 60, 130]] * 4, dtype=float)
        image, _ = make_case(rng, shape, (1.0, 1.0, 1.0), contrasts=contrasts)
        (folder / "in").mkdir()
        nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), np.eye(4)), str(folder / "in" / "case.nii.gz"))
        net = _model(stem)
        preprocessing = {"target_spacing": [0.7, 0.7, 0.7], "patch_size": [case_patch] * 3, "normalization": "zscore-nonzero",
                         "channel_names": ["FLAIR", "T1w", "T1gd", "T2w"], "labels": {"background": 0, "a": 1, "b": 2, "c": 3}}
        save_model(net, folder / "m.safetensors", preprocessing)
        export_onnx(net, folder / "m.onnx", preprocessing=preprocessing)
        backends = []
        for backend, model in (("torch", "m.safetensors"), ("onnxruntime", "m.onnx")):
            start = time.perf_counter()
            predict_folder(folder / model, folder / "in", folder / backend, backend=backend, progress=False)
            seconds = time.perf_counter() - start
            backends.append({"backend": backend, "seconds": seconds, "cases_per_minute": 60 / seconds})
        same = float((np.asarray(nib.load(str(folder / "torch" / "case.nii.gz")).dataobj) ==
                      np.asarray(nib.load(str(folder / "onnxruntime" / "case.nii.gz")).dataobj)).mean())
    result["case"] = {"shape": [4, *shape], "spacing": [1, 1, 1], "target_spacing": [0.7, 0.7, 0.7],
                      "patch": case_patch, "stem": stem, "rows": backends, "label_agreement": same}
    table = Table("backend", "seconds per case", "cases/minute",
                  title=f"scnas predict, one case 4x{'x'.join(map(str, shape))} at 1 mm -> 0.7 mm, uresnet stem {stem}, "
                        f"patch {case_patch}^3, CPU")
    for r in backends:
        table.add_row(r["backend"], f"{r['seconds']:.1f}", f"{r['cases_per_minute']:.2f}")
    console.print(table)
    console.print(f"torch and onnxruntime labels agree on {same:.4%} of voxels")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
