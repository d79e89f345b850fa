"""Cells chosen by perturbation (DARTS-PT): the rise in the supernet's loss when one operation
leaves one edge, the cells those scores derive, ``scnas derive --by perturbation``, and the
report read by perturbation; and the second agreement test (operations renamed per run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scnas.data import PrepareSettings, prepare_dataset, write_phantom_dataset
from scnas.genotype import CELL_TYPES, PAPER_OPS, read_genotype
from scnas.search import SearchConfig, run_search
from scnas.search.derive import derive_genotype
from scnas.search.perturb import SCORES_FILE, mixture_choices, perturbation_scores, run_scores
from scnas.search.report import permutation_p, read_run, relabel_p, search_report
from scnas.search.supernet import cell_edges

OPS = list(PAPER_OPS)
EDGES = len(cell_edges(2))


def _uniform() -> dict[str, torch.Tensor]:
    return {c: torch.full((EDGES, len(OPS)), 1 / len(OPS)) for c in CELL_TYPES}


def test_the_mixture_leaves_out_exactly_the_removed_operation():
    p = _uniform()
    whole = mixture_choices(p)
    assert all(choice.active == tuple(range(len(OPS))) for edges in whole.values() for choice in edges)
    cut = mixture_choices(p, ("reduction", 3, 5))
    assert cut["reduction"][3].active == tuple(i for i in range(len(OPS)) if i != 5)
    assert float(cut["reduction"][3].weights[5]) == 0.0 and float(cut["reduction"][3].weights[4]) == 1 / len(OPS)
    assert float(p["reduction"][3, 5]) == 1 / len(OPS)                       # the probabilities are not changed
    assert cut["reduction"][2].active == whole["reduction"][2].active      # other edges keep every op
    assert cut["encoder_normal"][3].active == whole["encoder_normal"][3].active


def test_scores_are_the_rise_in_loss_per_removed_operation():
    """A loss that rises by 0.3 when sep_dil4 leaves edge 1 of the decoder and falls by 0.1 when
    identity leaves edge 0: the scores say exactly that, zero scores 0, unscored cells stay 0."""
    dil4, identity = OPS.index("sep_dil4_conv_3x3x3"), OPS.index("identity")

    def loss_of(choices):
        decoder = choices["decoder_normal"]
        return 0.5 + 0.3 * (dil4 not in decoder[1].active) - 0.1 * (identity not in decoder[0].active)

    base, scores = perturbation_scores(loss_of, _uniform(), OPS, cells=("decoder_normal",))
    assert base == 0.5
    expected = torch.zeros(EDGES, len(OPS), dtype=torch.float64)
    expected[1, dil4], expected[0, identity] = 0.3, -0.1
    assert torch.allclose(scores["decoder_normal"], expected)
    assert all(float(scores[c].abs().sum()) == 0 for c in CELL_TYPES if c != "decoder_normal")


def test_cells_follow_the_scores_and_record_the_probabilities():
    """alpha prefers max-pool everywhere; the scores prefer sep_dil2 on edges into node 2 and
    nothing else: top-k follows the scores, argmax drops the edges no removal hurts."""
    p = {c: torch.softmax(torch.eye(len(OPS))[OPS.index("max_pool_3x3x3")].repeat(EDGES, 1) * 3, -1)
         for c in CELL_TYPES}
    strength = {c: torch.zeros(EDGES, len(OPS)) for c in CELL_TYPES}
    into_2 = [i for i, (s, t) in enumerate(cell_edges(2)) if t == 2]
    for c in CELL_TYPES:
        for i in into_2:
            strength[c][i, OPS.index("sep_dil2_conv_3x3x3")] = 0.2 + 0.01 * i
    by_alpha = derive_genotype(p, 2, OPS, top_k=2)
    assert {e.op for e in by_alpha.cells.reduction.edges} == {"max_pool_3x3x3"}
    by_scores = derive_genotype(p, 2, OPS, top_k=2, strength=strength)
    into_2_ops = [e.op for e in by_scores.cells.reduction.edges if e.target == 2]
    assert into_2_ops == ["sep_dil2_conv_3x3x3"] * 2
    assert by_scores.provenance.probabilities["reduction"][0].p["max_pool_3x3x3"] == pytest.approx(
        float(p["reduction"][0, OPS.index("max_pool_3x3x3")]), abs=1e-5)
    argmax = derive_genotype(p, 2, OPS, strength=strength)
    assert [(e.source, e.target, e.op) for e in argmax.cells.reduction.edges] == \
        [(0, 2, "sep_dil2_conv_3x3x3"), (1, 2, "sep_dil2_conv_3x3x3")]


def test_renamed_operations_see_agreement_that_shuffled_edges_cannot():
    rng = np.random.default_rng(0)
    labels = list(range(1, 8))
    same = np.full((5, 5), 5)                                 # five runs, one operation on every edge
    assert permutation_p(same, rng, permutations=500) == 1.0
    assert relabel_p(same, labels, rng, permutations=2000) < 0.01
    with pytest.raises(ValueError, match=r"choices \[0\] are not among the labels"):
        relabel_p(np.zeros((2, 3), dtype=int), labels, rng, permutations=10)
    mostly = np.array([[5, 5, 5, 5, 2], [5, 5, 1, 5, 5], [3, 5, 5, 5, 5], [5, 5, 5, 7, 5], [5, 6, 5, 5, 5]])
    assert relabel_p(mostly, labels, rng, permutations=2000) < 0.05
    values = [relabel_p(rng.integers(1, 8, size=(4, 5)), labels, rng, permutations=200) for _ in range(40)]
    assert 0.25 < float(np.mean(values)) < 0.75 and min(values) >= 1 / 201


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny search with every op on every edge (--sampling full), as the scores want it."""
    root = tmp_path_factory.mktemp("perturb")
    task = write_phantom_dataset(root / "task", cases=6, channels=1, foreground_classes=1, shape=(16, 16, 16),
                                 spacing=(1.0, 1.0, 1.0), seed=2)
    prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    config = SearchConfig(data=str(root / "cache"), stem=2, nodes=2, depth=1, patch=(16, 16, 16), epochs=2,
                          steps_per_epoch=2, val_batches=1, seed=1, device="cpu", plots=False, sampling="full",
                          augment=False)
    run_search(config, root / "run", progress=False)
    return root / "run"


def test_derive_by_perturbation_scores_the_run_once_and_records_it(full_run, tmp_path, cli):
    result = cli("derive", full_run, "--by", "perturbation", "--patches", "2", "-o", tmp_path / "pt.yaml")
    assert result.code == 0, result
    assert "loss of the full mixture" in result.out
    kept = json.loads((full_run / SCORES_FILE).read_text())
    assert kept["epoch"] == 2 and kept["settings"] == {"patches": 2, "seed": 0} and kept["sampling"] == "full"
    assert kept["seconds"] > 0 and kept["base_loss"] > 0
    derived = read_genotype(tmp_path / "pt.yaml")
    search = derived.provenance.search
    assert search["derivation"].startswith("perturbation (DARTS-PT)") and search["perturbation"]["base_loss"] > 0
    for cell in CELL_TYPES:                   # each kept edge carries the op of its largest rise
        rows = np.array(kept["scores"][cell])
        rows[:, OPS.index("zero")] = -np.inf
        best = {pair: OPS[int(rows[i].argmax())] for i, pair in enumerate(cell_edges(2))}
        assert all(e.op == best[(e.source, e.target)] for e in getattr(derived.cells, cell).edges)
    # the run's scores are the ones a direct call computes, and a second call reuses the file
    stamp = (full_run / SCORES_FILE).stat().st_mtime_ns
    assert run_scores(full_run, patches=2)["scores"] == kept["scores"]
    assert (full_run / SCORES_FILE).stat().st_mtime_ns == stamp
    again = run_scores(full_run, patches=3)                          # other settings: scored again
    assert again["settings"]["patches"] == 3 and (full_run / SCORES_FILE).stat().st_mtime_ns != stamp


def test_the_report_reads_each_edge_by_its_scores(full_run, tmp_path):
    run_scores(full_run, patches=2)
    run = read_run(full_run, "perturbation")
    scores = json.loads((full_run / SCORES_FILE).read_text())["scores"]["expansion"]
    edges, best = run.best("expansion")
    rows = np.array(scores)
    rows[:, 0] = -np.inf
    assert list(best) == [int(rows[cell_edges(2).index(pair)].argmax()) for pair in edges]
    assert run.derived is not run.genotype and run.derived.provenance.search["derivation"].startswith("perturbation")
    report = search_report([full_run, full_run], permutations=100, by="perturbation")
    assert report["cells"]["expansion"]["agreement"] == 1.0 and "agreement_p_relabelled" in report["cells"]["expansion"]


def test_perturbation_refuses_what_it_cannot_score(full_run, tmp_path, cli):
    result = cli("derive", full_run / "genotype.yaml", "--by", "perturbation", "-o", tmp_path / "x.yaml")
    assert result.code == 1 and "needs the search run folder" in result.err and "Traceback" not in result.err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "genotype.yaml").write_text((full_run / "genotype.yaml").read_text())
    result = cli("derive", bare, "--by", "perturbation", "-o", tmp_path / "x.yaml")
    assert result.code == 1 and "no checkpoint.pt" in result.err and not (tmp_path / "x.yaml").exists()
    result = cli("search-report", bare, "--by", "perturbation")
    assert result.code == 1 and "scnas derive" in result.err and "--by perturbation" in result.err
    (bare / SCORES_FILE).write_text(json.dumps({**json.loads((full_run / SCORES_FILE).read_text()), "epoch": 1}))
    result = cli("search-report", bare, "--by", "perturbation")
    assert result.code == 1 and "epoch 1" in result.err and "epoch 2" in result.err


def test_a_checkpoint_worse_than_its_last_epoch_is_named(full_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(full_run, copy)
    (copy / SCORES_FILE).unlink(missing_ok=True)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    said = []
    honest = run_scores(copy, patches=1, say=said.append)
    assert honest["last_epoch_alpha_loss"] == pytest.approx(json.loads(lines[-1])["alpha_loss"], abs=1e-6)
    assert not any("warning" in line for line in said)
    last = {**json.loads(lines[-1]), "alpha_loss": honest["base_loss"] / 3}     # the search did far better
    (copy / "metrics.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    said.clear()
    run_scores(copy, patches=1, seed=1, say=said.append)
    assert any(line.startswith(f"warning: {copy}: the supernet of the checkpoint") for line in said)


def test_scores_belong_to_one_checkpoint_and_a_damaged_file_is_named(full_run, tmp_path, cli):
    import shutil

    from scnas.search.loop import load_checkpoint
    from scnas.search.perturb import PerturbationError

    copy = tmp_path / "run"
    shutil.copytree(full_run, copy)
    first = run_scores(copy, patches=1)
    # the same epoch and settings, but another search state (a new search in the same folder): scored again
    state = load_checkpoint(copy / "checkpoint.pt")
    state["arch"] = {name: alpha + 0.5 * torch.arange(alpha.numel()).view_as(alpha) for name, alpha in state["arch"].items()}
    torch.save(state, copy / "checkpoint.pt")
    second = run_scores(copy, patches=1)
    assert second["alpha_sha256"] != first["alpha_sha256"] and second["scores"] != first["scores"]
    # the report follows each run's own scores: two runs whose scores differ do not agree everywhere
    run_scores(full_run, patches=1)
    report = search_report([full_run, copy], permutations=100, by="perturbation")
    mine, theirs = read_run(full_run, "perturbation"), read_run(copy, "perturbation")
    for cell in CELL_TYPES:
        same = float(np.mean(mine.best(cell)[1] == theirs.best(cell)[1]))
        assert report["cells"][cell]["agreement"] == pytest.approx(same, abs=1e-4)
    assert any(report["cells"][c]["agreement"] < 1 for c in CELL_TYPES)
    # a damaged file: the report names it, scoring treats it as missing
    damaged = json.loads((copy / SCORES_FILE).read_text())
    del damaged["scores"]["reduction"][-1]
    (copy / SCORES_FILE).write_text(json.dumps(damaged))
    result = cli("search-report", full_run, copy, "--by", "perturbation", "--permutations", "100")
    assert result.code == 1 and "scores.reduction is not 5 rows of 8 numbers" in result.err and \
        "Traceback" not in result.err
    assert len(run_scores(copy, patches=1)["scores"]["reduction"]) == 5
    # a checkpoint saved inside an epoch is refused before any scoring
    state["step"] = 3
    torch.save(state, copy / "checkpoint.pt")
    with pytest.raises(PerturbationError, match="saved inside an epoch"):
        run_scores(copy, patches=2)
    result = cli("derive", copy, "--by", "perturbation", "-o", tmp_path / "x.yaml")
    assert result.code == 1 and "inside an epoch" in result.err and not (tmp_path / "x.yaml").exists()
