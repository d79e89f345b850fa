"""Search: Algorithm 1's statistics and gradients, the supernet, and the loop end to end."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from scnas.build import BuildConfig, build_network
from scnas.data import PrepareSettings, prepare_dataset, write_phantom_dataset
from scnas.genotype import PAPER_OPS, read_genotype
from scnas.search import (Architecture, SearchConfig, SearchError, SuperNet, cell_edges, load_checkpoint, run_search,
                          sample_full, sample_one, sample_pair)
from scnas.search import sampling as sampling_module
from scnas.search.sampling import draw_pair

N_OPS = len(PAPER_OPS)


def test_pair_frequencies_match_algorithm_1_for_fixed_noise(monkeypatch):
    z_bar = torch.tensor([0.40, 0.25, 0.15, 0.08, 0.05, 0.04, 0.02, 0.01])
    monkeypatch.setattr(sampling_module, "gumbel_softmax", lambda alpha, tau, g=None: z_bar.expand(alpha.shape[0], -1))
    draws = 40_000
    weights = sample_pair(torch.zeros(draws, N_OPS), 1.0, torch.Generator().manual_seed(0))
    chosen = weights > 0
    assert torch.all(chosen.sum(1) == 2)
    counts: dict[tuple[int, int], int] = {}
    for row in chosen.nonzero().reshape(-1, 4)[:, [1, 3]].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    for a, b in itertools.combinations(range(N_OPS), 2):
        expected = float(z_bar[a] + z_bar[b]) / (N_OPS - 1)
        observed = counts.get((a, b), 0) / draws
        assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-4, (a, b)
    pair = chosen[0].nonzero().flatten()
    expected_weights = z_bar[pair] / z_bar[pair].sum()
    torch.testing.assert_close(weights[0, pair], expected_weights)


def test_pair_marginals_over_many_draws_at_low_temperature():
    # As tau -> 0, z_bar is one-hot at the Gumbel-max sample, whose law is softmax(alpha); the other
    # op of the pair is uniform, so P(op in pair) = p + (1 - p) / (|O| - 1).
    alpha = torch.tensor([1.5, 0.5, 0.0, -0.5, -1.0, 0.2, 0.1, -2.0])
    draws = 40_000
    _, first, second = draw_pair(alpha.expand(draws, -1).contiguous(), 0.01, torch.Generator().manual_seed(1))
    observed = torch.zeros(N_OPS)
    observed.index_add_(0, torch.cat([first, second]), torch.ones(2 * draws))
    observed /= draws
    p = torch.softmax(alpha, -1)
    expected = p + (1 - p) / (N_OPS - 1)
    assert torch.all((observed - expected).abs() < 0.012)


def test_pair_weights_are_differentiable_for_both_sampled_ops():
    alpha = torch.randn(14, N_OPS, requires_grad=True)
    weights = sample_pair(alpha, 2.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(weights.sum(1), torch.ones(14))
    (weights * torch.randn(14, N_OPS, generator=torch.Generator().manual_seed(3))).sum().backward()
    sampled = weights.detach() > 0
    assert torch.all(alpha.grad[sampled] != 0)
    assert torch.all(alpha.grad[~sampled].abs() < 1e-6)      # others only through the shared normaliser


def test_one_and_full_modes():
    alpha = torch.randn(5, N_OPS, requires_grad=True)
    one = sample_one(alpha, 1.0, torch.Generator().manual_seed(0))
    assert torch.all((one.detach() > 0.5).sum(1) == 1) and torch.allclose(one.detach().sum(1), torch.ones(5))
    (one * torch.arange(N_OPS, dtype=torch.float)).sum().backward()
    assert torch.all(alpha.grad != 0)                         # straight-through: every alpha gets a gradient
    torch.testing.assert_close(sample_full(alpha.detach()), torch.softmax(alpha.detach(), -1))


def test_supernet_runs_only_the_sampled_ops():
    config = BuildConfig(stem_channels=4, in_channels=1, num_classes=2)
    net = SuperNet(config, 2, list(PAPER_OPS))
    arch = Architecture(2, list(PAPER_OPS), torch.Generator().manual_seed(0))
    calls: dict[int, int] = {}
    for cell in net.cells:
        for edge in cell.edges:
            for op in edge.ops:
                op.register_forward_hook(lambda module, i, o: calls.__setitem__(id(module), calls.get(id(module), 0) + 1))
    weights = {name: sample_pair(a, 1.0, torch.Generator().manual_seed(1)) for name, a in arch.alphas.items()}
    net(torch.randn(1, 1, 16, 16, 16), weights)
    for slot, cell in zip(net.layout, net.cells):
        for index, edge in enumerate(cell.edges):
            ran = {i for i, op in enumerate(edge.ops) if calls.get(id(op))}
            chosen = set(weights[slot.cell_type][index].nonzero().flatten().tolist()) - {PAPER_OPS.index("zero")}
            assert ran == chosen or (not chosen and ran == {PAPER_OPS.index("zero")})
    assert len(cell_edges(4)) == 14


@pytest.fixture(scope="module")
def search_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    task = write_phantom_dataset(root / "task", cases=6, channels=2, classes=2, shape=(20, 20, 10),
                                 spacing=(1.0, 1.0, 2.0), seed=1)
    prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    return root / "cache"


def _config(cache, **changes) -> SearchConfig:
    values = dict(data=str(cache), stem=4, patch=(16, 16, 16), epochs=2, steps_per_epoch=3, tau_max=5.0, tau_min=1.0,
                  val_batches=1, seed=5, device="cpu")
    return SearchConfig(**{**values, **changes})


def test_tiny_search_writes_a_genotype_that_validates_and_builds(search_cache, tmp_path):
    result = run_search(_config(search_cache), tmp_path / "run", progress=False)
    genotype = read_genotype(tmp_path / "run" / "genotype.yaml")
    assert result.epochs_done == 2 and len(result.history) == 2
    assert genotype.provenance.epoch == 2 and genotype.provenance.probabilities
    assert genotype.provenance.search["sampling"] == "pair"
    net = build_network(genotype, BuildConfig(stem_channels=4, in_channels=2, num_classes=3))
    assert net(torch.randn(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert {"theta_loss", "alpha_loss", "architecture_dice", "tau", "alpha_entropy"} <= set(json.loads(lines[0]))
    assert json.loads(lines[0])["tau"] == 5.0 and json.loads(lines[1])["tau"] == 1.0
    for name in ("losses.png", "alpha_reduction.png"):
        assert (tmp_path / "run" / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "run" / "genotypes").iterdir()) == ["epoch_0001.yaml", "epoch_0002.yaml"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["search"]["theta_betas"] == [0.1, 0.001] and len(config["tau_per_epoch"]) == 2
    assert not set(config["cases"]["weight"]) & set(config["cases"]["architecture"])


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 4])
def test_stopped_and_resumed_search_ends_with_the_same_alpha(search_cache, tmp_path, stop_after):
    config = _config(search_cache, checkpoint_every_steps=1)
    run_search(config, tmp_path / "whole", progress=False)
    run_search(config, tmp_path / "parts", progress=False, stop_after_steps=stop_after)
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["epoch"] < 2
    run_search(config, tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for name, alpha in whole["arch"].items():
        assert torch.equal(alpha, parts["arch"][name])
    assert whole["history"] == parts["history"] or all(
        a["theta_loss"] == b["theta_loss"] for a, b in zip(whole["history"], parts["history"]))
    assert (tmp_path / "whole" / "genotype.yaml").read_text().split("provenance")[0] == \
        (tmp_path / "parts" / "genotype.yaml").read_text().split("provenance")[0]


def test_resume_needs_the_same_settings_and_a_new_run_an_empty_folder(search_cache, tmp_path):
    config = _config(search_cache, epochs=1, steps_per_epoch=1)
    run_search(config, tmp_path / "run", progress=False)
    with pytest.raises(SearchError, match="already holds a search"):
        run_search(config, tmp_path / "run", progress=False)
    with pytest.raises(SearchError, match="settings that differ from the run's \\(stem\\)"):
        run_search(_config(search_cache, epochs=1, steps_per_epoch=1, stem=6), tmp_path / "run", resume=True)
    run_search(_config(search_cache, epochs=2, steps_per_epoch=1), tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(search_cache, tmp_path, monkeypatch):
    from scnas.search import loop

    config = _config(search_cache, epochs=4, steps_per_epoch=2, max_nonfinite=3)
    real = loop.soft_jaccard_loss
    calls = {"n": 0}

    def flaky(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if calls["n"] > 8 else loss   # two good epochs (2 steps x 2 losses), then NaN
    monkeypatch.setattr(loop, "soft_jaccard_loss", flaky)
    with pytest.raises(SearchError, match="3 non-finite losses or gradients in a row .* last good checkpoint"):
        run_search(config, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    # epoch 3 only skipped steps, so its end state is still the good one; epoch 4 stopped after one step
    assert state["epoch"] == 3 and state["skipped"] == 2 and all(torch.isfinite(a).all() for a in state["arch"].values())
    assert all(torch.isfinite(t).all() for t in state["net"].values())


def test_search_command_and_bad_settings(cli, search_cache, tmp_path):
    result = cli("search", "--data", search_cache, "--stem", "4", "--patch", "16", "16", "16", "--epochs", "1",
                 "--steps-per-epoch", "2", "--sampling", "one", "-o", tmp_path / "run")
    assert result.code == 0, result
    assert "epoch 1: theta loss" in result.out and (tmp_path / "run" / "genotype.yaml").exists()
    bad = cli("search", "--data", search_cache, "--sampling", "three", "-o", tmp_path / "bad")
    assert bad.code == 1 and "sampling" in bad.err and bad.err.count("\n") == 1
    odd = cli("search", "--data", search_cache, "--patch", "20", "16", "16", "--epochs", "1", "-o", tmp_path / "odd")
    assert odd.code == 1 and "multiple of 2**depth = 8" in odd.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun_keeps_alpha_identical_on_every_rank(search_cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "scnas", "search", "--data", str(search_cache), "--stem", "4",
               "--patch", "16", "16", "16", "--epochs", "1", "--steps-per-epoch", "2", "--device", "cpu",
               "-o", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "ranks.json").read_text()) == {"world_size": 2, "alpha_identical": True}
    assert read_genotype(tmp_path / "ddp" / "genotype.yaml").provenance.search["world_size"] == 2


@pytest.mark.slow
def test_search_demo_leaves_a_complete_run_folder(cli, tmp_path):
    result = cli("search", "--demo", "-o", tmp_path / "demo")
    assert result.code == 0, result
    run = tmp_path / "demo"
    for name in ("genotype.yaml", "metrics.jsonl", "config.json", "checkpoint.pt", "plots/losses.png",
                 "plots/alpha_encoder_normal.png", "genotypes/epoch_0003.yaml", "phantoms/dataset.json", "cache/cache.json"):
        assert (run / name).exists(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert cli("validate", run / "genotype.yaml").code == 0
