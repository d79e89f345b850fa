"""Honest evaluation: derivation rules, the loss choice, FLOP matching, model selection, and
the cross-validation study with random baselines (``scnas cv``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scnas.build import BuildConfig, network_stats
from scnas.metrics import dice_per_class, soft_jaccard_loss
from scnas.build.stats import match_flops, network_flops, parse_flops_reference
from scnas.data import write_phantom_dataset
from scnas.genotype import NUM_INPUTS, PAPER_OPS, builtin_genotype, random_genotype, read_genotype, write_genotype
from scnas.search import cell_edges, derive_genotype
from scnas.search.derive import alpha_movement, recorded_probabilities, rederive
from scnas.train import TrainError, run_training
from scnas.apps.cv import CVError, compare, parse_shard, run_study, verdict, write_report
from scnas.apps.cv.report import gflops
from scnas.train.trainer import TrainConfig, check_unselected

CELLS = ("encoder_normal", "reduction", "decoder_normal", "expansion")


def _probabilities(nodes: int, favour: dict[tuple[int, int], tuple[str, float]]) -> dict[str, torch.Tensor]:
    """Uniform softmax(alpha) on every edge, except ``favour``: (from, to) -> (op, its probability)."""
    pairs = cell_edges(nodes)
    n = len(PAPER_OPS)
    table = torch.full((len(pairs), n), 1.0 / n)
    for (source, target), (op, p) in favour.items():
        row = pairs.index((source, target))
        table[row] = (1.0 - p) / (n - 1)
        table[row, PAPER_OPS.index(op)] = p
    return {name: table.clone() for name in CELLS}


def test_top2_keeps_the_two_strongest_inputs_of_each_node_with_their_best_nonzero_op():
    favour = {(0, 2): ("conv_3x3x3", 0.5), (1, 2): ("zero", 0.9),   # node 2 has only two inputs: both stay
              (2, 3): ("sep_dil2_conv_3x3x3", 0.4), (0, 3): ("identity", 0.3), (1, 3): ("max_pool_3x3x3", 0.2),
              (3, 4): ("conv_3x3x3", 0.6), (2, 4): ("avg_pool_3x3x3", 0.25)}
    genotype = derive_genotype(_probabilities(3, favour), 3, list(PAPER_OPS), top_k=2)
    cell = getattr(genotype.cells, "encoder_normal")
    incoming = {t: sorted((e.source, e.op) for e in cell.edges if e.target == t) for t in range(NUM_INPUTS, 5)}
    assert incoming[2][0] == (0, "conv_3x3x3") and incoming[2][1][0] == 1 and incoming[2][1][1] != "zero"
    assert incoming[3] == [(0, "identity"), (2, "sep_dil2_conv_3x3x3")]
    assert incoming[4] == [(2, "avg_pool_3x3x3"), (3, "conv_3x3x3")]
    assert all(len(v) == 2 for v in incoming.values()) and cell.concat == [2, 3, 4]


def test_argmax_drops_edges_whose_strongest_op_is_zero_and_nodes_left_without_inputs():
    pairs = cell_edges(2)
    favour = {pair: ("zero", 0.6) for pair in pairs}
    favour[(0, 2)] = ("conv_3x3x3", 0.6)
    favour[(2, 3)] = ("conv_3x3x3", 0.6)    # node 3 fed only from node 2, which is fed
    genotype = derive_genotype(_probabilities(2, favour), 2, list(PAPER_OPS), top_k=None)
    cell = getattr(genotype.cells, "reduction")
    assert [(e.source, e.target, e.op) for e in cell.edges] == [(0, 2, "conv_3x3x3"), (2, 3, "conv_3x3x3")]
    favour[(0, 2)] = ("zero", 0.6)          # now node 2 gets nothing: its edge to 3 goes too
    genotype = derive_genotype(_probabilities(2, favour), 2, list(PAPER_OPS), top_k=None)
    edges = getattr(genotype.cells, "reduction").edges
    assert len(edges) == 1 and edges[0].target == 2 and edges[0].op != "zero"   # the strongest non-zero into 2


def test_derive_again_from_a_genotype_and_how_far_alpha_moved(tmp_path, cli):
    favour = {(0, 2): ("conv_3x3x3", 0.5)}
    searched = derive_genotype(_probabilities(4, favour), 4, list(PAPER_OPS), top_k=None,
                               provenance={"search": {"derivation": "argmax"}})
    write_genotype(searched, tmp_path / "g.yaml")
    probabilities = recorded_probabilities(read_genotype(tmp_path / "g.yaml"))
    assert torch.allclose(probabilities["expansion"], _probabilities(4, favour)["expansion"], atol=1e-6)
    movement = alpha_movement(probabilities)
    assert movement["encoder_normal"]["largest_x_uniform"] == pytest.approx(4.0)
    again = rederive(searched, "top-k", 2)
    assert all(len(getattr(again.cells, n).edges) == 8 for n in CELLS)   # 4 nodes x 2 inputs (node 2: its 2)
    assert again.provenance.search["derivation"].startswith("top-2")
    result = cli("derive", tmp_path / "g.yaml", "-o", tmp_path / "top2.yaml")
    assert result.code == 0, result
    assert "4.00x" in result.out and read_genotype(tmp_path / "top2.yaml").cells == again.cells
    bad = cli("derive", "uresnet", "-o", tmp_path / "x.yaml")       # no recorded probabilities
    assert bad.code == 1 and "does not exist" in bad.err
    write_genotype(builtin_genotype("uresnet"), tmp_path / "plain.yaml")
    bad = cli("derive", tmp_path / "plain.yaml", "-o", tmp_path / "x.yaml")
    assert bad.code == 1 and "provenance.probabilities" in bad.err and not (tmp_path / "x.yaml").exists()


def test_jaccard_losses_on_a_hand_computed_case():
    # 2 voxels, 2 classes, certain predictions: voxel 0 predicted 1 (truth 1), voxel 1 predicted 1 (truth 0).
    logits = torch.tensor([[-50.0, 50.0], [-50.0, 50.0]]).T.reshape(1, 2, 2, 1, 1)
    target = torch.tensor([1, 0]).reshape(1, 2, 1, 1)
    # class 1: intersection 1, union 2 -> distance 0.5; class 0: intersection 0, union 1 -> distance 1.
    assert float(soft_jaccard_loss(logits, target, eps=0)) == pytest.approx(0.75)
    assert float(soft_jaccard_loss(logits, target, eps=0, foreground_only=True)) == pytest.approx(0.5)
    prediction, truth = torch.tensor([1, 1, 0, 2]), torch.tensor([1, 0, 0, 0])
    scores = dice_per_class(prediction, truth, 3)
    assert scores[0] == pytest.approx(2 / 3) and scores[1] == 0.0
    assert math.isnan(dice_per_class(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)[0])


def test_jaccard_loss_at_the_default_eps_is_zero_for_a_class_correctly_absent():
    # 4 voxels, 3 classes: classes 0 and 1 predicted right with certainty, class 2 absent from
    # both prediction and truth. The smoothing term makes the absent class's distance
    # 1 - (0 + eps) / (0 + eps) = 0, not 1, and changes a present class's by ~eps only.
    logits = torch.tensor([[50.0, -50.0, -50.0], [50.0, -50.0, -50.0], [-50.0, 50.0, -50.0],
                           [-50.0, 50.0, -50.0]]).T.reshape(1, 3, 4, 1, 1)
    target = torch.tensor([0, 0, 1, 1]).reshape(1, 4, 1, 1)
    assert float(soft_jaccard_loss(logits, target)) == pytest.approx(0.0, abs=1e-4)
    assert float(soft_jaccard_loss(logits, target, foreground_only=True)) == pytest.approx(0.0, abs=1e-4)
    assert float(soft_jaccard_loss(logits, target, eps=0)) == pytest.approx(1 / 3)   # without it: distance 1
    # voxel 1 predicted 1: class 0 IoU 1/2, class 1 IoU 2/3, class 2 still absent (distance ~0)
    wrong = logits.clone()
    wrong[0, :, 1] = torch.tensor([-50.0, 50.0, -50.0]).reshape(3, 1, 1)
    assert float(soft_jaccard_loss(wrong, target)) == pytest.approx((1 / 2 + 1 / 3 + 0) / 3, abs=1e-4)
    assert float(soft_jaccard_loss(wrong, target, foreground_only=True)) == pytest.approx((1 / 3 + 0) / 2, abs=1e-4)


def test_flops_matching_widens_a_genotype_to_within_five_percent():
    config = BuildConfig(stem_channels=68, in_channels=4, num_classes=4)
    assert network_flops(builtin_genotype("uresnet"), config, (64, 64, 32)) == \
        network_stats(builtin_genotype("uresnet"), config, (64, 64, 32)).flops
    target, described = parse_flops_reference("uresnet@32", config, (128, 128, 128))
    assert described == "uresnet at stem 32"
    genotype = random_genotype(3)
    stem, flops = match_flops(genotype, target, config)
    assert abs(flops / target - 1) <= 0.05
    for neighbour in (stem - 2, stem - 1, stem + 1, stem + 2):   # the nearest stem (FLOPs are not monotonic in it)
        other = network_flops(genotype, config.model_copy(update={"stem_channels": neighbour}))
        assert abs(other - target) >= abs(flops - target)
    assert parse_flops_reference("425G", config, (128, 128, 128))[0] == 425_000_000_000
    from scnas.build import BuildError

    for bad in ("uresnet@x", "12x", "-3G"):
        with pytest.raises(BuildError, match="--match-flops"):
            parse_flops_reference(bad, config, (128, 128, 128))


def test_build_match_flops_command(cli):
    result = cli("build", "minimal", "--match-flops", "uresnet@68", "--json")
    assert result.code == 0, result
    matched = json.loads(result.out)["match_flops"]
    assert abs(matched["difference"]) <= 0.05 and json.loads(result.out)["config"]["stem_channels"] == matched["stem"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    return write_phantom_dataset(root / "task", cases=6, channels=1, foreground_classes=1, shape=(24, 24, 16),
                                 spacing=(1.0, 1.0, 1.0), seed=2)


def test_only_a_last_epoch_model_of_the_same_fold_may_score_its_validation_cases(task, tmp_path, cli):
    config = TrainConfig(data=str(task), spacing=(1.0, 1.0, 1.0), stem=2, patch=(16, 16, 16), batch_size=1, epochs=1,
                         steps_per_epoch=1, val_patches=1, device="cpu")
    run_training(builtin_genotype("minimal"), config, tmp_path / "run", progress=False)
    from scnas.build import read_model_info

    validation = json.loads((tmp_path / "run" / "config.json").read_text())["cases"]["validation"]
    check_unselected(read_model_info(tmp_path / "run" / "model.safetensors").metadata, validation, "m")
    best = read_model_info(tmp_path / "run" / "model_best.safetensors").metadata
    with pytest.raises(TrainError, match="selected by best validation Dice"):
        check_unselected(best, validation, "m")
    with pytest.raises(TrainError, match="other validation cases"):
        check_unselected(read_model_info(tmp_path / "run" / "model.safetensors").metadata, validation[:-1], "m")
    with pytest.raises(TrainError, match="says nothing of its training"):
        check_unselected({}, validation, "m")
    refused = cli("predict", tmp_path / "run" / "model_best.safetensors", "-i", task / "imagesTr", "-o",
                  tmp_path / "pred", "--validation-of", tmp_path / "run")
    assert refused.code == 1 and "model.safetensors" in refused.err and not (tmp_path / "pred").exists()
    accepted = cli("predict", tmp_path / "run" / "model.safetensors", "-i", task / "imagesTr", "-o", tmp_path / "pred",
                   "--validation-of", tmp_path / "run")
    assert accepted.code == 0, accepted
    scored = cli("evaluate", tmp_path / "pred", task / "labelsTr", "--validation-of", tmp_path / "run")
    assert scored.code == 0 and f"({len(validation)} cases)" in scored.out, scored


def _request(task, **changes):
    train = TrainConfig(data=str(task), patch=(16, 16, 16), batch_size=1, epochs=2, steps_per_epoch=1, val_patches=1,
                        device="cpu", lr=1e-3, plots=False)
    train = train.model_dump(mode="json", exclude={"data", "fold", "stem", "spacing"})
    return {"genotypes": ["minimal"], "data": str(task), "spacing": [1.0, 1.0, 1.0], "folds": [0, 1], "random": 1,
            "random_seed": 0, "stem": 2, "train": train, **changes}


def test_cv_study_scores_last_epoch_models_resumes_shards_and_compares_with_random(task, tmp_path):
    out = tmp_path / "study"
    said: list[str] = []
    assert run_study(out, _request(task), shard="1/2", say=said.append) is None    # jobs 1 and 3 of 4
    assert "2 of 4 jobs done" in said[-1]
    with pytest.raises(CVError, match="2 of 4 jobs are not done"):
        write_report(out)
    with pytest.raises(CVError, match="other settings \\(random 2 \\(the study's: 1\\)\\)"):
        run_study(out, _request(task, random=2), say=said.append)
    report = run_study(out, None, shard="2/2", say=said.append)              # continues the stored study
    plan = json.loads((out / "cv.json").read_text())
    assert [g["kind"] for g in plan["genotypes"]] == ["given", "random"]
    random_entry = plan["genotypes"][1]
    assert abs(random_entry["flops"] / plan["genotypes"][0]["flops"] - 1) <= 0.25   # tiny stems: coarse steps
    for name in ("minimal", random_entry["name"]):
        for fold in (0, 1):
            job = out / "jobs" / name / f"fold_{fold}"
            record = json.loads((job / "evaluation.json").read_text())
            assert record["model_selection"] == "last epoch" and record["model_epoch"] == 2 == record["epochs_done"]
            assert sorted(record["cases"]) == sorted(plan["validation"][str(fold)])
            last = [json.loads(line) for line in (job / "train" / "metrics.jsonl").read_text().splitlines()][-1]
            assert last["epoch"] == 2
    assert report is not None and report["folds"] == [0, 1]
    assert report["versus_random"]["folds"] == 2 and report["conclusion"]
    # where the random genotype landed against its target, with digits enough to see it
    match = report["flop_matching"][0]
    assert match["genotype"] == random_entry["name"] and match["target"] == plan["genotypes"][0]["flops"]
    assert match["relative"] == pytest.approx(random_entry["flops"] / plan["genotypes"][0]["flops"] - 1)
    assert f"| {random_entry['name']} | all | {random_entry['stem']} | {gflops(random_entry['flops'])} | " \
        f"{gflops(plan['genotypes'][0]['flops'])} (minimal) | {match['relative']:+.2%} |" in \
        (out / "results.md").read_text()
    for suffix in ("md", "csv", "json", "png"):
        assert (out / f"results.{suffix}").exists()
    said.clear()
    run_study(out, _request(task), say=said.append)                          # everything done: skipped
    assert sum("done before, skipped" in line for line in said) == 4


def test_gflops_keep_four_significant_digits():
    """0.09 GFLOPs for four genotypes 6% apart hid the spread; 4 significant digits show it."""
    assert [gflops(f) for f in (91_234_567, 96_700_000, 325_000_000, 6_340_608, 123_456_789_000, 0)] == \
        ["0.09123", "0.09670", "0.3250", "0.006341", "123.5", "0"]


def test_cv_bad_input(task, tmp_path, cli):
    for shard in ("3/2", "0/2", "a/b", "1"):
        with pytest.raises(CVError, match="--shard"):
            parse_shard(shard)
    with pytest.raises(CVError, match="folds 0..4"):
        run_study(tmp_path / "a", _request(task, folds=[0, 7]), say=lambda _: None)
    assert not (tmp_path / "a" / "cv.json").exists()
    with pytest.raises(CVError, match="holds no study"):
        run_study(tmp_path / "b", None, say=lambda _: None)
    from scnas.data import PrepareSettings, prepare_dataset

    prepare_dataset(task, tmp_path / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), progress=False)
    with pytest.raises(CVError, match="prepared at spacing \\[1.0, 1.0, 1.0\\], not the --spacing \\[2.0, 2.0, 2.0\\]"):
        run_study(tmp_path / "f", _request(task, data=str(tmp_path / "cache"), spacing=[2.0, 2.0, 2.0]),
                  say=lambda _: None)
    result = cli("cv", "nosuch.yaml", "--data", task, "-o", tmp_path / "c")
    assert result.code == 1 and "nosuch.yaml" in result.err
    result = cli("cv", "minimal", "--data", task, "--shard", "3/2", "-o", tmp_path / "d")
    assert result.code == 1 and "--shard '3/2'" in result.err
    result = cli("cv", "-o", tmp_path / "e", "--report")
    assert result.code == 1 and "no cv.json" in result.err


def test_the_verdict_says_which_way_and_how_sure():
    better = compare([0.80, 0.82, 0.81, 0.83, 0.80], [[0.70, 0.71, 0.72, 0.70, 0.69], [0.72, 0.70, 0.71, 0.73, 0.70]])
    assert better.folds_better == 5 and better.others_below == 2 and better.paired_t_test_p < 0.05
    line = verdict("found", better, "the random ones")
    assert line.startswith(f"found beat the random ones by {better.mean_difference:.4f} mean Dice (found minus the "
                           f"random ones: +{better.mean_difference:.4f} mean Dice;"), line
    unclear = compare([0.80, 0.70, 0.81, 0.69, 0.80], [[0.75, 0.76, 0.74, 0.75, 0.76]])
    assert unclear.paired_t_test_p > 0.05 and verdict("found", unclear, "random").startswith("no evidence")
    one_fold = compare([0.8], [[0.7]])
    assert one_fold.paired_t_test_p is None and "no winner declared" in verdict("found", one_fold, "random")


def test_the_verdict_names_the_winner_with_a_difference_of_the_same_sign():
    """The winner beats the loser by a positive amount; the signed difference is always
    "first minus them", so a random win shows a negative one, never a positive one."""
    worse = compare([0.60, 0.62, 0.61, 0.63, 0.60], [[0.70, 0.71, 0.72, 0.70, 0.69]])
    assert worse.mean_difference < 0 and worse.paired_t_test_p < 0.05
    line = verdict("found", worse, "random")
    d = -worse.mean_difference
    assert line.startswith(f"random beat found by {d:.4f} mean Dice (found minus random: -{d:.4f} mean Dice; "
                           "found better on 0 of 5 fold(s)"), line


def test_two_folds_support_no_verdict_however_clear():
    two = compare([0.90, 0.91], [[0.50, 0.52]])             # a p below 0.05 from 2 folds
    assert two.paired_t_test_p is not None and two.paired_t_test_p < 0.05
    line = verdict("found", two, "random")
    assert line.startswith("warning: 2 fold(s) cannot support a verdict (at least 3 are needed") and \
        "no winner declared" in line and " beat " not in line, line
    assert verdict("found", compare([0.90, 0.91, 0.92], [[0.50, 0.52, 0.51]]), "random").startswith("found beat")


def _array(task: int, low: int, high: int, count: int, step: int | None = None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low),
           "SLURM_ARRAY_TASK_MAX": str(high), "SLURM_ARRAY_TASK_COUNT": str(count)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


def test_shard_auto_maps_every_slurm_array_task_to_exactly_one_share():
    # --array=0-4, --array=1-5 and --array=10-18:2: five tasks, shares 1..5 of 5, each once.
    for low, step in ((0, None), (1, None), (10, 2)):
        ids = [low + k * (step or 1) for k in range(5)]
        shares = [parse_shard("auto", _array(i, ids[0], ids[-1], 5, step)) for i in ids]
        assert shares == [(k, 5) for k in range(1, 6)]
    assert parse_shard(" AUTO ", _array(3, 3, 3, 1)) == (1, 1)          # an array of one task


def test_shard_auto_refuses_outside_an_array_and_uneven_arrays(tmp_path, cli, monkeypatch):
    with pytest.raises(CVError, match="not a task of a Slurm job array"):
        parse_shard("auto", {"SLURM_JOB_ID": "7"})                      # a plain sbatch job
    with pytest.raises(CVError, match="must be set beside"):
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "2"})
    with pytest.raises(CVError, match="not one evenly stepped range"):
        parse_shard("auto", _array(3, 1, 7, 3))                         # --array=1,3,7
    with pytest.raises(CVError, match="not one evenly stepped range"):
        parse_shard("auto", _array(3, 0, 8, 5, 2))                      # id off the step
    with pytest.raises(CVError, match="SLURM_ARRAY_TASK_ID='x'"):
        parse_shard("auto", {**_array(0, 0, 1, 2), "SLURM_ARRAY_TASK_ID": "x"})
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    result = cli("cv", "minimal", "--data", tmp_path, "--shard", "auto", "-o", tmp_path / "d")
    assert result.code == 1 and "Slurm job array" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "d").exists()


def test_cv_flags_validation_cases_a_search_saw_and_compares_on_clean_folds_only(task, tmp_path):
    from scnas.genotype import builtin_genotype, write_genotype
    from scnas.apps.cv import plan_study
    from scnas.apps.cv.study import _open_cache

    splits = _open_cache(str(task), (1.0, 1.0, 1.0)).splits       # the study's own (shared) cache
    searched = builtin_genotype("minimal").model_copy(deep=True)
    searched.provenance = type(searched.provenance or builtin_genotype("uresnet").provenance)(
        search={"task": "Phantom", "cases": list(splits[0]["train"])})   # searched on fold 0's training cases
    write_genotype(searched, tmp_path / "found.yaml")
    older = searched.model_copy(deep=True)
    older.provenance.search = {"data": str(task), "fold": 1}            # before search.cases: inferred
    write_genotype(older, tmp_path / "older.yaml")
    elsewhere = searched.model_copy(deep=True)
    elsewhere.provenance.search = {"task": "Hippocampus", "cases": list(splits[0]["train"])}   # a transfer
    write_genotype(elsewhere, tmp_path / "transfer.yaml")

    out, said = tmp_path / "study", []
    request = _request(task, genotypes=[str(tmp_path / n) for n in ("found.yaml", "older.yaml", "transfer.yaml")],
                       folds=[0, 1, 2], random=2)
    plan = plan_study(out, request, say=said.append)
    seen = {e.name: e.search_data for e in plan.genotypes}
    assert seen["found"]["validation_in_search"] == {"0": [], "1": sorted(splits[1]["val"]),
                                                     "2": sorted(splits[2]["val"])}
    assert seen["older"]["cases"] == "inferred from search fold 1" and seen["older"]["validation_in_search"]["1"] == []
    assert seen["transfer"] is None and "random-0" in seen and seen["random-0"] is None
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 2 and "found's search saw" in warnings[0] and "clean fold(s): 0" in warnings[0]

    # Jobs' results as evaluation.json would hold them: found wins the folds its search saw, loses the clean one.
    dice = {"found": [0.60, 0.90, 0.90], "older": [0.5] * 3, "transfer": [0.5] * 3,
            "random-0": [0.70, 0.50, 0.52], "random-1": [0.68, 0.52, 0.50]}
    for name, values in dice.items():
        for fold, value in zip([0, 1, 2], values):
            folder = out / "jobs" / name / f"fold_{fold}"
            folder.mkdir(parents=True)
            (folder / "evaluation.json").write_text(json.dumps({"model_selection": "last epoch",
                                                                 "mean": {"1": value}}))
    said.clear()
    report = write_report(out, say=said.append)
    assert report["clean_folds"] == {"found": [0], "older": [1], "transfer": [0, 1, 2]}
    assert report["versus_random"]["folds_better"] == 2                            # all folds: found looks better
    clean = report["versus_random_clean_folds"]
    assert clean["folds_used"] == [0] and clean["folds_better"] == 0 and clean["mean_difference"] < 0
    assert any(line.startswith("on clean fold(s) only (0): warning: 1 fold(s) cannot support a verdict")
               for line in report["conclusion"])
    assert "optimistic" in (out / "results.md").read_text()
