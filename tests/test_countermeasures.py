"""Telling a finding from noise: countermeasures to collapse (warm-up, a penalty on
parameter-free operations, a cap at derivation), R-DARTS's Hessian indicator, and the report
over several searches (agreement between seeds, parameter-free share, alpha per epoch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scnas.data import PrepareSettings, prepare_dataset, write_phantom_dataset
from scnas.genotype import PAPER_OPS, read_genotype, write_genotype
from scnas.search import Architecture, SearchConfig, run_search
from scnas.search.derive import derive_genotype, free_mass, parameter_free_indices, recorded_probabilities, rederive
from scnas.search.hessian import dominant_eigenvalue
from scnas.search.report import SearchReportError, permutation_p, relabel_p, search_report
from scnas.search.supernet import cell_edges

OPS = list(PAPER_OPS)
FREE = ["identity", "max_pool_3x3x3", "avg_pool_3x3x3"]


def test_parameter_free_operations_are_identity_and_pooling():
    assert [OPS[i] for i in parameter_free_indices(OPS)] == FREE


def test_dominant_eigenvalue_of_a_quadratic_is_its_largest_eigenvalue():
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    spectrum = torch.tensor([5.0, -2.0, 1.5, 1.0, 0.5, 0.1], dtype=torch.float64)
    matrix = basis @ torch.diag(spectrum) @ basis.T
    x = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)   # a second, flat parameter
    loss = 0.5 * x @ matrix @ x + 0.0 * y.sum()
    value = dominant_eigenvalue(loss, [x, y], iterations=60, generator=torch.Generator().manual_seed(1))
    assert value == pytest.approx(5.0, rel=1e-6)


def _probabilities(best: dict[str, list[str]], strength: float = 0.6, seed: int = 0) -> dict[str, torch.Tensor]:
    """softmax(alpha)-like rows: on edge i of a cell type, op best[cell][i] gets ``strength``."""
    rng = np.random.default_rng(seed)
    result = {}
    for cell, ops in best.items():
        rows = []
        for op in ops:
            row = rng.uniform(0.5, 1.0, len(OPS))
            row = row / row.sum() * (1 - strength)
            row[OPS.index(op)] += strength
            rows.append(row)
        result[cell] = torch.tensor(np.array(rows), dtype=torch.float32)
    return result


CELLS = ("encoder_normal", "reduction", "decoder_normal", "expansion")


def test_the_cap_keeps_the_strongest_parameter_free_ops_and_gives_the_others_weights():
    edges = len(cell_edges(2))                                       # 5 candidate edges for 2 nodes
    p = _probabilities({c: ["identity"] * edges for c in CELLS})
    p["reduction"][3, OPS.index("identity")] += 0.2                   # edge 3 holds the strongest identity
    p["reduction"] = p["reduction"] / p["reduction"].sum(-1, keepdim=True)
    plain = derive_genotype(p, 2, OPS, top_k=2)
    capped = derive_genotype(p, 2, OPS, top_k=2, max_free=1)
    pairs = cell_edges(2)
    for cell in CELLS:
        assert all(e.op == "identity" for e in plain.cell(cell).edges)
        ops = {(e.source, e.target): e.op for e in capped.cell(cell).edges}
        assert sum(op in FREE for op in ops.values()) == 1
        assert set(ops) == {(e.source, e.target) for e in plain.cell(cell).edges}   # the same edges
        for pair, op in ops.items():
            if op not in FREE:       # the edge's most probable op with weights
                row = p[cell][pairs.index(pair)]
                weighted = [i for i, name in enumerate(OPS) if name not in FREE and name != "zero"]
                assert op == OPS[max(weighted, key=lambda i: float(row[i]))]
    kept = [e for e in capped.cell("reduction").edges if e.op == "identity"]
    assert [(e.source, e.target) for e in kept] == [pairs[3]]
    again = rederive(plain, "top-k", 2, max_free=0)
    assert not any(e.op in FREE for c in CELLS for e in again.cell(c).edges)
    assert "at most 0 parameter-free" in again.provenance.search["derivation"]


def test_free_mass_is_the_mean_probability_on_parameter_free_ops():
    alphas = [torch.zeros(3, len(OPS), requires_grad=True), torch.zeros(5, len(OPS), requires_grad=True)]
    mass = free_mass(alphas, OPS)
    assert float(mass.detach()) == pytest.approx(2 * 3 / 8)
    mass.backward()
    free = parameter_free_indices(OPS)
    assert all(float(a.grad[0, i]) > 0 for a in alphas for i in free)   # descending it lowers their alpha
    assert all(float(a.grad[0, i]) < 0 for a in alphas for i in range(len(OPS)) if i not in free)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("countermeasures")
    task = write_phantom_dataset(root / "task", cases=6, channels=1, foreground_classes=1, shape=(20, 20, 10),
                                 spacing=(1.0, 1.0, 2.0), seed=3)
    prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    return root / "cache"


def _search(cache, folder, **changes):
    config = SearchConfig(**{**dict(data=str(cache), stem=4, nodes=2, patch=(16, 16, 16), epochs=2, steps_per_epoch=3,
                                    tau_max=5.0, tau_min=1.0, val_batches=1, seed=5, device="cpu", plots=False,
                                    alpha_lr=0.3), **changes})
    run_search(config, folder, progress=False)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _free_mass(genotype_path) -> float:
    p = recorded_probabilities(read_genotype(genotype_path))
    return float(sum(q[:, parameter_free_indices(OPS)].sum(-1).mean() for q in p.values()))


@pytest.fixture(scope="module")
def plain(cache, tmp_path_factory):
    """The paper's search, no countermeasure: what the others are compared with."""
    folder = tmp_path_factory.mktemp("plain") / "run"
    return folder, _search(cache, folder)


def test_warm_up_keeps_alpha_still_and_the_hessian_is_measured_each_epoch(cache, plain, tmp_path):
    metrics = _search(cache, tmp_path / "counter", warmup_epochs=1, hessian_iterations=3)
    # warm-up: alpha did not move in epoch 1 (the genotype of epoch 1 records the initial softmax(alpha))
    initial = {name: torch.softmax(a, -1) for name, a in Architecture(2, OPS, torch.Generator().manual_seed(5))
               .alphas.items()}
    first = recorded_probabilities(read_genotype(tmp_path / "counter" / "genotypes" / "epoch_0001.yaml"))
    for name, p in initial.items():
        torch.testing.assert_close(first[name], p.detach(), atol=2e-6, rtol=0)
    moved = recorded_probabilities(read_genotype(tmp_path / "counter" / "genotype.yaml"))
    assert any(float((moved[n] - initial[n]).abs().max()) > 1e-3 for n in initial)     # epoch 2 moved alpha
    assert metrics[0].get("warm_up") is True and "warm_up" not in metrics[1]
    assert np.isfinite(metrics[0]["alpha_loss"]) and 0 < metrics[0]["alpha_loss"] < 1
    assert all(np.isfinite(m["alpha_hessian_eigenvalue"]) for m in metrics)
    assert "alpha_hessian_eigenvalue" not in plain[1][0]
    search = read_genotype(tmp_path / "counter" / "genotype.yaml").provenance.search
    assert search["countermeasures"] == {"warmup_epochs": 1}
    assert "countermeasures" not in read_genotype(plain[0] / "genotype.yaml").provenance.search


def test_the_penalty_moves_alpha_off_parameter_free_ops(cache, plain, tmp_path):
    _search(cache, tmp_path / "penalty", free_penalty=20.0)
    initial = 4 * 3 / 8                       # four cell types, 3 of 8 ops, near-uniform alpha
    penalised, unpenalised = _free_mass(tmp_path / "penalty" / "genotype.yaml"), _free_mass(plain[0] / "genotype.yaml")
    assert penalised < 0.5 * initial and penalised < 0.5 * unpenalised


def test_the_hessian_measurement_leaves_the_search_unchanged(cache, plain, tmp_path):
    _search(cache, tmp_path / "b", hessian_iterations=2)          # two epochs: the second must be unchanged too
    a, b = (read_genotype(folder / "genotype.yaml").provenance.probabilities for folder in (plain[0], tmp_path / "b"))
    assert a == b


def test_warm_up_must_leave_epochs_for_alpha():
    with pytest.raises(ValueError, match="warmup_epochs"):
        SearchConfig(data="x", epochs=3, warmup_epochs=3)


def _fake_run(folder, best, seed, epochs=2, strength=0.6, eigen=None, loss=None):
    """A search run folder as 'scnas search' writes it, with chosen best ops per edge (and
    ``loss``: its supernet's losses in every epoch)."""
    (folder / "genotypes").mkdir(parents=True)
    lines = []
    for epoch in range(1, epochs + 1):
        p = _probabilities(best, strength * epoch / epochs, seed=seed * 10 + epoch)
        genotype = derive_genotype(p, 2, OPS, top_k=2, provenance={"search": {"seed": seed}})
        write_genotype(genotype, folder / "genotypes" / f"epoch_{epoch:04d}.yaml")
        lines.append(json.dumps({"epoch": epoch, **({"alpha_hessian_eigenvalue": eigen[epoch - 1]} if eigen else {}),
                                 **({"theta_loss": loss, "alpha_loss": loss + 0.01} if loss is not None else {})}))
    write_genotype(genotype, folder / "genotype.yaml")
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_report_tells_agreement_from_chance_and_collapse_from_a_finding(tmp_path):
    rng = np.random.default_rng(0)
    weighted = ["conv_3x3x3", "sep_dil2_conv_3x3x3", "sep_dil3_conv_3x3x3", "sep_dil4_conv_3x3x3"]
    n = len(cell_edges(2))
    planted = {c: [weighted[i % 4] if i % 2 else FREE[i % 3] for i in range(n)] for c in CELLS}
    agreeing = [_fake_run(tmp_path / f"found{s}", planted, s, eigen=[0.1, 0.2]) for s in range(4)]
    report = search_report(agreeing, permutations=2000)
    for cell in CELLS:
        assert report["cells"][cell]["agreement"] == 1.0 and report["cells"][cell]["agreement_p"] < 0.05
    assert report["agreement_chance"] == pytest.approx(1 / 7, abs=1e-4)
    assert "4 of 4 cell types" in report["verdict"][0]
    first = report["per_epoch"][str(agreeing[0])]
    assert [row["epoch"] for row in first] == [1, 2] and first[1]["hessian_eigenvalue"] == 0.2
    assert first[1]["parameter_free"]["reduction"] > first[0]["parameter_free"]["reduction"] > 0

    collapsed = [_fake_run(tmp_path / f"pool{s}", {c: ["max_pool_3x3x3"] * n for c in CELLS}, s) for s in range(4)]
    report = search_report(collapsed, permutations=2000)
    assert all(e["agreement"] == 1.0 and e["agreement_p"] == 1.0 for e in report["cells"].values())
    assert report["parameter_free_share_mean"] == 1.0 > report["random_parameter_free_share"]
    assert "a sign of collapse" in report["verdict"][1] and "0 of 4 cell types" in report["verdict"][0]
    assert report["parameter_free_p_more"] < 0.01 < report["parameter_free_p_less"]

    noise = [_fake_run(tmp_path / f"noise{s}", {c: list(rng.choice(weighted + FREE, n)) for c in CELLS}, s)
             for s in range(4)]
    report = search_report(noise, permutations=2000)
    assert sum(e["agreement_p"] < 0.05 for e in report["cells"].values()) <= 1
    assert "as many as random genotypes have" in report["verdict"][1]


def test_report_names_a_run_whose_supernet_learned_less(tmp_path, cli):
    n = len(cell_edges(2))
    best = {c: ["conv_3x3x3"] * n for c in CELLS}
    runs = [_fake_run(tmp_path / f"r{s}", best, s, loss=loss) for s, loss in enumerate([0.03, 0.04, 0.035, 0.42])]
    report = search_report(runs, permutations=200)
    assert [r["alpha_loss"] for r in report["runs"]] == [0.04, 0.05, 0.045, 0.43]
    assert report["runs"][3]["theta_loss"] == 0.42
    assert "r3 (0.430) against the best run's 0.040" in report["verdict"][-1]
    assert "r0" not in report["verdict"][-1] and "learned less" in report["verdict"][-1]
    result = cli("search-report", *runs, "--permutations", "200")
    assert result.code == 0 and "r3 (0.430)" in result.out
    # close losses, tiny ones twice apart, large ones 0.1 apart, or no losses at all: nothing named
    for losses in ([0.03, 0.05, 0.04], [0.004, 0.01, 0.02], [0.2, 0.3, 0.25]):
        close = [_fake_run(tmp_path / f"c{s}-{losses[1]}", best, s, loss=loss) for s, loss in enumerate(losses)]
        assert "learned less" not in search_report(close, permutations=200)["verdict"][-1]
    plain = [_fake_run(tmp_path / f"plain{s}", best, s) for s in range(2)]
    report = search_report([*plain, runs[0]], permutations=200)
    assert "alpha_loss" not in report["runs"][0] and "learned less" not in report["verdict"][-1]
    # a diverged run (NaN) first: named, and the 0.43 run still measured against the best finite one
    diverged = _fake_run(tmp_path / "nan", best, 9, loss=float("nan"))
    verdict = search_report([diverged, *runs], permutations=200)["verdict"][-1]
    assert "nan (nan)" in verdict and "r3 (0.430) against the best run's 0.040" in verdict
    assert "agreement_p_relabelled_within_kind" in report["cells"]["decoder_normal"]


def test_renaming_within_kind_does_not_count_avoiding_parameter_free_ops_as_agreement():
    rng = np.random.default_rng(3)
    weighted, free = [3, 4, 5, 6], [0, 1, 2]
    # runs that pick weighted ops at random: they agree on "weighted" alone
    avoiding = rng.choice(weighted, size=(5, 14))
    assert relabel_p(avoiding, weighted + free, rng, permutations=500) < 0.05
    assert relabel_p(avoiding, [weighted, free], rng, permutations=500) > 0.05
    # runs that share one weighted op on most edges agree under either renaming
    shared = np.where(rng.random((5, 14)) < 0.7, 6, rng.choice(weighted, size=(5, 14)))
    assert relabel_p(shared, [weighted, free], rng, permutations=500) < 0.05
    with pytest.raises(ValueError, match="not among the labels"):
        relabel_p(avoiding, [[3, 4], free], rng, permutations=10)
    with pytest.raises(ValueError, match="overlap"):
        relabel_p(avoiding, [weighted, [2, 3]], rng, permutations=10)
    # the report's other p-values do not depend on the within-kind test's draws
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    assert relabel_p(shared, weighted + free, rng_a, permutations=200) == \
        relabel_p(shared, [weighted + free], rng_b, permutations=200)


def test_permutation_p_is_uniformish_under_the_null():
    rng = np.random.default_rng(1)
    values = [permutation_p(rng.integers(0, 7, size=(3, 14)), rng, permutations=200) for _ in range(40)]
    assert 0.25 < float(np.mean(values)) < 0.75 and min(values) >= 1 / 201


def test_report_command_and_bad_input(tmp_path, cli):
    n = len(cell_edges(2))
    runs = [_fake_run(tmp_path / f"r{s}", {c: ["conv_3x3x3"] * n for c in CELLS}, s) for s in range(2)]
    result = cli("search-report", *runs, "-o", tmp_path / "report.json", "--permutations", "200")
    assert result.code == 0, result
    assert "chance agreement 0.143" in result.out and "parameter-free operations: 0%" in result.out
    assert "fewer than random genotypes have" in result.out
    assert json.loads((tmp_path / "report.json").read_text())["cells"]["reduction"]["agreement"] == 1.0
    result = cli("search-report", tmp_path / "nothing")
    assert result.code == 1 and "no genotype.yaml" in result.err
    result = cli("search-report", *runs, "--planted-cells", "decoder_normal")
    assert result.code == 1 and "--planted-cells" in result.err and "--planted" in result.err
    from scnas.search.planted import context_genotype

    write_genotype(context_genotype(4), tmp_path / "context.yaml")
    result = cli("search-report", *runs, "--planted", tmp_path / "context.yaml", "--planted-cells", "decoder_normal",
                 "--permutations", "200", "-o", tmp_path / "counted.json")
    assert result.code == 0, result
    counted = json.loads((tmp_path / "counted.json").read_text())["planted"]
    assert counted["counted_cells"] == ["decoder_normal"] and counted["trials"] == 2 * 4
    result = cli("search-report", *runs, "--planted", tmp_path / "context.yaml", "--planted-cells", "decoder")
    assert result.code == 1 and "planted cells ['decoder']" in result.err and "Traceback" not in result.err
    other = tmp_path / "other"
    (other / "genotypes").mkdir(parents=True)
    p = {c: torch.full((len(cell_edges(3)), len(OPS)), 1 / len(OPS)) for c in CELLS}
    write_genotype(derive_genotype(p, 3, OPS, top_k=2), other / "genotype.yaml")
    with pytest.raises(SearchReportError, match="one search space"):
        search_report([runs[0], other])


def _planted_genotype(op: str):
    from scnas.genotype import genotype_from_data

    cell = {"edges": [{"from": 0, "to": 2, "op": op}, {"from": 1, "to": 2, "op": "conv_3x3x3"},
                      {"from": 2, "to": 3, "op": op}], "concat": [2, 3]}
    return genotype_from_data({"format": "scnas-genotype", "version": 1, "nodes": 2,
                               "cells": {c: cell for c in CELLS}})


def test_a_planted_task_is_made_by_its_genotype_and_reproducible(tmp_path):
    import nibabel as nib

    from scnas.search.planted import write_planted_dataset

    dilated, plain = _planted_genotype("sep_dil3_conv_3x3x3"), _planted_genotype("conv_3x3x3")
    labels = {}
    for name, genotype in (("a", dilated), ("b", dilated), ("c", plain)):
        task = write_planted_dataset(tmp_path / name, genotype, cases=5, shape=(16, 16, 16), stem=2, seed=1)
        labels[name] = [np.asarray(nib.load(task / "labelsTr" / f"planted_{i:03d}.nii.gz").dataobj) for i in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(labels["a"], labels["b"]))          # same arguments, same files
    share = np.mean([lab.mean() for lab in labels["a"][:4]])
    assert share == pytest.approx(0.3, abs=0.01)                                        # calibrated on 4 cases
    assert np.mean([np.mean(a != c) for a, c in zip(labels["a"], labels["c"])]) > 0.1   # the genotype makes them
    image = nib.load(tmp_path / "a" / "imagesTr" / "planted_000.nii.gz").get_fdata()
    assert np.all(image != 0) and abs(image.mean()) < 1e-3                              # nothing cropped, z-normalised
    with pytest.raises(ValueError, match="multiples of 8"):
        write_planted_dataset(tmp_path / "d", dilated, shape=(12, 16, 16))


def test_recovery_counts_planted_ops_against_chance(tmp_path):
    planted = _planted_genotype("sep_dil3_conv_3x3x3")
    n = len(cell_edges(2))
    pairs = cell_edges(2)
    best = {c: ["max_pool_3x3x3"] * n for c in CELLS}
    for c in CELLS:
        for e in planted.cell(c).edges:
            best[c][pairs.index((e.source, e.target))] = e.op
    found = [_fake_run(tmp_path / f"f{s}", best, s) for s in range(3)]
    report = search_report(found, permutations=200, planted=planted)["planted"]
    assert report["recovered"] == 1.0 and report["trials"] == 3 * 4 * 3 and report["p"] < 1e-6
    assert report["x_chance"] == pytest.approx(7.0) and report["x_chance_among_weighted"] == pytest.approx(4.0)
    collapsed = [_fake_run(tmp_path / f"c{s}", {c: ["max_pool_3x3x3"] * n for c in CELLS}, s) for s in range(2)]
    report = search_report(collapsed, permutations=200, planted=planted)
    assert report["planted"]["recovered"] == 0.0 and report["planted"]["p"] == 1.0
    assert "planted operations recovered on 0%" in report["verdict"][1]


def test_multiset_recovery_ignores_the_order_of_edges_within_a_cell(tmp_path):
    planted = _planted_genotype("sep_dil3_conv_3x3x3")     # (0,2) dil3, (1,2) conv, (2,3) dil3 in every cell
    pairs, n = cell_edges(2), len(cell_edges(2))
    swapped = {c: ["max_pool_3x3x3"] * n for c in CELLS}
    for c in CELLS:                                         # the two inputs of node 2 swap their ops
        swapped[c][pairs.index((0, 2))], swapped[c][pairs.index((1, 2))] = "conv_3x3x3", "sep_dil3_conv_3x3x3"
        swapped[c][pairs.index((2, 3))] = "sep_dil3_conv_3x3x3"
    report = search_report([_fake_run(tmp_path / f"s{s}", swapped, s) for s in range(3)], permutations=200,
                           planted=planted)
    planted_report = report["planted"]
    assert planted_report["recovered"] == pytest.approx(1 / 3, abs=1e-3)       # strict: only (2,3) matches
    multiset = planted_report["multiset"]
    assert multiset["recovered"] == 1.0 and multiset["p"] < 0.01
    assert 1 / 7 < multiset["chance"] < 0.3                  # a multiset match is easier than an edge match
    assert planted_report["cells"]["reduction"]["recovered_as_multiset"] == 1.0
    assert any(line.startswith("as op multisets per cell") for line in report["verdict"])
    collapsed = [_fake_run(tmp_path / f"c{s}", {c: ["max_pool_3x3x3"] * n for c in CELLS}, s) for s in range(2)]
    assert search_report(collapsed, permutations=200, planted=planted)["planted"]["multiset"]["recovered"] == 0.0


def test_the_auxiliary_skip_adds_the_input_on_edges_of_stride_1_only():
    from scnas.search.supernet import EdgeChoice, MixedEdge

    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, 8)
    for stride in (1, 2):
        edge = MixedEdge(OPS, 2, stride, negative_slope=0.01).eval()
        choice = EdgeChoice(torch.full((len(OPS),), 0.5), (OPS.index("conv_3x3x3"), OPS.index("max_pool_3x3x3")))
        plain = edge(x, choice)
        edge.aux_skip = 0.7
        expected = plain + 0.7 * x if stride == 1 else plain
        torch.testing.assert_close(edge(x, choice), expected)


def test_the_auxiliary_skip_decays_to_zero_and_changes_the_search(cache, plain, tmp_path):
    config = SearchConfig(data="x", epochs=5, aux_skip=1.0)
    assert [config.aux_skip_at(e) for e in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    _search(cache, tmp_path / "aux", aux_skip=1.0)
    genotype = read_genotype(tmp_path / "aux" / "genotype.yaml")
    assert genotype.provenance.search["countermeasures"] == {"aux_skip": 1.0}
    a = recorded_probabilities(read_genotype(plain[0] / "genotype.yaml"))
    b = recorded_probabilities(genotype)
    assert any(float((a[n] - b[n]).abs().max()) > 1e-4 for n in a)


def test_learnability_trains_each_student_alike_and_tells_them_apart():
    from scnas.search.planted import learnability, planted_cases

    planted = _planted_genotype("sep_dil3_conv_3x3x3")
    cases = planted_cases(planted, cases=5, shape=(16, 16, 16), stem=2, seed=1, depth=2)
    assert len(cases) == 5 and cases[0][1].shape == (1, 16, 16, 16) and cases[0][2].shape == (16, 16, 16)
    students = {"planted": planted, "plain": _planted_genotype("conv_3x3x3")}
    first = learnability(cases, students, steps=3, stem=2, depth=2, held_out=2)
    assert first == learnability(cases, students, steps=3, stem=2, depth=2, held_out=2)      # seeded
    assert set(first) == {"planted", "plain"} and all(0 < v < 1 for v in first.values())
    assert first["planted"] != first["plain"]
    assert learnability(cases, {"planted": planted}, steps=0, stem=2, depth=2, held_out=2)["planted"] != \
        first["planted"]                                                                        # the steps train
    with pytest.raises(ValueError, match="more cases"):
        learnability(cases, students, steps=1, held_out=5)
    with pytest.raises(ValueError, match="multiples of 4"):
        planted_cases(planted, cases=2, shape=(18, 16, 16), depth=2)


def test_avoiding_parameter_free_ops_earns_nothing_on_their_planted_edges(tmp_path):
    planted = _planted_genotype("max_pool_3x3x3")          # per cell: 2 max-pool edges, 1 conv edge
    n = len(cell_edges(2))
    weighted_only = [_fake_run(tmp_path / f"w{s}", {c: ["conv_3x3x3"] * n for c in CELLS}, s) for s in range(2)]
    report = search_report(weighted_only, permutations=200, planted=planted)["planted"]
    assert report["chance_among_weighted"] == pytest.approx(1 / 3 / 4, abs=1e-4)
    assert report["recovered"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["x_chance_among_weighted"] == pytest.approx(4.0, abs=0.01)


def test_the_context_task_labels_a_voxel_by_its_partner_offset_voxels_away():
    from scnas.search.planted import CONTEXT_CELLS, context_cases, context_genotype

    cases = context_cases(3, shape=(16, 16, 16), offset=3, threshold=0.5, seed=2)
    assert [c[0] for c in cases] == ["context_000", "context_001", "context_002"]
    _, image, label = cases[1]
    above = image[0] > 0.5
    ahead = (np.arange(16) + 3) % 16                                  # the voxel 3 further along, cyclically
    partner = above[ahead, :, :] | above[:, ahead, :] | above[:, :, ahead]
    assert np.array_equal(label.astype(bool), above & partner)        # the rule, at every voxel
    assert 0.1 < label.mean() < 0.3                     # about p (1 - (1 - p)**3) = 0.21 of the voxels, p = 0.31
    again = context_cases(3, shape=(16, 16, 16), offset=3, threshold=0.5, seed=2)
    assert all(np.array_equal(a[2], b[2]) and np.array_equal(a[1], b[1]) for a, b in zip(cases, again))
    assert not np.array_equal(label, context_cases(2, shape=(16, 16, 16), offset=2, seed=2)[1][2])
    genotype = context_genotype(3)
    assert {e.op for e in genotype.cell("decoder_normal").edges} == {"sep_dil3_conv_3x3x3"} and \
        CONTEXT_CELLS == ("decoder_normal",)
    assert {e.op for c in ("encoder_normal", "reduction", "expansion") for e in genotype.cell(c).edges} == \
        {"conv_3x3x3"}
    with pytest.raises(ValueError, match="offset of 2, 3 or 4"):
        context_cases(1, offset=5)


def test_recovery_can_count_only_the_cells_where_the_task_needs_the_operation(tmp_path):
    from scnas.search.planted import CONTEXT_CELLS, context_genotype

    planted = context_genotype(4)
    pairs, n = cell_edges(2), len(cell_edges(2))
    best = {c: ["max_pool_3x3x3"] * n for c in CELLS}       # nothing recovered outside the decoder-normal cell
    for e in planted.cell("decoder_normal").edges[:2]:      # half of its planted edges recovered
        best["decoder_normal"][pairs.index((e.source, e.target))] = e.op
    found = [_fake_run(tmp_path / f"f{s}", best, s) for s in range(3)]
    counted = search_report(found, permutations=200, planted=planted, planted_cells=CONTEXT_CELLS)["planted"]
    assert counted["counted_cells"] == ["decoder_normal"] and list(counted["cells"]) == ["decoder_normal"]
    assert counted["recovered"] == 0.5 and counted["trials"] == 3 * 4 and counted["x_chance"] == pytest.approx(3.5)
    twice = search_report(found, permutations=200, planted=planted, planted_cells=("decoder_normal",) * 2)
    assert twice["planted"]["trials"] == 3 * 4                       # a cell type named twice counts once
    assert "planted operations (counted in decoder_normal only) recovered on 50%" in twice["verdict"][1]
    everywhere = search_report(found, permutations=200, planted=planted)["planted"]
    assert everywhere["recovered"] == pytest.approx(0.125) and everywhere["trials"] == 3 * 4 * 4
    with pytest.raises(SearchReportError, match="planted cells"):
        search_report(found, permutations=200, planted=planted, planted_cells=("decoder",))
    with pytest.raises(SearchReportError, match="give it as planted"):
        search_report(found, permutations=200, planted_cells=CONTEXT_CELLS)


def _planted_pool():
    """benchmarks/planted_pool.py as a module (it imports only scnas, rich and scipy)."""
    from conftest import ROOT, load_script

    return load_script(ROOT / "benchmarks" / "planted_pool.py")


def _draw(task_seed, hits, first_seed=0, within=0.01):
    summary = {"planted": {"chance": 0.1429, "counted_cells": ["decoder_normal"], "recovered": hits / 20,
                           "trials": 20, "x_chance": round(hits / 20 / 0.1429, 2), "p": 0.5},
               "agreement_p": {"decoder_normal": 0.4, "reduction": 0.001},
               "agreement_p_relabelled": {"decoder_normal": 0.02, "reduction": 0.001},
               "agreement_p_relabelled_within_kind": {"decoder_normal": within, "reduction": 0.001},
               "seeds": 5, "seconds_per_search": 200.0}
    return {"task": "context", "cases": 12, "epochs": 3, "steps_per_epoch": 100, "alpha_lr": 0.01, "depth": 3,
            "counted_cells": ["decoder_normal"], "planted": None, "task_seed": task_seed, "first_seed": first_seed,
            "results": {"s": summary}}


def test_pooling_task_draws_keeps_each_draws_three_agreement_p_values_of_the_counted_cells():
    pool = _planted_pool()
    pooled = pool.pool([_draw(0, 9, within=0.012), _draw(1, 7, within=None)], "s", "alpha", 3.0)
    first, second = pooled["draws"]
    assert first["agreement_p"] == {"decoder_normal": 0.4}          # only the counted cell, all three tests
    assert first["agreement_p_relabelled"] == {"decoder_normal": 0.02}
    assert first["agreement_p_relabelled_within_kind"] == {"decoder_normal": 0.012}
    assert pool._agreement_cell(first) == "0.4 / 0.02 / 0.012"
    assert pool._agreement_cell(second) == "0.4 / 0.02 / -"        # a result written before the within-kind test
    assert pooled["pooled"]["hits"] == 16 and pooled["pooled"]["trials"] == 40
    assert pooled["pooled"]["draws_reaching_target"] == 1            # 9/20 = 3.15x chance; 7/20 = 2.45x


def test_a_draw_split_over_files_is_pooled_as_one_draw_without_its_parts_agreement_p_values():
    pool = _planted_pool()
    pooled = pool.pool([_draw(0, 9), _draw(0, 7, first_seed=5)], "s", "alpha", 3.0)
    (draw,) = pooled["draws"]
    assert (draw["hits"], draw["trials"], draw["seeds"]) == (16, 40, 10)
    for key in pool.AGREEMENT_P:              # a p-value of five seeds is not one of ten
        assert draw[key] == {"decoder_normal": None}
