"""Fitting the paper's scale: activation checkpointing, micro-batches, mixed precision, the
memory planner, and steps that never read the device back."""

from __future__ import annotations

import json

import pytest
import torch

from scnas.build import BuildConfig, build_network
from scnas.metrics import soft_jaccard_loss
from scnas.build.allocations import PeakTracker
from scnas.build.memory_plan import MemoryPlanError, StepProfile, _Simulation, choose_plan, training_step_profile
from scnas.byte_sizes import format_bytes, parse_bytes
from scnas.genotype import PAPER_OPS, random_genotype
from scnas.search import Architecture, SuperNet
from scnas.search.sampling import choices_from, draw_all, host_copy
from scnas.engine.steps import Precision, StepMeter, accumulate_exact, guarded_step, split_batch

OPS = list(PAPER_OPS)


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["cells", "edges"])
def test_checkpointed_network_has_the_gradients_of_the_unchecked_one(mode):
    torch.manual_seed(0)
    genotype = random_genotype(seed=3, nodes=3, ops=OPS)   # every kind of op, several per cell
    net = build_network(genotype, BuildConfig(stem_channels=6, in_channels=2, num_classes=3))
    x, y = torch.randn(2, 2, 16, 16, 16), torch.randint(0, 3, (2, 16, 16, 16))
    results = {}
    for checkpointing in ("off", mode):
        net.zero_grad(set_to_none=True)
        net.set_checkpointing(checkpointing)
        loss = soft_jaccard_loss(net(x), y)
        loss.backward()
        results[checkpointing] = (loss.detach(), _gradients(net))
    assert results["off"][0] == results[mode][0]
    assert results["off"][1].keys() == results[mode][1].keys() and len(results["off"][1]) > 20
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["cells", "edges"])
def test_checkpointed_supernet_has_the_gradients_of_the_unchecked_one_for_theta_and_alpha(mode):
    # float64 and seeded: edge checkpointing does not share the pre-activations
    # (scnas.build.network.SHARE_PREACTIVATION), so gradients reach a state in another order of
    # summation. In float32 that rounding reached 1.5e-4 of a tensor's largest entry at one of 14
    # seeds (and failed a 1e-4 bound); in float64 it is at most 2.4e-12 over the same seeds.
    torch.manual_seed(0)
    net = SuperNet(BuildConfig(stem_channels=5, in_channels=1, num_classes=2), 3, OPS).double()
    arch = Architecture(3, OPS, torch.Generator().manual_seed(0)).double()
    x, y = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64), torch.randint(0, 2, (1, 16, 16, 16))
    draws = draw_all(host_copy(dict(arch.alphas)), "pair", 2.0, generator=torch.Generator().manual_seed(4))
    results = {}
    for checkpointing in ("off", mode):
        net.zero_grad(set_to_none=True)
        arch.zero_grad(set_to_none=True)
        net.set_checkpointing(checkpointing)
        soft_jaccard_loss(net(x, choices_from(dict(arch.alphas), draws, 2.0)), y).backward()
        results[checkpointing] = {**_gradients(net), **_gradients(arch)}
    assert any(name.startswith("alphas.") for name in results["off"])
    for name, grad in results["off"].items():
        torch.testing.assert_close(results[mode][name], grad, rtol=1e-9, atol=1e-9 * float(grad.abs().max()), msg=name)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    # The soft Jaccard loss sums over the batch before dividing, so this only holds because
    # accumulate_exact backpropagates through the loss linearised at the whole batch's sums.
    net = build_network(random_genotype(seed=1, nodes=2, ops=OPS), BuildConfig(stem_channels=4, in_channels=2,
                                                                               num_classes=3))
    x, y = torch.randn(3, 2, 16, 16, 16), torch.randint(0, 3, (3, 16, 16, 16))
    precision = Precision("off", torch.device("cpu"))
    whole = soft_jaccard_loss(net(x), y)
    whole.backward()
    expected = _gradients(net)
    for micro in (1, 2):          # micro-batches of 1, 1, 1 and of 2, 1
        net.zero_grad(set_to_none=True)
        loss = accumulate_exact(net, split_batch(x, y, micro), precision.backward, precision=precision)
        torch.testing.assert_close(loss, whole.detach())
        for name, grad in expected.items():
            torch.testing.assert_close(_gradients(net)[name], grad, rtol=1e-4, atol=1e-6, msg=f"{micro}: {name}")
    # what plain accumulation of per-micro-batch losses would give instead: not the same
    net.zero_grad(set_to_none=True)
    for xb, yb in split_batch(x, y, 1):
        (soft_jaccard_loss(net(xb), yb) / 3).backward()
    naive = _gradients(net)
    assert any(not torch.allclose(naive[n], g, rtol=1e-3) for n, g in expected.items())


def test_split_batch_is_as_even_as_possible():
    x, y = torch.zeros(8, 1, 8, 8, 8), torch.zeros(8, 8, 8, 8)
    assert [len(b[0]) for b in split_batch(x, y, 3)] == [3, 3, 2]
    assert [len(b[0]) for b in split_batch(x, y, 8)] == [8]


def test_a_step_never_reads_the_device_back():
    # On the meta device any .item(), .cpu() or .tolist() of a tensor fails, so a step that
    # runs there takes no host synchronisation: sampling reads one host copy of alpha.
    arch = Architecture(2, OPS, torch.Generator().manual_seed(0))
    draws = draw_all(host_copy(dict(arch.alphas)), "pair", 1.0, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        net = SuperNet(BuildConfig(stem_channels=4, in_channels=1, num_classes=2), 2, OPS)
        alphas = {name: torch.zeros(a.shape, requires_grad=True) for name, a in arch.alphas.items()}
        x, y = torch.empty(2, 1, 16, 16, 16), torch.zeros(2, 16, 16, 16, dtype=torch.long)
    precision = Precision("off", torch.device("meta"))
    loss = accumulate_exact(lambda v: net(v, choices_from(alphas, draws, 1.0)), split_batch(x, y, 1),
                            precision.backward, precision=precision)
    meter = StepMeter(torch.device("meta"), ["loss"])
    meter.record([loss], ~torch.isfinite(loss), ~torch.isfinite(loss))
    assert loss.device.type == "meta" and all(a.grad is not None for a in alphas.values())
    with pytest.raises((NotImplementedError, RuntimeError)):
        meter.read()   # reading back is the one thing that needs a real device


def test_guarded_step_skips_non_finite_gradients_with_and_without_a_scaler():
    for amp in ("off", "fp16"):
        param = torch.nn.Parameter(torch.ones(3))
        optimiser = torch.optim.Adam([param], lr=0.1, fused=True)
        precision = Precision(amp, torch.device("cpu"))
        before = precision.scaler.get_scale() if precision.scaler.is_enabled() else None
        loss = (param * torch.tensor([1.0, float("inf"), 1.0])).sum()
        precision.backward(loss)
        skipped = guarded_step(optimiser, [param], precision, loss=loss, max_norm=12.0)
        assert bool(skipped) and torch.equal(param.detach(), torch.ones(3)), amp
        if before is not None:
            assert precision.scaler.get_scale() < before        # the scaler backs off
        optimiser.zero_grad()
        loss = param.sum()
        precision.backward(loss)
        assert not bool(guarded_step(optimiser, [param], precision, loss=loss, max_norm=12.0))
        assert torch.all(param.detach() < 1.0), amp
        assert int(optimiser.state[param]["step"]) == 1, amp    # the skipped step did not count


def test_step_meter_counts_the_longest_non_finite_streak():
    meter = StepMeter(torch.device("cpu"), ["loss"])
    for value in (0.5, float("nan"), float("nan"), 0.25, float("nan")):
        loss = torch.tensor(value)
        bad = ~torch.isfinite(loss)
        meter.record([loss], bad, bad)
    numbers = meter.read()
    assert numbers == {"loss": 0.75, "n": 2, "skipped": 3, "streak": 1, "skips": 1, "longest": 2, "longest_skips": 2}


def test_a_scaler_that_finds_no_scale_stops_the_run(tmp_path):
    from scnas.errors import ScnasError
    from scnas.engine.steps import SCALER_SKIP_LIMIT, read_checked

    meter = StepMeter(torch.device("cpu"), ["loss"])
    finite = torch.tensor(0.5)
    for _ in range(SCALER_SKIP_LIMIT):     # fp16: the loss is finite, the gradients never are
        meter.record([finite], torch.tensor(True), torch.tensor(False))
    assert meter.read()["longest"] == 0
    with pytest.raises(ScnasError, match="32 steps in a row skipped .* no scale that works"):
        read_checked(meter, 5, ScnasError, epoch=0, step=31, checkpoint=tmp_path / "checkpoint.pt", rate_option="--lr")


def test_profile_extrapolates_exactly_to_other_patches():
    genotype = random_genotype(seed=2, nodes=2, ops=OPS)
    config = BuildConfig(stem_channels=4, in_channels=2, num_classes=3)
    profile = training_step_profile(genotype, config, "off", checkpoint="off", batch=2)
    patch = (40, 32, 24)
    with _Simulation():
        net = build_network(genotype, config)
        params = list(net.parameters())
        tracker = PeakTracker()
        with tracker:
            for p in params:
                p.grad = torch.zeros_like(p)
            x, y = torch.randn(2, 2, *patch), torch.randint(0, 3, (2, *patch))
            soft_jaccard_loss(net(x), y).backward()
    assert profile.transient(2, patch) == pytest.approx(tracker.peak, rel=1e-6)


def test_profiles_order_the_checkpointing_modes_and_mixed_precision_halves_activations():
    genotype = random_genotype(seed=5, nodes=3, ops=OPS)
    config = BuildConfig(stem_channels=4, in_channels=4, num_classes=3)
    patch = (64, 64, 64)
    peaks = {(amp, mode): training_step_profile(genotype, config, amp, checkpoint=mode).transient(1, patch)
             for amp, mode in (("off", "off"), ("off", "cells"), ("off", "edges"), ("fp16", "off"))}
    assert peaks["off", "off"] > 1.5 * peaks["off", "cells"] and peaks["off", "cells"] > peaks["off", "edges"]
    assert 0.4 < peaks["fp16", "off"] / peaks["off", "off"] < 0.6


def _linear_profile(per_unit: float, persistent: int = 0) -> StepProfile:
    return StepProfile((0.0,), (per_unit,), persistent, batch=1)


def test_choose_plan_prefers_accumulation_then_checkpointing_and_refuses_with_what_fits():
    patch = (64, 64, 64)
    voxels = 64 ** 3
    # per patch: off 1 GiB, cells 0.5 GiB, edges 0.25 GiB (plus the 512 MiB workspace allowance)
    per_mode = {"off": 2**30, "cells": 2**29, "edges": 2**28}
    profile_of = lambda mode, batch: _linear_profile(per_mode[mode] / voxels)  # noqa: E731
    plan = choose_plan(profile_of, patch, 8, checkpoint="auto", micro_batch=None, available=4 * 2**30, divisor=8)
    assert (plan.checkpoint, plan.micro_batch) == ("off", 3)             # 3.5 GiB <= 0.9 x 4 GiB
    plan = choose_plan(profile_of, patch, 8, checkpoint="auto", micro_batch=None, available=int(1.5 * 2**30), divisor=8)
    assert (plan.checkpoint, plan.micro_batch) == ("cells", 1)           # off at 1 patch needs 1.5 GiB
    plan = choose_plan(profile_of, patch, 8, checkpoint="auto", micro_batch=None, available=2**30, divisor=8)
    assert (plan.checkpoint, plan.micro_batch) == ("edges", 1)
    assert choose_plan(profile_of, patch, 8, checkpoint="auto", micro_batch=None, available=None,
                       divisor=8).micro_batch == 8   # no budget: no check
    with pytest.raises(MemoryPlanError, match=r"needs about 768 MiB; 700 MiB are available .* patch of 48x48x48 fits"):
        choose_plan(profile_of, patch, 8, checkpoint="auto", micro_batch=None, available=700 * 2**20, divisor=8)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 == parse_bytes("24 G")
    assert parse_bytes("16GB") == 16 * 10**9 and parse_bytes("800MiB") == 800 * 2**20 and parse_bytes("1024") == 1024
    for bad in ("", "lots", "-1GiB", "12 parsecs", "nanGiB"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_bytes(bad)
    assert format_bytes(1.5 * 2**30) == "1.5 GiB" and format_bytes(300 * 2**20) == "300 MiB"


def test_upsampling_stays_in_half_precision_under_autocast():
    from scnas.build.network import Resample

    resample = Resample(4, 4, 1, config=BuildConfig(stem_channels=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resample.conv(torch.randn(1, 4, 4, 4, 4))
        assert out.dtype == torch.bfloat16
        from scnas.build.network import _upsample

        assert _upsample(out, 2).dtype == torch.bfloat16          # autocast alone would give float32


def test_plan_command(cli, tmp_path):
    result = cli("plan", "minimal", "--stem", "4", "--patch", "16", "16", "16", "--batch-size", "4", "--gpu-memory",
                 "2GiB", "--checkpoint", "off", "--no-largest-stem", "-o", tmp_path / "plan.json")
    assert result.code == 0, result
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["kind"] == "training" and [r["checkpoint"] for r in report["rows"]] == ["off"]
    assert report["plan"] == {"checkpoint": "off", "micro_batch": 4, "predicted_peak_bytes": report["rows"][0]["peak"],
                              "available_bytes": 2 * 2**30}
    assert "scnas train would run with checkpointing off, micro-batch 4" in result.out
    small = cli("plan", "--search", "--stem", "4", "--nodes", "1", "--patch", "16", "16", "16", "--gpu-memory", "300MiB",
                "--checkpoint", "off", "--no-largest-stem")
    assert small.code == 1 and "does not fit" in small.out and "needs about" in small.out
    assert "the 'typical' one, a draw at uniform alpha" in small.out
    assert cli("plan", "minimal", "--search").code == 1
    assert "not a memory size" in cli("plan", "minimal", "--gpu-memory", "huge").err


def test_memory_report_compares_every_mode():
    from scnas.genotype import builtin_genotype
    from scnas.apps.memory_report import memory_report

    report = memory_report(BuildConfig(stem_channels=4, in_channels=1, num_classes=2), (16, 16, 16), 2, amp="off",
                           available=2**30, genotype=builtin_genotype("uresnet"), find_stem=False)
    assert [row.checkpoint for row in report.rows] == ["off", "cells", "edges"]
    assert report.rows[0].transient > report.rows[1].transient > report.rows[2].transient
    assert report.plan["checkpoint"] == "off" and report.rows[0].largest_micro_batch > 2


def test_largest_stem_is_the_last_that_fits():
    from scnas.apps.memory_report import _largest_stem

    def profile_for(config):   # transient memory grows with the square of the stem
        return lambda mode, batch: _linear_profile(config.stem_channels ** 2 * 2**20 / 8**3)

    # fits while 512 MiB + stem^2 MiB <= 0.9 x 2 GiB = 1843.2 MiB, so up to stem 36
    assert _largest_stem(BuildConfig(stem_channels=10), profile_for, (8, 8, 8), "off", 1, 2 * 2**30,
                         lambda config: 0) == (36, False)


def test_old_settings_with_amp_as_a_bool_still_load():
    from scnas.search import SearchConfig
    from scnas.train import TrainConfig

    assert SearchConfig(data="x", amp=True).amp == "bf16" and TrainConfig(data="x", amp=False).amp == "off"
    with pytest.raises(ValueError):
        TrainConfig(data="x", gpu_memory="lots")


@pytest.mark.slow
def test_a_non_finite_patch_on_one_process_makes_every_process_skip_the_step(tmp_path):
    from conftest import ROOT, torchrun, torchrun_report

    result = torchrun(ROOT / "tests" / "ddp_nonfinite_step.py", tmp_path, timeout=240)
    assert result.returncode == 0, torchrun_report(result)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert [s["skipped"] for s in report["steps"]] == [False, True, False]
        assert [s["unchanged"] for s in report["steps"]] == [False, True, False]
        assert report["same_weights"]
