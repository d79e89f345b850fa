"""Search: Algorithm 1's statistics and gradients, the supernet, and the loop end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from scnas.build import BuildConfig, build_network
from scnas.data import PrepareSettings, architecture_split, fold_cases, prepare_dataset, write_phantom_dataset
from scnas.data.cache import Cache
from scnas.genotype import PAPER_OPS, read_genotype
from scnas.search import (Architecture, SearchConfig, SearchError, SuperNet, cell_edges, load_checkpoint, run_search,
                          sample_choices, sample_full, sample_one, sample_pair)
from scnas.search import sampling as sampling_module
from scnas.search.sampling import choices_from, draw, draw_all, host_copy

from conftest import torchrun, torchrun_report

N_OPS = len(PAPER_OPS)


def test_pair_frequencies_match_algorithm_1_for_fixed_noise(monkeypatch):
    z_bar = torch.tensor([0.40, 0.25, 0.15, 0.08, 0.05, 0.04, 0.02, 0.01])
    # noise log(z_bar) at alpha = 0 and tau = 1 makes softmax((alpha + noise) / tau) exactly z_bar
    monkeypatch.setattr(sampling_module, "gumbel_noise", lambda shape, g=None: z_bar.log().expand(*shape))
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
    active = draw(alpha.expand(draws, -1).contiguous(), "pair", 0.01, generator=torch.Generator().manual_seed(1)).active
    assert torch.all(active.sum(1) == 2)
    observed = active.float().mean(0)
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
    assert torch.all(alpha.grad[~sampled] == 0)              # exactly: Adam would amplify any rounding noise


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
    for cell in net.cells.values():
        for edge in cell.edges.values():
            for op in edge.ops:
                op.register_forward_hook(lambda module, i, o: calls.__setitem__(id(module), calls.get(id(module), 0) + 1))
    choices = sample_choices(dict(arch.alphas), "pair", 1.0, generator=torch.Generator().manual_seed(1))
    net(torch.randn(1, 1, 16, 16, 16), choices)
    zero = PAPER_OPS.index("zero")
    for slot in net.layout:
        cell = net.cells[slot.name]
        for index, edge in enumerate(cell.edges.values()):
            ran = {i for i, op in enumerate(edge.ops) if calls.get(id(op))}
            chosen = set(choices[slot.cell_type][index].active) - {zero}
            assert len(choices[slot.cell_type][index].active) == 2
            assert ran == chosen or (not chosen and ran == {zero})
    assert len(cell_edges(4)) == 14


@pytest.mark.parametrize("stem, nodes", [(6, 4), (6, 5), (48, 4), (48, 5)])
def test_supernet_takes_every_stem_and_node_count_the_builder_takes(stem, nodes):
    # Before the supernet used the builder's cells it crashed whenever stem % nodes != 0
    # (the level-0 skip was added without the builder's projection).
    # On the meta device: shapes are checked as on the CPU, without the arithmetic.
    config = BuildConfig(stem_channels=stem, in_channels=2, num_classes=3)
    arch = Architecture(nodes, list(PAPER_OPS), torch.Generator().manual_seed(0))
    draws = draw_all(host_copy(dict(arch.alphas)), "pair", 1.0, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        net = SuperNet(config, nodes, list(PAPER_OPS))
        alphas = {name: torch.zeros(a.shape) for name, a in arch.alphas.items()}
        out = net(torch.empty(1, 2, 16, 16, 16), choices_from(alphas, draws, 1.0))
    assert out.shape == (1, 3, 16, 16, 16)
    assert ("decoder_normal_0" in net.skips) == (stem % nodes != 0)


def test_supernet_and_builder_share_widths_and_skips():
    from scnas.build import build_network
    from scnas.genotype import random_genotype

    config = BuildConfig(stem_channels=10, in_channels=2, num_classes=3)
    supernet = SuperNet(config, 3, list(PAPER_OPS))
    network = build_network(random_genotype(seed=1, nodes=3, ops=list(PAPER_OPS)), config)
    assert set(supernet.cells) == {slot.name for slot in supernet.layout}
    for name, cell in network.cells.items():
        assert supernet.cells[name].width == cell.width                           # ceil(10 * 2**level / 3)
        assert supernet.cells[name].out_channels == cell.width * 3                # every node concatenated


@pytest.fixture(scope="module")
def search_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    task = write_phantom_dataset(root / "task", cases=6, channels=2, foreground_classes=2, shape=(20, 20, 10),
                                 spacing=(1.0, 1.0, 2.0), seed=1)
    prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    return root / "cache"


def _config(cache, **changes) -> SearchConfig:
    values = dict(data=str(cache), stem=4, patch=(16, 16, 16), epochs=2, steps_per_epoch=3, tau_max=5.0, tau_min=1.0,
                  val_batches=1, seed=5, device="cpu", plots=False)   # drawing takes seconds; one test draws
    return SearchConfig(**{**values, **changes})


def test_tiny_search_writes_a_genotype_that_validates_and_builds(search_cache, tmp_path):
    result = run_search(_config(search_cache, plots=True), tmp_path / "run", progress=False)
    genotype = read_genotype(tmp_path / "run" / "genotype.yaml")
    assert result.epochs_done == 2 and len(result.history) == 2
    assert genotype.provenance.epoch == 2 and genotype.provenance.probabilities
    assert genotype.provenance.search["sampling"] == "pair"
    # the data it saw, for scnas cv's leak check: the task and fold 0's training cases, no validation case
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert genotype.provenance.search["task"] == "Phantom"
    assert genotype.provenance.search["cases"] == sorted(config["cases"]["weight"] + config["cases"]["architecture"])
    assert not set(genotype.provenance.search["cases"]) & set(Cache(search_cache).splits[0]["val"])
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
def test_stopped_and_resumed_search_ends_with_the_same_alpha(search_cache, tmp_path):
    # One run in three calls (2 epochs x 3 steps): stopped inside epoch 1 (after step 1), resumed
    # across the epoch's end and stopped inside epoch 2 (after step 4), resumed to the end.
    config = _config(search_cache, checkpoint_every_steps=1)
    run_search(config, tmp_path / "whole", progress=False)
    stops = []
    for stop_after in (1, 3):
        run_search(config, tmp_path / "parts", resume=bool(stops), progress=False, stop_after_steps=stop_after)
        stops.append(load_checkpoint(tmp_path / "parts" / "checkpoint.pt"))
    assert [(s["epoch"], s["step"], len(s["history"])) for s in stops] == [(0, 1, 0), (1, 1, 1)]
    run_search(config, tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for name, alpha in whole["arch"].items():
        assert torch.equal(alpha, parts["arch"][name])
    # alpha moved after each stop (equal alphas would prove nothing if the resumed steps left alpha alone)
    for stopped in stops:
        assert any((alpha - stopped["arch"][name]).abs().max() > 1e-4 for name, alpha in whole["arch"].items())
    assert len(whole["history"]) == len(parts["history"]) == 2
    assert [h["theta_loss"] for h in whole["history"]] == [h["theta_loss"] for h in parts["history"]]
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
    from scnas.engine import steps

    config = _config(search_cache, epochs=4, steps_per_epoch=2, max_nonfinite=3)

    real = steps.supervised_from_statistics
    calls = {"n": 0}

    def flaky(statistics, weights, **options):
        calls["n"] += 1
        loss = real(statistics, weights, **options)
        return loss * float("nan") if calls["n"] > 8 else loss   # two good epochs (2 steps x 2 losses), then NaN
    monkeypatch.setattr(steps, "supervised_from_statistics", flaky)
    with pytest.raises(SearchError, match="[34] non-finite losses or gradients in a row .* last good checkpoint"):
        run_search(config, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    # epoch 3 only skipped steps, so its end state is still the good one; epoch 4 stopped after one step
    assert state["epoch"] == 3 and state["skipped"] == 2 and all(torch.isfinite(a).all() for a in state["arch"].values())
    assert all(torch.isfinite(t).all() for t in state["net"].values())


def test_search_command_and_bad_settings(cli, search_cache, tmp_path):
    result = cli("search", "--data", search_cache, "--stem", "4", "--patch", "16", "16", "16", "--epochs", "1",
                 "--steps-per-epoch", "2", "--sampling", "one", "--no-plots", "-o", tmp_path / "run")
    assert result.code == 0, result
    assert "epoch 1: theta loss" in result.out and (tmp_path / "run" / "genotype.yaml").exists()
    bad = cli("search", "--data", search_cache, "--sampling", "three", "-o", tmp_path / "bad")
    assert bad.code == 1 and "sampling" in bad.err and bad.err.count("\n") == 1
    odd = cli("search", "--data", search_cache, "--patch", "20", "16", "16", "--epochs", "1", "-o", tmp_path / "odd")
    assert odd.code == 1 and "multiple of 2**depth = 8" in odd.err
    # --depth and --no-augment reach the run (a shallow search of a task with an exact rule)
    shallow = cli("search", "--data", search_cache, "--stem", "2", "--patch", "20", "16", "16", "--depth", "2",
                  "--no-augment", "--epochs", "1", "--steps-per-epoch", "1", "--nodes", "1", "--no-plots",
                  "-o", tmp_path / "shallow")
    assert shallow.code == 0, shallow
    ran = json.loads((tmp_path / "shallow" / "config.json").read_text())
    assert ran["search"]["depth"] == ran["build"]["depth"] == 2 and ran["search"]["augment"] is False


def test_top_k_from_the_command_line_gives_each_node_k_inputs(cli, search_cache, tmp_path):
    result = cli("search", "--data", search_cache, "--stem", "4", "--patch", "16", "16", "16", "--epochs", "1",
                 "--steps-per-epoch", "1", "--nodes", "3", "--derive", "top-k", "--top-k", "1", "--no-plots",
                 "-o", tmp_path / "run")
    assert result.code == 0, result
    genotype = read_genotype(tmp_path / "run" / "genotype.yaml")
    for name in ("encoder_normal", "reduction", "expansion", "decoder_normal"):
        cell = getattr(genotype.cells, name)
        assert sorted(e.target for e in cell.edges) == [2, 3, 4], name     # one input for each of the 3 nodes
        assert all(e.op != "zero" for e in cell.edges)
    assert genotype.provenance.search["derivation"].startswith("top-1")


def test_exponential_tau_falls_geometrically_from_tau_max_to_tau_min():
    exponential = SearchConfig(data="x", epochs=3, tau_max=8.0, tau_min=2.0, tau_schedule="exponential")
    assert [exponential.tau(e) for e in range(3)] == pytest.approx([8.0, 4.0, 2.0])    # 4 = sqrt(8 * 2)
    five = SearchConfig(data="x", epochs=5, tau_max=16.0, tau_min=1.0, tau_schedule="exponential")
    assert [five.tau(e) for e in range(5)] == pytest.approx([16.0, 8.0, 4.0, 2.0, 1.0])
    linear = SearchConfig(data="x", epochs=3, tau_max=8.0, tau_min=2.0, tau_schedule="linear")
    assert [linear.tau(e) for e in range(3)] == pytest.approx([8.0, 5.0, 2.0])
    assert SearchConfig(data="x", epochs=1, tau_max=8.0, tau_min=2.0, tau_schedule="exponential").tau(0) == 2.0


@pytest.mark.slow
def test_two_process_torchrun_keeps_alpha_identical_on_every_rank(search_cache, tmp_path):
    result = torchrun("-m", "scnas", "search", "--data", search_cache, "--stem", "4", "--patch", "16", "16", "16",
                      "--epochs", "1", "--steps-per-epoch", "2", "--device", "cpu", "--batch-size", "2",
                      "--checkpoint", "cells", "--no-plots", "-o", tmp_path / "ddp")
    assert result.returncode == 0, torchrun_report(result)
    assert json.loads((tmp_path / "ddp" / "ranks.json").read_text()) == {"world_size": 2, "alpha_identical": True}
    assert read_genotype(tmp_path / "ddp" / "genotype.yaml").provenance.search["world_size"] == 2


def test_micro_batches_and_checkpointing_do_not_change_the_search(search_cache, tmp_path):
    # Two patches per step as one forward pass, or as two micro-batches with every cell and
    # edge recomputed in backward: the same gradients up to rounding, so the same alpha.
    common = dict(epochs=1, steps_per_epoch=1, batch_size=2, augment=False, val_batches=1)
    whole = run_search(_config(search_cache, **common, checkpoint="off"), tmp_path / "whole", progress=False)
    parts = run_search(_config(search_cache, **common, checkpoint="cells", micro_batch=1), tmp_path / "parts",
                       progress=False)
    assert (whole.plan.micro_batch, parts.plan.micro_batch, parts.plan.checkpoint) == (2, 1, "cells")
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for name, alpha in a["arch"].items():
        # Adam's first step is lr x sign(gradient): a wrong accumulation differs by ~lr = 3e-3
        torch.testing.assert_close(b["arch"][name], alpha, rtol=0, atol=1e-4)
    moved = max(float((a["arch"][n] - initial).abs().max()) for n, initial in
                Architecture(4, list(PAPER_OPS), torch.Generator().manual_seed(5)).state_dict().items())
    assert moved > 1e-3                                  # alpha did move, so the comparison means something
    # Theta (Adam, lr 0.025): gradients of ~0 can flip the sign of an element's first step
    differences = torch.cat([(b["net"][name] - weight).abs().flatten() for name, weight in a["net"].items()])
    assert float((differences > 1e-3).float().mean()) < 0.01 and float(differences.max()) <= 0.05


@pytest.fixture(scope="module")
def observed_search(search_cache, tmp_path_factory):
    """A 3-step search whose every patch tells its case: each case's image is filled with the
    case's number (1, 2, ...); it records, per step, the case numbers of the patches that the
    network sees before Theta's update (the Theta step) and after it (the alpha step), and the
    draws each of the two steps builds its operations from."""
    import dataclasses

    from scnas.search import loop as loop_module
    from scnas.search.loop import SearchLoop

    code = {case: i + 1 for i, case in enumerate(sorted(Cache(search_cache).case_ids))}
    real_load = Cache.load

    def stamped(self, case_id):
        case = real_load(self, case_id)
        return dataclasses.replace(case, image=np.full(case.image.shape, code[case_id], np.float32))

    steps: list[dict] = []
    state = {"phase": None}

    def make(self):
        real_make(self)
        self.net.register_forward_pre_hook(lambda module, args: state["phase"] and steps[-1][state["phase"]].update(
            {int(v) for v in args[0][:, 0].flatten().unique()}))
        self.theta_opt.register_step_post_hook(lambda *_: state.update(phase="alpha"))

    def train_step(self, batch):
        steps.append({"theta": set(), "alpha": set(), "theta_draws": [], "alpha_draws": []})
        state["phase"] = "theta"
        try:
            return real_train_step(self, batch)
        finally:
            state["phase"] = None

    def choices_from(alphas, draws, tau):
        if state["phase"]:
            steps[-1][f"{state['phase']}_draws"].append(draws)
        return real_choices_from(alphas, draws, tau)

    real_make, real_train_step, real_choices_from = SearchLoop.make, SearchLoop.train_step, loop_module.choices_from
    config = _config(search_cache, epochs=1, steps_per_epoch=3, batch_size=2, augment=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Cache, "load", stamped)
        patch.setattr(SearchLoop, "make", make)
        patch.setattr(SearchLoop, "train_step", train_step)
        patch.setattr(loop_module, "choices_from", choices_from)
        run_search(config, tmp_path_factory.mktemp("observed") / "run", progress=False)
    train_ids, _ = fold_cases(Cache(search_cache).splits, config.fold)
    weight_ids, arch_ids = architecture_split(train_ids, seed=config.seed,
                                              architecture_share=config.architecture_share)
    return steps, {code[c] for c in weight_ids}, {code[c] for c in arch_ids}


def test_theta_steps_see_only_the_weight_set_and_alpha_steps_only_the_architecture_set(observed_search):
    steps, weight_set, architecture_set = observed_search
    assert len(steps) == 3 and weight_set and architecture_set and not weight_set & architecture_set
    for step in steps:
        seen = {"theta step": step["theta"], "alpha step": step["alpha"]}
        assert step["theta"] and step["theta"] <= weight_set, (seen, weight_set)
        assert step["alpha"] and step["alpha"] <= architecture_set, (seen, architecture_set)


def test_the_alpha_step_draws_its_own_operations(observed_search):
    # Algorithm 1 samples anew for each step; an alpha step that reused the Theta step's draws
    # would train alpha only on the operations whose weights were just fitted to them.
    steps, _, _ = observed_search
    for step in steps:
        (theta,), alpha = step["theta_draws"], step["alpha_draws"]
        assert alpha and all(a is alpha[0] for a in alpha)     # one draw for all micro-batches of the step
        assert theta.keys() == alpha[0].keys()
        for name in theta:
            assert not torch.equal(theta[name].noise, alpha[0][name].noise), name
