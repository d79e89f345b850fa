"""The network conformance suite (tests/conformance/network/): scnas's builder and an independent
builder written from docs/network.md (tests/network_reference.py) must both reproduce every
case's output, parameter count and MAC count.

Tolerance (manifest ``tolerance``): max |output - expected| <= atol + rtol * max |expected|, with
atol = rtol = 1e-4. The expected outputs are float32. Measured on this suite: the same networks
evaluated in float64 differ from them by at most 8.7e-6 * max|expected| (manifest
``float32_rounding``; deep stacks of instance norms over a few voxels amplify rounding); the
reference builder in float32, which orders its arithmetic differently, by at most
1.03e-5 * max|expected|, i.e. 9.5% of the tolerance (a margin of 10x for other float32
implementations); scnas on the machine that wrote the files, by 0. In float64, where rounding
no longer hides anything, the reference and scnas agree to 2.4e-14 * max|output|
(test_in_float64_the_two_builders_agree_to_rounding). The documented rules the tolerance must
catch (align_corners, eps, average pooling's divisor, the output bias) move outputs by 0.35 or
more, over 300 times the tolerance (test_the_suite_detects_rule_changes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import network_reference as ref
from scnas.build import load_model, network_stats, read_model_info
from scnas.genotype import genotype_from_data, genotype_hash

SUITE = Path(__file__).parent / "conformance" / "network"
MANIFEST = json.loads((SUITE / "manifest.json").read_text())
CASES = MANIFEST["cases"]


def _limit(case: dict) -> float:
    expected = np.load(SUITE / case["output"])
    return MANIFEST["tolerance"]["atol"] + MANIFEST["tolerance"]["rtol"] * float(np.abs(expected).max())


def test_the_suite_has_fourteen_small_cases_of_the_kinds_promised():
    assert len(CASES) == 14 and len({c["name"] for c in CASES}) == 14
    configs = [c["build_config"] for c in CASES]
    assert {c["in_channels"] for c in configs} >= {1, 2, 4}
    assert len({c["num_classes"] for c in configs}) >= 4
    assert {c["upsampling"] for c in configs} == {"trilinear", "transposed"}
    assert {c["depth"] for c in configs} == {1, 2, 3}
    total = sum(p.stat().st_size for p in SUITE.iterdir() if p.is_file())
    assert total < 1.5 * 2 ** 20, f"the suite is {total} bytes"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_scnas_reproduces_the_case(case):
    info = read_model_info(SUITE / case["model"])
    assert genotype_hash(info.genotype) == case["genotype_hash"]
    assert info.config.model_dump() == case["build_config"]
    model = load_model(SUITE / case["model"])
    x = torch.from_numpy(np.load(SUITE / case["input"]))
    with torch.no_grad():
        out = model(x).numpy()
    expected = np.load(SUITE / case["output"])
    assert out.shape == expected.shape == tuple(case["output_shape"])
    deviation = float(np.abs(out.astype(np.float64) - expected).max())
    print(f"scnas {case['name']}: max |output - expected| = {deviation:.3g}")
    assert deviation <= _limit(case)
    stats = network_stats(info.genotype, info.config, patch=tuple(case["input_shape"][2:]),
                          batch=case["input_shape"][0])
    assert (stats.params, stats.macs) == (case["params"], case["macs"])
    assert sum(p.numel() for p in model.parameters()) == case["params"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_builder_written_from_the_docs_reproduces_the_case(case):
    got = ref.run_case(SUITE, case)   # also checks every documented parameter name and shape
    print(f"reference {case['name']}: max |output - expected| = {got['max_abs_dev']:.3g}")
    assert got["params"] == case["params"]
    assert got["macs"] == case["macs"]
    assert got["max_abs_dev"] <= _limit(case)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_in_float64_the_two_builders_agree_to_rounding(case):
    """Without float32 noise, any difference left would be a rule the documentation gets wrong."""
    genotype, config, weights = ref.read_model_file(SUITE / case["model"])
    x = torch.from_numpy(np.load(SUITE / case["input"])).double()
    with torch.no_grad():
        theirs, _ = ref.ReferenceNetwork(genotype, config).forward({k: v.double() for k, v in weights.items()}, x)
        ours = load_model(SUITE / case["model"]).double()(x)
    assert float((theirs - ours).abs().max()) <= 1e-10 * float(ours.abs().max())


def test_the_reference_builder_runs_without_scnas():
    """Run the reference over the whole suite in a fresh interpreter where importing scnas fails."""
    script = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'scnas' or name.startswith('scnas.'):\n"
        "            raise ImportError('scnas is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "for name in [m for m in sys.modules if m == 'scnas' or m.startswith('scnas.')]:\n"
        "    del sys.modules[name]\n"
        f"sys.argv = ['network_reference.py', {str(SUITE)!r}]\n"
        f"runpy.run_path({str(Path(ref.__file__))!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\nok ") + result.stdout.startswith("ok ") == len(CASES), result.stdout


class _Functional:
    """torch.nn.functional with some functions replaced (a reference builder breaking one rule)."""

    def __init__(self, **replaced):
        self.replaced = replaced

    def __getattr__(self, name):
        return self.replaced.get(name, getattr(F, name))


def _avg_pool_counting_padding(t, stride):
    return F.avg_pool3d(F.pad(t, (1, 1, 1, 1, 1, 1)), 3, stride)


MUTATIONS = {
    "align_corners=True": ("uresnet", {"F": _Functional(interpolate=lambda x, **k: F.interpolate(
        x, **{**k, "align_corners": True}))}),
    "eps 1e-3": ("uresnet", {"EPS": 1e-3}),
    "average pooling counts the padding": ("strided-pools", {"avg_pool": _avg_pool_counting_padding}),
    "output head without bias": ("minimal", {"F": _Functional(conv3d=lambda x, w, b=None, **k: F.conv3d(
        x, w, None if w.shape[0] == 2 and w.shape[2] == 1 and b is not None else b, **k))}),
}


@pytest.mark.parametrize("rule", MUTATIONS)
def test_the_suite_detects_rule_changes(rule, monkeypatch):
    """A builder that breaks one documented rule fails the suite: the tolerance is tight enough."""
    name, patches = MUTATIONS[rule]
    for attribute, value in patches.items():
        monkeypatch.setattr(ref, attribute, value)
    case = next(c for c in CASES if c["name"] == name)
    got = ref.run_case(SUITE, case)
    assert got["max_abs_dev"] > 10 * _limit(case), (rule, got["max_abs_dev"])


def test_the_files_are_what_generate_py_describes():
    """The manifest lists generate.py's cases with their settings (edit the cases, then regenerate)."""
    from conftest import load_script

    generate = load_script(SUITE / "generate.py", "network_suite_generate")
    assert [c["name"] for c in CASES] == list(generate.CASES)
    assert MANIFEST["tolerance"] == generate.TOLERANCE
    for case in CASES:
        document, settings, shape, description = generate.CASES[case["name"]]
        assert case["input_shape"] == list(shape) and case["description"] == description
        assert {k: case["build_config"][k] for k in settings} == settings
        assert case["genotype_hash"] == genotype_hash(genotype_from_data(document))
