"""Regenerate the network conformance suite (model files, inputs, expected outputs, manifest.json).

Run ``python tests/conformance/network/generate.py`` after changing a case below. scnas is the
reference implementation: each case's network is built by ``scnas.build.build_network``, given
seeded random weights (the InstanceNorm weights and biases too, so that ``affine`` matters),
saved with ``scnas.build.save_model``, and run in float32 on the CPU on a seeded random input;
the parameter and MAC counts come from ``scnas.build.network_stats``. The same case is also run
in float64 to record how far the float32 expected output itself is from exact arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from scnas import __version__
from scnas.build import BuildConfig, build_network, network_stats, save_model
from scnas.genotype import builtin_genotype, genotype_from_data, genotype_hash, random_genotype

HERE = Path(__file__).resolve().parent
SUITE_VERSION = 1

# atol + rtol * max|expected| bounds max|output - expected| (see README.md for why these values)
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def _cells(encoder_normal, reduction, decoder_normal, expansion) -> dict:
    def cell(spec):
        edges, concat = spec
        return {"edges": [{"from": f, "to": t, "op": op} for f, t, op in edges], "concat": concat}
    return {"encoder_normal": cell(encoder_normal), "reduction": cell(reduction),
            "decoder_normal": cell(decoder_normal), "expansion": cell(expansion)}


def _document(nodes: int, cells: dict) -> dict:
    return {"format": "scnas-genotype", "version": 1, "nodes": nodes, "cells": cells}


# decoder-normal cells read only c_{k-2} and expansion cells only c_{k-1}: the expansion cells'
# outputs reach nothing, so they are not built and no encoder skip is added; concat subsets
UNUSED_CELLS = _document(2, _cells(
    ([(0, 2, "conv_3x3x3"), (1, 3, "sep_dil2_conv_3x3x3"), (2, 3, "identity")], [2, 3]),
    ([(0, 2, "max_pool_3x3x3"), (1, 2, "conv_3x3x3"), (2, 3, "avg_pool_3x3x3")], [3]),
    ([(0, 2, "conv_3x3x3"), (2, 3, "sep_dil3_conv_3x3x3")], [3, 2]),
    ([(1, 2, "conv_3x3x3"), (2, 3, "identity")], [2, 3])))

# a dead node (5, fed but reaching no concat node) in the encoder cell, a node neither fed nor
# used, concat sizes that differ between encoder (3 nodes) and expansion (1 node), so every
# decoder skip needs a projection
DEAD_NODE_PROJECTIONS = _document(4, _cells(
    ([(0, 2, "conv_3x3x3"), (1, 2, "identity"), (1, 3, "sep_dil4_conv_3x3x3"), (2, 4, "avg_pool_3x3x3"),
      (3, 4, "conv_3x3x3"), (4, 5, "conv_3x3x3")], [4, 2, 3]),
    ([(0, 2, "identity"), (1, 3, "conv_3x3x3"), (2, 4, "max_pool_3x3x3"), (3, 4, "identity")], [2, 4]),
    ([(0, 2, "sep_dil2_conv_3x3x3"), (1, 3, "conv_3x3x3"), (2, 3, "max_pool_3x3x3")], [2, 3]),
    ([(0, 2, "conv_3x3x3"), (1, 2, "avg_pool_3x3x3"), (2, 3, "identity"), (3, 4, "conv_3x3x3")], [4])))

# parameter-free operations on the strided edges of the reduction cell (strided identity,
# strided max and average pooling) and average pooling at levels with an axis of 1 or 2 voxels
STRIDED_POOLS = _document(2, _cells(
    ([(0, 2, "avg_pool_3x3x3"), (1, 2, "conv_3x3x3"), (1, 3, "max_pool_3x3x3"), (2, 3, "avg_pool_3x3x3")], [2, 3]),
    ([(0, 2, "identity"), (1, 2, "max_pool_3x3x3"), (1, 3, "avg_pool_3x3x3"), (2, 3, "identity")], [2, 3]),
    ([(0, 2, "avg_pool_3x3x3"), (1, 2, "sep_dil2_conv_3x3x3"), (1, 3, "identity"), (2, 3, "max_pool_3x3x3")], [2, 3]),
    ([(0, 3, "conv_3x3x3"), (1, 2, "avg_pool_3x3x3"), (2, 3, "sep_dil3_conv_3x3x3")], [2, 3])))

# one intermediate node, a restricted vocabulary of separable convolutions
SINGLE_NODE = {**_document(1, _cells(
    ([(0, 2, "sep_dil4_conv_3x3x3"), (1, 2, "sep_dil2_conv_3x3x3")], [2]),
    ([(0, 2, "sep_dil3_conv_3x3x3"), (1, 2, "sep_dil4_conv_3x3x3")], [2]),
    ([(0, 2, "sep_dil2_conv_3x3x3"), (1, 2, "sep_dil3_conv_3x3x3")], [2]),
    ([(1, 2, "sep_dil4_conv_3x3x3")], [2]))),
    "ops": ["sep_dil2_conv_3x3x3", "sep_dil3_conv_3x3x3", "sep_dil4_conv_3x3x3"]}


def _random(seed: int, nodes: int, inputs_per_node: int = 2) -> dict:
    return random_genotype(seed, nodes=nodes, inputs_per_node=inputs_per_node).to_dict()


# name: (genotype document, build settings, input shape (B, C, D, H, W), what it exercises)
CASES = {
    "uresnet": (builtin_genotype("uresnet").to_dict(),
                dict(stem_channels=4, in_channels=4, num_classes=3, depth=2), (1, 4, 8, 16, 16),
                "built-in baseline; strided identity in the reduction cell; c_{k-2} unused"),
    "minimal": (builtin_genotype("minimal").to_dict(),
                dict(stem_channels=2, in_channels=1, num_classes=2, depth=2), (1, 1, 8, 16, 16),
                "built-in one-node cells; one input channel"),
    "random-n4": (_random(1, 4), dict(stem_channels=4, in_channels=4, num_classes=3, depth=3), (1, 4, 16, 8, 16),
                  "random, 4 nodes, paper settings at a small stem"),
    "random-n2-depth2": (_random(2, 2), dict(stem_channels=6, in_channels=1, num_classes=2, depth=2),
                         (1, 1, 8, 12, 16), "random, 2 nodes, depth 2, non-cubic input"),
    "random-n3-rounding": (_random(3, 3), dict(stem_channels=5, in_channels=2, num_classes=4, depth=2),
                           (1, 2, 8, 16, 16), "node width ceil(5 * 2**l / 3) rounds up"),
    "random-n5-3inputs": (_random(4, 5, 3), dict(stem_channels=5, in_channels=1, num_classes=2, depth=2),
                          (1, 1, 8, 8, 12), "random, 5 nodes with 3 inputs each"),
    "transposed": (_random(5, 4), dict(stem_channels=4, in_channels=4, num_classes=3, depth=3,
                                       upsampling="transposed"), (1, 4, 8, 16, 16),
                   "upsampling by transposed convolution"),
    "slope-0.2": (_random(6, 3), dict(stem_channels=6, in_channels=3, num_classes=3, depth=2, negative_slope=0.2),
                  (1, 3, 12, 8, 8), "LeakyReLU slope 0.2 everywhere"),
    "deep-supervision": (_random(7, 2), dict(stem_channels=4, in_channels=1, num_classes=3, depth=3,
                                             deep_supervision=True), (1, 1, 8, 16, 16),
                         "heads in the parameters and MACs, not in the inference output"),
    "depth1": (_random(8, 4), dict(stem_channels=8, in_channels=2, num_classes=5, depth=1), (1, 2, 6, 8, 10),
               "one reduction; five classes"),
    "unused-cells": (UNUSED_CELLS, dict(stem_channels=2, in_channels=1, num_classes=2, depth=3), (1, 1, 8, 16, 16),
                     "expansion cells not built, no skips; concat subsets"),
    "dead-node-projections": (DEAD_NODE_PROJECTIONS, dict(stem_channels=8, in_channels=4, num_classes=3, depth=2),
                              (1, 4, 8, 8, 8), "dead node, unfed node, skip projections"),
    "strided-pools": (STRIDED_POOLS, dict(stem_channels=2, in_channels=1, num_classes=2, depth=3), (1, 1, 8, 16, 16),
                      "strided identity/pooling; average pooling on axes shorter than its window"),
    "single-node-batch2": (SINGLE_NODE, dict(stem_channels=4, in_channels=2, num_classes=6, depth=2),
                           (2, 2, 8, 8, 12), "one node, separable convolutions only; batch of 2; six classes"),
}


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded weights: convolutions uniform in +-1/sqrt(fan_in) (torch's default scale), norm
    weights 1 + N(0, 0.2), norm and conv biases N(0, 0.2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                bound = 1.0 / float(np.sqrt(p[0].numel()))
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound * np.sqrt(3.0))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))


def build_case(index: int, name: str) -> dict:
    document, settings, shape, description = CASES[name]
    genotype = genotype_from_data(document, source=name)
    config = BuildConfig(**settings)
    generator = torch.Generator().manual_seed(1000 + index)
    model = build_network(genotype, config).eval()
    _randomise(model, generator)
    x = torch.randn(shape, generator=generator)
    with torch.no_grad():
        out32 = model(x)
        out64 = model.to(torch.float64)(x.to(torch.float64))
    model.to(torch.float32)
    stats = network_stats(genotype, config, patch=shape[2:], batch=shape[0])
    files = {"model": f"{name}.safetensors", "input": f"{name}.input.npy", "output": f"{name}.output.npy"}
    save_model(model, HERE / files["model"])
    np.save(HERE / files["input"], x.numpy())
    np.save(HERE / files["output"], out32.numpy())
    return {"name": name, "description": description, **files, "genotype_hash": genotype_hash(genotype),
            "build_config": config.model_dump(), "input_shape": list(shape), "output_shape": list(out32.shape),
            "params": stats.params, "macs": stats.macs,
            "float32_rounding": float((out32.double() - out64).abs().max())}


def main() -> None:
    for old in list(HERE.glob("*.safetensors")) + list(HERE.glob("*.npy")):
        old.unlink()
    torch.set_num_threads(1)
    cases = [build_case(i, name) for i, name in enumerate(CASES)]
    manifest = {"suite": "scnas-network-conformance", "suite_version": SUITE_VERSION, "scnas_version": __version__,
                "specification": "docs/network.md", "dtype": "float32", "tolerance": TOLERANCE, "cases": cases}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
    print(f"{len(cases)} cases; folder {total / 1024:.0f} KiB; float32 rounding of the expected outputs at most "
          f"{max(c['float32_rounding'] for c in cases):.3g}")


if __name__ == "__main__":
    main()
