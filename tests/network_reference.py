"""An independent builder of scnas networks, written only from docs/network.md and
docs/genotype-format.md.

It imports nothing from scnas: it reads a model file with safetensors (weights, genotype and
build settings from the header metadata), derives every parameter's name and shape from the
documented rules, and evaluates the network with plain ``torch.nn.functional`` calls on those
weights, counting multiply-adds as the documentation defines them. The network conformance
suite (tests/conformance/network/) and tests/test_network_conformance.py compare it with scnas.

    python tests/network_reference.py tests/conformance/network   # check every case
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

NUM_INPUTS = 2
EPS = 1e-5
DEFAULTS = {"stem_channels": 68, "in_channels": 4, "num_classes": 3, "depth": 3, "upsampling": "trilinear",
            "negative_slope": 0.01, "deep_supervision": False}


# ---------------------------------------------------------------- genotype (genotype-format.md)

@dataclass
class RefCell:
    edges: dict[tuple[int, int], str]     # (from, to) -> op
    concat: list[int]                     # ascending

    def live_edges(self) -> list[tuple[int, int]]:
        """Edges entering a live node (a concat node or an ancestor of one), sorted by (to, from)."""
        live = set(self.concat)
        changed = True
        while changed:
            changed = False
            for (source, target) in self.edges:
                if target in live and source not in live:
                    live.add(source)
                    changed = True
        return sorted((e for e in self.edges if e[1] in live), key=lambda e: (e[1], e[0]))

    def used_inputs(self) -> set[int]:
        return {source for source, _ in self.live_edges() if source < NUM_INPUTS}


def read_genotype(document: dict) -> tuple[int, dict[str, RefCell]]:
    """Node count and cells of a (valid) genotype document given as plain data."""
    nodes = document.get("nodes", 4)
    cells = {name: RefCell({(e["from"], e["to"]): e["op"] for e in cell["edges"]}, sorted(cell["concat"]))
             for name, cell in document["cells"].items()}
    return nodes, cells


# ---------------------------------------------------------------- macro layout (network.md)

@dataclass
class Slot:
    name: str
    cell_type: str
    level: int


def slots(depth: int) -> list[Slot]:
    out = []
    for level in range(1, depth + 1):
        out.append(Slot(f"reduction_{level}", "reduction", level))
        out.append(Slot("inter" if level == depth else f"encoder_normal_{level}", "encoder_normal", level))
    for level in range(depth - 1, -1, -1):
        out.append(Slot(f"expansion_{level}", "expansion", level))
        out.append(Slot(f"decoder_normal_{level}", "decoder_normal", level))
    return out


def avg_pool(t: torch.Tensor, stride: int) -> torch.Tensor:
    """3x3x3 average over the window's voxels inside the input (padding 1, not counted), for
    every input size: zero-padded box mean divided by the share of real voxels in the window."""
    pad = (1, 1, 1, 1, 1, 1)
    real_share = F.avg_pool3d(F.pad(torch.ones_like(t[:1, :1]), pad), 3, stride)
    return F.avg_pool3d(F.pad(t, pad), 3, stride) / real_share


@dataclass
class Counter:
    macs: int = 0


@dataclass
class ReferenceNetwork:
    """The network of ``genotype`` (plain data) under build settings ``config`` (plain data)."""

    genotype: dict
    config: dict
    shapes: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.config = {**DEFAULTS, **self.config}
        self.nodes, self.cells = read_genotype(self.genotype)
        self.layout = slots(self.config["depth"])
        self._plan()

    # widths, wiring, liveness, parameter shapes
    def node_width(self, level: int) -> int:
        return math.ceil(self.config["stem_channels"] * 2 ** level / self.nodes)

    def _plan(self) -> None:
        c = self.config
        S = c["stem_channels"]
        # outputs o_0 (stem), o_{k+1} (slot k): (channels, level)
        self.out_shape = [(S, 0)] + [(self.node_width(s.level) * len(self.cells[s.cell_type].concat), s.level)
                                     for s in self.layout]
        self.inputs = [(max(k - 1, 0), k) for k in range(len(self.layout))]
        encoder = {0: 0}
        self.skip: list[int | None] = []
        for k, s in enumerate(self.layout):
            self.skip.append(encoder[s.level] if s.cell_type == "decoder_normal" else None)
            if s.cell_type == "encoder_normal" and s.level < c["depth"]:
                encoder[s.level] = k + 1
        needed = {len(self.layout)}
        for k in range(len(self.layout) - 1, -1, -1):
            if k + 1 not in needed:
                continue
            used = self.cells[self.layout[k].cell_type].used_inputs()
            for i in used:
                needed.add(self.inputs[k][i])
            if 1 in used and self.skip[k] is not None:
                needed.add(self.skip[k])
        self.built = [k + 1 in needed for k in range(len(self.layout))]

        shapes: dict[str, tuple[int, ...]] = {"stem.0.weight": (S, c["in_channels"], 3, 3, 3),
                                              "stem.1.weight": (S,), "stem.1.bias": (S,)}
        for k, s in enumerate(self.layout):
            if not self.built[k]:
                continue
            cell = self.cells[s.cell_type]
            w = self.node_width(s.level)
            work = s.level - 1 if s.cell_type == "reduction" else s.level
            prefix = f"cells.{s.name}"
            for i in sorted(cell.used_inputs()):
                a, level = self.out_shape[self.inputs[k][i]]
                up = level - work
                if up > 0 and c["upsampling"] == "transposed":
                    f = 2 ** up
                    shapes[f"{prefix}.preprocess.{i}.conv.weight"] = (a, w, f, f, f)
                else:
                    shapes[f"{prefix}.preprocess.{i}.conv.weight"] = (w, a, 1, 1, 1)
                shapes[f"{prefix}.preprocess.{i}.norm.weight"] = (w,)
                shapes[f"{prefix}.preprocess.{i}.norm.bias"] = (w,)
            for (source, target) in cell.live_edges():
                op = cell.edges[source, target]
                stride = 2 if s.cell_type == "reduction" and source < NUM_INPUTS else 1
                e = f"{prefix}.edges.{source}_{target}"
                if op == "conv_3x3x3" or (op == "identity" and stride == 2):
                    k_ = 3 if op == "conv_3x3x3" else 1
                    shapes[f"{e}.1.weight"] = (w, w, k_, k_, k_)
                    shapes[f"{e}.2.weight"] = shapes[f"{e}.2.bias"] = (w,)
                elif op.startswith("sep_dil"):
                    shapes[f"{e}.1.weight"] = (w, 1, 3, 3, 3)
                    shapes[f"{e}.2.weight"] = (w, w, 1, 1, 1)
                    shapes[f"{e}.3.weight"] = shapes[f"{e}.3.bias"] = (w,)
            if self.skip[k] is not None and 1 in cell.used_inputs():
                c_skip, c_now = self.out_shape[self.skip[k]][0], self.out_shape[self.inputs[k][1]][0]
                if c_skip != c_now:
                    shapes[f"skips.{s.name}.1.weight"] = (c_now, c_skip, 1, 1, 1)
                    shapes[f"skips.{s.name}.2.weight"] = shapes[f"skips.{s.name}.2.bias"] = (c_now,)
            if c["deep_supervision"] and s.cell_type == "decoder_normal" and s.level > 0:
                shapes[f"heads.{s.name}.weight"] = (c["num_classes"], self.out_shape[k + 1][0], 1, 1, 1)
                shapes[f"heads.{s.name}.bias"] = (c["num_classes"],)
        shapes["out.weight"] = (c["num_classes"], self.out_shape[-1][0], 1, 1, 1)
        shapes["out.bias"] = (c["num_classes"],)
        self.shapes = shapes

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def check_weights(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """Differences between the documented names/shapes and ``weights`` (empty: they agree)."""
        problems = [f"missing {name}" for name in self.shapes if name not in weights]
        problems += [f"unexpected {name}" for name in weights if name not in self.shapes]
        problems += [f"{name}: shape {tuple(weights[name].shape)}, documented {shape}"
                     for name, shape in self.shapes.items() if name in weights and tuple(weights[name].shape) != shape]
        return problems

    # evaluation
    def forward(self, weights: dict[str, torch.Tensor], x: torch.Tensor, training: bool = False
                ) -> tuple[torch.Tensor, int]:
        """Logits for ``x`` and the multiply-adds counted as network.md defines them. With
        ``training`` the deep-supervision heads run too (they count MACs, never the logits)."""
        c = self.config
        slope = c["negative_slope"]
        count = Counter()
        W = weights

        def conv(t, weight, stride=1, dilation=1, groups=1, bias=None):
            k = weight.shape[-1]
            y = F.conv3d(t, weight, bias, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups)
            count.macs += y.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3] * weight.shape[4]
            return y

        def conv_transposed(t, weight, f):
            count.macs += t.numel() * weight.shape[1] * f ** 3
            return F.conv_transpose3d(t, weight, stride=f)

        def inorm(t, weight, bias):
            if math.prod(t.shape[2:]) <= 1:
                raise ValueError("instance norm over a single voxel")
            mean = t.mean(dim=(2, 3, 4), keepdim=True)
            var = ((t - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
            return (t - mean) / torch.sqrt(var + EPS) * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)

        def act(t):
            return torch.where(t >= 0, t, slope * t)

        def acn(t, p, stride, dilation=1):
            return inorm(conv(act(t), W[f"{p}.1.weight"], stride, dilation), W[f"{p}.2.weight"], W[f"{p}.2.bias"])

        def edge(t, op, p, stride):
            if op == "identity":
                return t if stride == 1 else acn(t, p, stride)
            if op == "conv_3x3x3":
                return acn(t, p, stride)
            if op.startswith("sep_dil"):
                dilation = int(op[len("sep_dil")])
                y = conv(act(t), W[f"{p}.1.weight"], stride, dilation, groups=t.shape[1])
                y = conv(y, W[f"{p}.2.weight"])
                return inorm(y, W[f"{p}.3.weight"], W[f"{p}.3.bias"])
            if op == "max_pool_3x3x3":
                return F.max_pool3d(t, 3, stride, 1)
            if op == "avg_pool_3x3x3":
                return avg_pool(t, stride)
            raise ValueError(f"no such op on an edge: {op}")

        def resample(t, p, up):
            t = act(t)
            if up > 0 and c["upsampling"] == "transposed":
                t = conv_transposed(t, W[f"{p}.conv.weight"], 2 ** up)
            elif up > 0:
                # convolve at the coarse level, then upsample (the documented order; MACs are
                # counted at the coarse level)
                t = conv(t, W[f"{p}.conv.weight"])
                t = F.interpolate(t, scale_factor=2 ** up, mode="trilinear", align_corners=False)
            else:
                t = conv(t, W[f"{p}.conv.weight"], stride=2 ** -up)
            return inorm(t, W[f"{p}.norm.weight"], W[f"{p}.norm.bias"])

        outputs: list[torch.Tensor | None] = [inorm(conv(x, W["stem.0.weight"]), W["stem.1.weight"], W["stem.1.bias"])]
        for k, s in enumerate(self.layout):
            if not self.built[k]:
                outputs.append(None)
                continue
            cell = self.cells[s.cell_type]
            used = cell.used_inputs()
            prefix = f"cells.{s.name}"
            work = s.level - 1 if s.cell_type == "reduction" else s.level
            ins = [outputs[self.inputs[k][0]], outputs[self.inputs[k][1]]]
            if self.skip[k] is not None and 1 in used:
                skip = outputs[self.skip[k]]
                if f"skips.{s.name}.1.weight" in self.shapes:
                    skip = acn(skip, f"skips.{s.name}", 1)
                ins[1] = ins[1] + skip
            states: dict[int, torch.Tensor] = {}
            for i in sorted(used):
                level = self.out_shape[self.inputs[k][i]][1]
                states[i] = resample(ins[i], f"{prefix}.preprocess.{i}", level - work)
            for (source, target) in cell.live_edges():
                stride = 2 if s.cell_type == "reduction" and source < NUM_INPUTS else 1
                term = edge(states[source], cell.edges[source, target], f"{prefix}.edges.{source}_{target}", stride)
                states[target] = states[target] + term if target in states else term
            outputs.append(torch.cat([states[n] for n in cell.concat], dim=1))
            if training and f"heads.{s.name}.weight" in self.shapes:
                conv(outputs[-1], W[f"heads.{s.name}.weight"], bias=W[f"heads.{s.name}.bias"])
        logits = conv(outputs[-1], W["out.weight"], bias=W["out.bias"])
        return logits, count.macs


def read_model_file(path: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Genotype document, build settings and weights of a scnas model file (safetensors)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata.get("format") != "scnas-model":
        raise ValueError(f"{path}: not a scnas model file")
    return json.loads(metadata["genotype"]), json.loads(metadata["build_config"]), weights


def run_case(folder: Path, case: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Evaluate one manifest case with the reference builder; the numbers to compare."""
    genotype, config, weights = read_model_file(folder / case["model"])
    network = ReferenceNetwork(genotype, config)
    problems = network.check_weights(weights)
    if problems:
        raise ValueError(f"{case['name']}: weights differ from the documented names/shapes: {problems[:3]}")
    x = torch.from_numpy(np.load(folder / case["input"])).to(dtype)
    with torch.no_grad():
        logits, _ = network.forward({k: v.to(dtype) for k, v in weights.items()}, x)
        _, macs = network.forward({k: v.to(dtype) for k, v in weights.items()}, x, training=True)
    expected = np.load(folder / case["output"])
    return {"params": network.parameter_count, "macs": macs, "output": logits.to(torch.float64).numpy(),
            "max_abs_dev": float(np.max(np.abs(logits.to(torch.float64).numpy() - expected)))}


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "conformance" / "network")
    manifest = json.loads((root / "manifest.json").read_text())
    failures = 0
    for case in manifest["cases"]:
        got = run_case(root, case)
        ok = got["params"] == case["params"] and got["macs"] == case["macs"] and got["max_abs_dev"] <= (
            manifest["tolerance"]["atol"] + manifest["tolerance"]["rtol"] * float(np.max(np.abs(np.load(root / case["output"])))))
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case['name']}: params {got['params']} (expected {case['params']}), "
              f"MACs {got['macs']} (expected {case['macs']}), max |output - expected| {got['max_abs_dev']:.3g}")
    sys.exit(1 if failures else 0)
