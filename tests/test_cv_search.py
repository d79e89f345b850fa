"""``scnas cv --search-per-fold``: the honest protocol. Each fold's search sees only the fold's
training cases, is resumable, claimed and recorded like the retraining jobs, and the random
genotypes are matched to each fold's derived genotype."""

from __future__ import annotations

import json

import pytest

from scnas.data import write_phantom_dataset
from scnas.train import TrainConfig
from scnas.apps.cv import CVError, plan_study, read_plan, run_study, search_record
from scnas.apps.cv.report import gflops

SEARCH = {"stem": 2, "patch": [16, 16, 16], "epochs": 2, "steps_per_epoch": 1, "batch_size": 1, "nodes": 2,
          "ops": ["zero", "identity", "conv_3x3x3", "max_pool_3x3x3"], "sampling": "pair", "tau_max": 5.0,
          "tau_min": 0.5, "tau_schedule": "linear", "alpha_lr": 0.1, "derive": "top-k", "top_k": 2, "warmup_epochs": 0,
          "free_penalty": 0.0, "max_free": None, "val_batches": 1, "architecture_share": 0.2, "seed": 0}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("cvsearch") / "task", cases=6, channels=1, foreground_classes=1,
                                 shape=(24, 24, 16), spacing=(1.0, 1.0, 1.0), seed=3)


def _request(task, **changes):
    train = TrainConfig(data=str(task), patch=(16, 16, 16), batch_size=1, epochs=1, steps_per_epoch=1, val_patches=1,
                        device="cpu", lr=1e-3, plots=False, workers="0")
    train = train.model_dump(mode="json", exclude={"data", "fold", "stem", "spacing"})
    search = {**SEARCH, **changes.pop("search", {})}
    return {"genotypes": [], "data": str(task), "spacing": [1.0, 1.0, 1.0], "folds": [0, 1], "random": 2,
            "random_seed": 0, "stem": 4, "train": train, "search": search, **changes}


@pytest.mark.slow   # 2 searches, 4 retrainings, FLOP matching twice: 40 s alone, 150 s on a busy machine
def test_each_fold_is_searched_on_its_training_cases_and_random_genotypes_match_it(task, tmp_path):
    from scnas.build import BuildConfig
    from scnas.build.stats import match_flops, network_flops
    from scnas.data.cache import Cache
    from scnas.genotype import read_genotype

    out, said = tmp_path / "study", []
    # shard 2/2: search/fold_1, then random-0/fold_0, which searches fold 0 first (nobody else does)
    assert run_study(out, _request(task, random=1), shard="2/2", say=said.append) is None
    assert said[0].startswith("search/fold_1: a search on fold 1's") and \
        any(line.startswith("search/fold_0: a search on fold 0's") for line in said)
    report = run_study(out, None, shard="1/2", say=said.append)
    plan = read_plan(out / "cv.json")
    cache = Cache(plan.cache)
    assert [e.name for e in plan.genotypes] == ["searched", "random-0"]
    for fold in plan.folds:
        record = search_record(out, fold)
        validation = set(plan.validation[str(fold)])
        # what the search saw: every training case of its fold, none of its validation cases
        assert set(record.cases) == set(cache.splits[fold]["train"]) and not set(record.cases) & validation
        assert record.validation_in_search == [] and record.task == "Phantom" and record.epoch == 2
        kept = read_genotype(out / record.genotype)
        assert kept.provenance.search["cases"] == record.cases and kept.provenance.search["fold"] == fold
        assert (out / "searches" / f"fold_{fold}" / "config.json").exists()
        assert set(record.alpha_movement) == {"encoder_normal", "reduction", "decoder_normal", "expansion"}
        # each random genotype widened to this fold's derived genotype, and retrained at that stem
        base = BuildConfig(stem_channels=4, in_channels=1, num_classes=2, depth=3)
        assert record.stem == 4 and record.flops == network_flops(kept, base, (16, 16, 16))   # the target
        for match in record.random:
            assert match.fold == fold and match.target == record.flops
            genotype = read_genotype(out / "genotypes" / f"{match.genotype}.yaml")
            assert (match.stem, match.flops) == match_flops(genotype, record.flops, base, patch=(16, 16, 16))
            evaluation = json.loads((out / "jobs" / match.genotype / f"fold_{fold}" / "evaluation.json").read_text())
            assert evaluation["stem"] == match.stem
        evaluation = json.loads((out / "jobs" / "searched" / f"fold_{fold}" / "evaluation.json").read_text())
        assert evaluation["hash"] == record.hash and evaluation["stem"] == 4
    assert report is not None and report["clean_folds"]["searched"] == [0, 1]
    assert [s["validation_cases_in_search"] for s in report["searches"]] == [0, 0]
    assert len(report["flop_matching"]) == 2 and {m["fold"] for m in report["flop_matching"]} == {0, 1}
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Cross-validation\n\nSearch per fold: for each fold a search on that fold's "
                               "training cases only")
    for s in report["searches"]:
        assert f"| {s['fold']} | {s['hash']} | 2/2 | {s['searched_cases']} | 0 | encoder_normal " in markdown
    for m in report["flop_matching"]:
        assert f"| {m['genotype']} | {m['fold']} | {m['stem']} | {gflops(m['flops'])} | {gflops(m['target'])} " \
               f"(searched) | {m['relative']:+.2%} |" in markdown
    assert report["conclusion"][-1].startswith("warning: 2 fold(s) cannot support a verdict")
    said.clear()
    run_study(out, None, say=said.append)
    assert said[:2] == ["[1/6] search/fold_0: done before, skipped", "[2/6] search/fold_1: done before, skipped"]


def test_a_killed_search_resumes_and_a_finished_one_is_skipped(task, tmp_path):
    from scnas.search import run_search
    from scnas.apps.cv.searches import search_config

    out, said = tmp_path / "study", []
    plan = plan_study(out, _request(task, folds=[0], random=0), say=said.append)
    folder = out / "searches" / "fold_0"
    run_search(search_config(plan, 0), folder, progress=False, stop_after_steps=1)   # killed after its first epoch
    first_epoch = (folder / "metrics.jsonl").read_text()
    assert len(first_epoch.splitlines()) == 1 and not (folder / "search.json").exists()
    assert run_study(out, None, say=said.append) is not None
    assert "search/fold_0: resuming the search on fold 0's training cases (2 epochs x 1 steps, stem 2)" in said
    epochs = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(epochs) == 2 and epochs[0] == first_epoch.strip()         # continued, not started again
    record = search_record(out, 0)
    assert record.epoch == 2

    # killed after the search, before its record: finished from the checkpoint without searching again
    (folder / "search.json").unlink()
    (out / "jobs" / "searched" / "fold_0" / "evaluation.json").unlink()
    said.clear()
    run_study(out, None, say=said.append)
    assert (folder / "metrics.jsonl").read_text().splitlines() == epochs
    assert search_record(out, 0).hash == record.hash
    said.clear()
    run_study(out, None, say=said.append)
    assert said[:2] == ["[1/2] search/fold_0: done before, skipped", "[2/2] searched/fold_0: done before, skipped"]
    from scnas.cli.main import interrupted_message

    assert "keeps the study: 1 finished job(s) (their evaluation.json), 1 finished search(es) (search.json), and " \
        "the interrupted job resumes from its last checkpoint" in interrupted_message(["cv", "-o", str(out)])
    # a damaged record is named and the search finished again
    (folder / "search.json").write_text('{"fold": 0, "hash"')
    (out / "jobs" / "searched" / "fold_0" / "evaluation.json").unlink()
    said.clear()
    run_study(out, None, say=said.append)
    assert any(line.startswith(f"{folder / 'search.json'}: is damaged") and line.endswith("finishing it again")
               for line in said), said
    assert search_record(out, 0).hash == record.hash


def test_a_continued_study_refuses_other_search_settings(task, tmp_path, cli, monkeypatch):
    import scnas.apps.cv as cv

    out = tmp_path / "study"
    plan_study(out, _request(task), say=lambda _: None)
    with pytest.raises(CVError, match=r"other settings \(search.alpha_lr 0.3 \(the study's: 0.1\); search.epochs 3 "
                                      r"\(the study's: 2\)\)"):
        plan_study(out, _request(task, search={"epochs": 3, "alpha_lr": 0.3}), say=lambda _: None)
    with pytest.raises(CVError, match=r"other settings \(search null \(the study's: \{"):
        plan_study(out, {**_request(task), "search": None}, say=lambda _: None)

    runs = []
    monkeypatch.setattr(cv, "run_study", lambda out, request, **kwargs: runs.append(request))
    result = cli("cv", "-o", out, "--search-epochs", "3", "--alpha-lr", "0.1")
    assert result.code == 1 and "continues the study with its own settings, but --search-epochs 3 (the study's: 2)" \
        " differs" in result.err and "--alpha-lr" not in result.err, result
    assert cli("cv", "-o", out, "--search-epochs", "2").code == 0 and runs == [None]
    result = cli("cv", "minimal", "--data", task, "--alpha-lr", "0.1", "-o", tmp_path / "other")
    assert result.code == 1 and "--alpha-lr sets the search of a search per fold: add --search-per-fold" in result.err
    # the command line makes the request the library reads
    assert cli("cv", "--search-per-fold", "--data", task, "--search-epochs", "3", "--search-stem", "2", "--nodes", "2",
               "--patch", "16", "16", "16", "-o", tmp_path / "new").code == 0
    search = runs[-1]["search"]
    assert (search["epochs"], search["stem"], search["nodes"], search["patch"]) == (3, 2, 2, [16, 16, 16])
    assert runs[-1]["genotypes"] == [] and runs[-1]["train"]["depth"] == 3
    # --depth: every network the study trains and each fold's search (a depth-1 task such as the context task)
    assert cli("cv", "--search-per-fold", "--data", task, "--depth", "1", "--patch", "16", "16", "16",
               "-o", tmp_path / "shallow").code == 0
    assert runs[-1]["train"]["depth"] == 1
    shallow = tmp_path / "shallow-plan"
    plan_study(shallow, _request(task, train={**_request(task)["train"], "depth": 1}), say=lambda _: None)
    from scnas.apps.cv.searches import search_config

    assert search_config(read_plan(shallow / "cv.json"), 0).depth == 1
    assert search_config(read_plan(out / "cv.json"), 0).depth == 3
    result = cli("cv", "-o", out, "--depth", "1")
    assert result.code == 1 and "--depth 1 (the study's: 3) differs" in result.err, result
    result = cli("cv", "--search-per-fold", "--data", task, "--depth", "5", "--patch", "16", "16", "16",
                 "-o", tmp_path / "too-deep")
    assert result.code == 1 and "--patch 16 16 16 at --depth 5" in result.err and \
        "is not a multiple of 2**depth = 32" in result.err
    assert not (tmp_path / "too-deep" / "cv.json").exists()
    result = cli("cv", "--search-per-fold", "--data", task, "--depth", "2", "--patch", "16", "16", "16",
                 "--search-patch", "16", "16", "6", "-o", tmp_path / "bad-search-patch")
    assert result.code == 1 and "--search-patch 16 16 6 at --depth 2" in result.err and \
        "W=6 is not a multiple of 2**depth = 4" in result.err


def test_a_search_another_process_runs_is_waited_for_not_run_twice(task, tmp_path, monkeypatch):
    """Two processes (threads here: flocks conflict between two opens of a file in one process
    too): one runs fold 0's search; the other, needing it for a retraining, waits and reads its
    record instead of searching again."""
    import threading

    import scnas.apps.cv.searches as searches
    from scnas.fileio import atomic_write_text
    from scnas.apps.cv import FoldSearch, SearchJob

    out = tmp_path / "study"
    plan = plan_study(out, _request(task, folds=[0], random=0), say=lambda _: None)
    ran, holding, release = [], threading.Event(), threading.Event()

    def search(out_, plan_, fold, *, progress, say):
        ran.append(fold)
        holding.set()
        release.wait(timeout=10)
        record = FoldSearch(fold=fold, genotype="g.yaml", hash="abc", epoch=2, epochs=2, task="Phantom", cases=["x"],
                            validation_in_search=[], alpha_movement={}, stem=4, flops=1.0, random=[], seconds=0.0)
        atomic_write_text(SearchJob(fold).folder(out_) / "search.json", record.model_dump_json())
        return record

    monkeypatch.setattr(searches, "run_fold_search", search)
    said, got = [], {}
    first = threading.Thread(target=lambda: got.setdefault("first", searches.claim_and_search(
        out, plan, 0, wait=False, say=said.append)))
    first.start()
    assert holding.wait(timeout=10)
    assert searches.claim_and_search(out, plan, 0, wait=False, say=said.append) is None    # left to its holder
    second = threading.Thread(target=lambda: got.setdefault("second", searches.claim_and_search(
        out, plan, 0, wait=True, say=said.append)))
    second.start()
    for _ in range(500):
        if "search/fold_0: being run by another process; waiting for it" in said:
            break
        threading.Event().wait(0.01)
    assert "second" not in got                                   # still waiting while the search runs
    release.set()
    first.join(timeout=10)
    second.join(timeout=10)
    assert ran == [0] and got["first"].hash == got["second"].hash == "abc", (ran, got, said)


def test_searches_per_fold_can_relax_fully_skip_augmentation_and_choose_cells_by_perturbation(task, tmp_path, cli,
                                                                                             monkeypatch):
    """--sampling, --derive-by and --no-augment reach the request, each fold's search and its
    retraining; a fold's cells come from the perturbation scores of its own search."""
    import scnas.apps.cv as cv
    from scnas.apps.cv.searches import run_fold_search, search_config
    from scnas.genotype import read_genotype

    runs = []
    monkeypatch.setattr(cv, "run_study", lambda out, request, **kwargs: runs.append(request))
    assert cli("cv", "--search-per-fold", "--data", task, "--patch", "16", "16", "16", "--sampling", "full",
               "--derive-by", "perturbation", "--no-augment", "-o", tmp_path / "flags").code == 0
    request = runs[-1]
    assert request["search"]["sampling"] == "full" and request["search"]["derive_by"] == "perturbation"
    assert request["train"]["augment"] is False
    assert cli("cv", "--search-per-fold", "--data", task, "--patch", "16", "16", "16", "-o", tmp_path / "plain").code == 0
    assert "derive_by" not in runs[-1]["search"] and runs[-1]["train"]["augment"] is True   # as older studies' requests

    out = tmp_path / "study"
    train = {**_request(task)["train"], "augment": False}
    plan = plan_study(out, _request(task, train=train, search={"sampling": "full", "derive_by": "perturbation"}),
                      say=lambda _: None)
    config = search_config(plan, 0)
    assert config.sampling == "full" and config.augment is False
    record = run_fold_search(out, plan, 0, say=lambda _: None)
    assert record.derived_by == "perturbation"
    kept = read_genotype(out / record.genotype)
    assert kept.provenance.search["derivation"].startswith("perturbation (DARTS-PT)")
    scores = json.loads((out / "searches" / "fold_0" / "perturbation.json").read_text())
    assert kept.provenance.search["perturbation"]["scores"] == scores["scores"]
    ran = json.loads((out / "searches" / "fold_0" / "config.json").read_text())["search"]
    assert ran["sampling"] == "full" and ran["augment"] is False


def test_searches_per_fold_take_the_aux_skip_and_a_vocabulary_that_random_genotypes_share(task, tmp_path, cli,
                                                                                          monkeypatch):
    """--aux-skip and --ops reach each fold's search; the random genotypes draw from the same
    vocabulary; aux_skip is recorded only when set (older studies continue), and a continued
    study refuses another value; an unknown op is refused naming it."""
    import scnas.apps.cv as cv
    from scnas.apps.cv.searches import search_config
    from scnas.genotype import CELL_TYPES, PAPER_OPS, read_genotype

    runs = []
    monkeypatch.setattr(cv, "run_study", lambda out, request, **kwargs: runs.append(request))
    vocabulary = ["zero", "identity", "conv_3x3x3", "sep_dil4_conv_3x3x3"]
    assert cli("cv", "--search-per-fold", "--data", task, "--patch", "16", "16", "16", "--aux-skip", "0.5",
               "--ops", ",".join(vocabulary), "-o", tmp_path / "flags").code == 0
    search = runs[-1]["search"]
    assert search["aux_skip"] == 0.5 and search["ops"] == vocabulary
    assert cli("cv", "--search-per-fold", "--data", task, "--patch", "16", "16", "16", "-o", tmp_path / "plain").code == 0
    assert "aux_skip" not in runs[-1]["search"] and runs[-1]["search"]["ops"] == list(PAPER_OPS)
    result = cli("cv", "--search-per-fold", "--data", task, "--ops", "zero,conv_9x9x9", "-o", tmp_path / "bad")
    assert result.code == 1 and "--ops: unknown op 'conv_9x9x9'" in result.err and "Traceback" not in result.err, result
    result = cli("cv", "--search-per-fold", "--data", task, "--ops", "zero,conv_3x3x3,conv_3x3x3", "-o", tmp_path / "bad")
    assert result.code == 1 and "--ops: conv_3x3x3 listed twice" in result.err, result

    out = tmp_path / "study"
    plan = plan_study(out, _request(task, search={"aux_skip": 0.5, "ops": vocabulary}), say=lambda _: None)
    config = search_config(plan, 0)
    assert config.aux_skip == 0.5 and config.ops == vocabulary
    randoms = [e for e in plan.genotypes if e.kind == "random"]
    used = {e.op for r in randoms for cell in CELL_TYPES
            for e in read_genotype(out / "genotypes" / f"{r.name}.yaml").cell(cell).edges}
    assert len(randoms) == 2 and used and used <= set(vocabulary), used
    result = cli("cv", "-o", out, "--aux-skip", "1")
    assert result.code == 1 and "--aux-skip 1.0 (the study's: 0.5) differs" in result.err, result
    assert cli("cv", "-o", out, "--aux-skip", "0.5").code == 0
