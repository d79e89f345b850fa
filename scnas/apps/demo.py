"""The whole chain on a fresh phantom dataset, small enough for 2 CPU cores: prepare, search,
draw, build the stem-68 network, retrain a small one, export ONNX, predict fold 0's validation
cases with the last epoch's model in onnxruntime, evaluate. What ``scnas demo`` runs.

The validation cases were in neither the search's nor the retraining's training data, and no
model was chosen on them; they are called validation, not held-out test, cases because the
retraining watched its Dice on patches of them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable


def run_demo(out: str | Path, quick: bool = False, say: Callable[[str], None] = print,
             *, threads: int | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` and return its summary; ``quick`` shrinks every step (CI smoke);
    ``threads``: torch's thread count, recorded in the summary (results depend on it).

    Args:
        out: the folder for everything the demo makes (must be new).
        quick: shrink every step (CI's smoke test).
        say: prints progress.
        threads: torch's thread count, recorded in the summary.
    """
    import torch

    from scnas.build import BuildConfig, network_stats
    from scnas.data import Cache, PrepareSettings, prepare_dataset, write_phantom_dataset
    from scnas.errors import ScnasError
    from scnas.export import cells_graph, export_onnx, write_drawing
    from scnas.export.draw import DrawError
    from scnas.genotype import read_genotype, short_hash
    from scnas.search import SearchConfig, run_search
    from scnas.search.derive import alpha_movement, describe_movement, recorded_probabilities
    from scnas.train import TrainConfig, evaluate_folders, predict_folder, run_training, write_evaluation

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ScnasError("already exists and is not empty; choose another folder", source=str(out))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(title: str) -> Callable[[str], None]:
        say(f"[{len(steps) + 1}/9] {title}")
        steps.append((title, time.perf_counter()))
        return lambda where: say(f"      -> {where} ({time.perf_counter() - steps[-1][1]:.1f} s)")

    done = step("phantom dataset: 12 cases, 2 channels (MRI-like), 2 nested classes, anisotropic 1x1x2 mm")
    task = write_phantom_dataset(out / "phantoms", cases=12, channels=2, foreground_classes=2, shape=(40, 40, 20),
                                 spacing=(1.0, 1.0, 2.0), seed=0)
    done(str(task))

    done = step("prepare: crop, resample to 1 mm, z-normalise; nnU-Net's 5 folds")
    prepare_dataset(task, out / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    done(f"{out / 'cache'} (folds in splits_final.json)")

    done = step("search (paper's Algorithm 1, pair sampling) on fold 0's training cases, split 4:1")
    search = SearchConfig(data=str(out / "cache"), stem=4, patch=(32, 32, 32), epochs=2 if quick else 4,
                          steps_per_epoch=4 if quick else 10, tau_max=5.0, tau_min=0.5, val_batches=2, device="cpu",
                          alpha_lr=0.1)   # 40 alpha steps, not the paper's 50,000: see docs/search.md
    result = run_search(search, out / "search", progress=False,
                        on_epoch=lambda r: say(f"      epoch {r['epoch']}: theta loss {r['theta_loss']:.3f}, "
                                               f"alpha loss {r['alpha_loss']:.3f}, tau {r['tau']:.2f}"))
    genotype = read_genotype(result.genotype_path)
    movement = alpha_movement(recorded_probabilities(genotype, str(result.genotype_path)))
    say(f"      {describe_movement(movement)}")
    done(f"{result.genotype_path} (hash {short_hash(genotype)}, DARTS's top-2 derivation)")

    done = step("draw the found cells (Figure 2 style)")
    drawing = out / "cells.svg"
    try:
        write_drawing(cells_graph(genotype), drawing)
    except DrawError:   # no Graphviz here: the DOT source still shows the cells
        drawing = out / "cells.dot"
        write_drawing(cells_graph(genotype), drawing)
    done(str(drawing))

    done = step("build the found cells as the paper's stem-68 network for BraTS (4 channels in, 4 classes out), 4x128^3")
    stats = network_stats(genotype, BuildConfig(stem_channels=68, in_channels=4, num_classes=4), (128, 128, 128))
    say(f"      {stats.params / 1e6:.2f} M parameters, {stats.macs / 1e9:.1f} GMACs = {stats.flops / 1e9:.1f} GFLOPs, "
        f"training activations ~{stats.train_activation_bytes / 2**30:.1f} GiB")
    (out / "stem68.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    done(str(out / "stem68.json"))

    done = step("retrain the found cells from scratch (small: stem 8) on fold 0")
    training = TrainConfig(data=str(out / "cache"), spacing=(1.0, 1.0, 1.0), stem=8, patch=(32, 32, 32), batch_size=2,
                           epochs=2 if quick else 12, steps_per_epoch=4 if quick else 20, lr=1e-3, val_patches=4,
                           device="cpu")
    run_training(genotype, training, out / "train", progress=False,
                 on_epoch=lambda r: say(f"      epoch {r['epoch']}: loss {r['train_loss']:.3f}, "
                                        f"validation-patch Dice {r['val_dice']:.3f} (watched, not used)"))
    done(str(out / "train" / "model.safetensors") + " (the last epoch's model: nothing was chosen on validation)")

    done = step("export ONNX (dynamic shapes, metadata inside) and verify it in onnxruntime")
    report = export_onnx(_load(out / "train" / "model.safetensors"), out / "model.onnx",
                         preprocessing=_preprocessing(out / "train" / "model.safetensors"))
    worst = max(check.max_rel for check in report.checks)
    done(f"{out / 'model.onnx'} (max relative difference to PyTorch {worst:.1e})")

    done = step("predict fold 0's validation cases with onnxruntime, back on their original grid")
    validation = Cache(out / "cache").splits[0]["val"]
    predict_folder(out / "model.onnx", task / "imagesTr", out / "predictions", backend="onnxruntime",
                   progress=False, only=validation)
    done(str(out / "predictions"))

    done = step("evaluate: Dice per class against the ground truth")
    truth = out / "truth"
    truth.mkdir()
    for case in validation:
        (truth / f"{case}.nii.gz").write_bytes((task / "labelsTr" / f"{case}.nii.gz").read_bytes())
    evaluation = evaluate_folders(out / "predictions", truth)
    write_evaluation(evaluation, out / "dice.json")
    done(str(out / "dice.json"))

    summary = {"genotype": str(result.genotype_path), "genotype_hash": short_hash(genotype),
               "alpha_moved": movement, "validation_dice_per_class": evaluation.mean(),
               "validation_dice_mean": evaluation.overall(), "validation_cases": validation,
               "model_selection": "last epoch (no model was chosen on the validation cases)",
               "stem68_gmacs": stats.macs / 1e9, "seconds": time.perf_counter() - started,
               "threads": threads if threads is not None else torch.get_num_threads(),
               "files": {"cells": str(drawing), "model": str(out / "train" / "model.safetensors"),
                         "onnx": str(out / "model.onnx"), "predictions": str(out / "predictions"),
                         "dice": str(out / "dice.json")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load(path: Path):
    from scnas.build import load_model

    return load_model(path)


def _preprocessing(path: Path):
    from scnas.build import read_model_info

    return read_model_info(path).preprocessing
