"""Absurd or contradictory settings found by hostile testing (issue 27): each is refused with
one clear line and exit 1 (never a crash, a plan of something else, or minutes of work), or
its work is bounded and the answer says so."""

from __future__ import annotations

import pytest

import scnas.apps.memory_report as planning
from scnas.build import BuildConfig
from scnas.build.memory_plan import parameter_count
from scnas.build.network import build_network
from scnas.genotype import builtin_genotype


def _refused(result, *words):
    assert result.code == 1, result
    assert "internal error" not in result.err and "Traceback" not in result.err, result
    for word in words:
        assert word in result.err, (word, result)


# ------------------------------------------------------------ 3, 8, 13: scnas plan and scnas build


@pytest.mark.parametrize("patch, words", [(("-8", "16", "16"), "D=-8 is not positive"),
                                          (("0", "16", "16"), "D=0 is not positive"),
                                          (("16", "12", "16"), "H=12 is not a multiple of 2**depth = 8")])
def test_plan_refuses_a_patch_that_is_not_a_positive_multiple(cli, patch, words):
    _refused(cli("plan", "minimal", "--stem", "2", "--patch", *patch), f"--patch {' '.join(patch)}", words)


def test_plan_and_build_refuse_a_stem_whose_weights_this_machine_cannot_hold(cli, tmp_path):
    # 14.7 T parameters: refused from a count on the meta device, before allocating (it used
    # to run for a minute and crash on an 80 GB allocation).
    result = cli("plan", "uresnet", "--stem", "100000")
    _refused(result, "stem 100000: the network has 14,700,022,500,003 parameters", "Use a smaller --stem")
    _refused(cli("plan", "--search", "--stem", "100000", "--checkpoint", "off"), "search stem 100000",
             "Use a smaller --stem")
    _refused(cli("build", "uresnet", "--stem", "100000", "-o", tmp_path / "big.safetensors"),
             "14,700,022,500,003 parameters", "use a smaller --stem")
    assert not list(tmp_path.iterdir())


def test_plan_refuses_unknown_ops_naming_the_known_ones(cli):
    _refused(cli("plan", "--search", "--ops", "conv_3x3x3,bogus"), "--ops: unknown op 'bogus'; known ops: zero, "
             "identity, conv_3x3x3")
    _refused(cli("plan", "--search", "--ops", "conv_3x3x3,conv_3x3x3"), "conv_3x3x3 listed twice")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "nanG", "0"])
def test_match_flops_refuses_a_number_that_is_not_positive_and_finite(cli, value):
    _refused(cli("build", "minimal", "--stem", "2", "--patch", "16", "16", "16", "--match-flops", value),
             f"--match-flops {value!r}", "positive")


def test_plan_refuses_a_micro_batch_larger_than_the_share_and_nodes_beyond_the_bounds(cli, monkeypatch):
    import scnas.search.supernet_memory

    def never(*args, **kwargs):
        raise AssertionError("a refused plan simulated a step")

    monkeypatch.setattr(scnas.search.supernet_memory, "search_step_profile", never)
    monkeypatch.setattr(planning, "training_step_profile", never)
    _refused(cli("plan", "minimal", "--micro-batch", "3", "--batch-size", "2"),
             "--micro-batch 3 is more patches than a process has: its share of the batch is 2")
    _refused(cli("plan", "minimal", "--micro-batch", "3", "--batch-size", "4", "--world-size", "2"), "share of "
             "the batch is 2 (--batch-size 4 over --world-size 2)")
    assert cli("plan", "--search", "--nodes", "65").code == 2            # genotypes stop at 64 (usage error)
    _refused(cli("plan", "--search", "--nodes", "64"), "--nodes 64: scnas plan simulates search steps of at most "
             f"{planning.MAX_PLANNED_SEARCH_NODES} nodes", "2,144 edges per cell")


def test_the_search_for_the_largest_stem_is_bounded_whatever_the_budget(monkeypatch):
    """A budget of 10^6 TiB used to simulate ever larger stems for minutes: now no network above
    LARGEST_STEM_PARAMETERS is simulated, and the answer says it is a lower bound."""
    genotype, config = builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2, depth=2)

    def parameters(stem):
        return parameter_count(lambda: build_network(genotype, config.model_copy(update={"stem_channels": stem})))

    cap = parameters(12)
    monkeypatch.setattr(planning, "LARGEST_STEM_PARAMETERS", cap)
    simulated = []
    real = planning.training_step_profile

    def counted(genotype_, config_, *args, **kwargs):
        assert parameters(config_.stem_channels) <= cap, f"simulated stem {config_.stem_channels} above the bound"
        simulated.append(config_.stem_channels)
        return real(genotype_, config_, *args, **kwargs)

    monkeypatch.setattr(planning, "training_step_profile", counted)
    report = planning.memory_report(config, (16, 16, 16), 1, amp="off", checkpoint="off", available=2**80,
                                    genotype=genotype)
    assert report.plan is not None and report.largest_stem_is_a_bound
    assert report.largest_stem == max(s for s in range(2, 64) if parameters(s) <= cap) == 12
    assert any("at least 12" in note for note in report.notes)
    assert len(simulated) <= 8, simulated
    # a budget that binds first gives an exact answer, not a bound
    small = planning.memory_report(config, (16, 16, 16), 1, amp="off", checkpoint="off",
                                   available=int(report.rows[0].peak / 0.9) + 1,
                                   genotype=genotype)
    assert small.largest_stem is not None and small.largest_stem < 12 and not small.largest_stem_is_a_bound


# ------------------------------------------------------------ 11, 12, 15: scnas cv


@pytest.fixture
def study(tmp_path, cli, monkeypatch):
    """A study folder whose cv.json holds the request 'scnas cv minimal uresnet --epochs 2
    --patch 16 16 16' makes (two genotypes, fold 0; no job run)."""
    import json

    import scnas.apps.cv as cv

    captured = []
    with monkeypatch.context() as patched:
        patched.setattr(cv, "run_study", lambda out, request, *args, **kwargs: captured.append(request))
        out = tmp_path / "study"
        assert cli("cv", "minimal", "uresnet", "--data", "task", "-o", out, "--epochs", "2", "--patch", "16", "16",
                   "16", "--folds", "0").code == 0
    out.mkdir()
    plan = {"format": cv.PLAN_FORMAT, "version": cv.PLAN_VERSION, "request": captured[0], "folds": [0],
            "genotypes": [{"name": "minimal"}, {"name": "uresnet"}], "cache": "cache", "task": "task",
            "labels": {"background": 0, "class1": 1}, "validation": {"0": ["case_0"]}}   # every field cv reads
    (out / "cv.json").write_text(json.dumps(plan))
    return out




def test_continuing_a_study_refuses_a_setting_it_would_ignore(study, cli, monkeypatch):
    import scnas.apps.cv as cv

    out, runs = study, []
    monkeypatch.setattr(cv, "run_study", lambda out, request, *args, **kwargs: runs.append(request))
    _refused(cli("cv", "-o", out, "--lr", "0.1"), f"{out}: continues the study with its own settings, but --lr 0.1 "
             "(the study's: 0.0003) differs")
    _refused(cli("cv", "-o", out, "--epochs", "3", "--deep-supervision", "--random", "2"),
             "--epochs 3 (the study's: 2)", "--deep-supervision True (the study's: False)", "--random 2 (the study's: 0)")
    assert runs == []
    # the study's own values, and what may change (the shard), are accepted
    assert cli("cv", "-o", out, "--epochs", "2", "--patch", "16", "16", "16", "--shard", "1/2").code == 0
    assert runs == [None]


def test_ctrl_c_in_cv_says_what_was_kept_and_how_to_continue(study, cli, monkeypatch):
    import scnas.apps.cv as cv
    from scnas.cli.main import interrupted_message

    out = study
    assert "interrupted before the study was planned" in interrupted_message(["cv", "-o", str(out.parent / "none")])
    (out / "jobs" / "minimal" / "fold_0").mkdir(parents=True)
    (out / "jobs" / "minimal" / "fold_0" / "evaluation.json").write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "run_study", interrupted)
    result = cli("cv", "-o", out, "--shard", "2/2")
    assert result.code == 130 and len(result.err.strip().splitlines()) == 1, result
    assert f"interrupted: {out} keeps the study: 1 finished job(s)" in result.err, result
    assert result.err.strip().endswith(f"continue with: scnas cv -o {out} --shard 2/2"), result


def test_two_processes_continuing_one_study_never_run_the_same_job(study, monkeypatch):
    """Two 'scnas cv -o OUT' at once (threads here: a flock conflicts between two opens of a
    file in one process as between processes): the job one runs is skipped by the other."""
    import json
    import threading

    import scnas.apps.cv as cv
    import scnas.apps.cv.study as running

    out = study
    ran, second_started = [], threading.Event()

    def run_job(out_, plan, job, *, progress, say):
        ran.append(job.name)
        if job.genotype == "minimal":
            second_started.wait(timeout=5)      # hold the first job until the other process moved past it
        else:
            second_started.set()
        folder = out_ / "jobs" / job.genotype / f"fold_{job.fold}"
        (folder / cv.DONE).write_text(json.dumps({"genotype": job.genotype, "fold": job.fold,
                                                  "model_selection": "last epoch", "mean": {"1": 0.5}}))
        return {"mean_over_classes": 0.5, "cases": ["a"], "model_epoch": 2}

    monkeypatch.setattr(running, "run_job", run_job)
    monkeypatch.setattr(running, "write_report", lambda *args, **kwargs: {"report": True})
    said = [[], []]
    threads = [threading.Thread(target=cv.run_study, args=(out, None), kwargs={"say": said[i].append})
               for i in range(2)]
    threads[0].start()
    for _ in range(1000):                        # until the first process has claimed the first job
        if ran or not threads[0].is_alive():
            break
        threading.Event().wait(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(ran) == ["minimal/fold_0", "uresnet/fold_0"], (ran, said)
    assert "[1/2] minimal/fold_0: being run by another process, skipped" in said[1], said
    assert any(line.startswith("[2/2] uresnet/fold_0:") and "skipped" in line for line in said[0]), said


def test_a_job_claim_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from scnas.apps.cv import job_claim

    folder = tmp_path / "job"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"h = open({str(folder / '.running')!r}, 'w')\n"
                               "fcntl.flock(h, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with job_claim(folder) as claimed:
            assert not claimed
    finally:
        holder.kill()
        holder.wait()
    with job_claim(folder) as claimed:
        assert claimed


# ------------------------------------------------------------ 14: scnas derive on an unfinished search


def _searched(run, epoch, epochs):
    import torch

    from scnas.genotype import CELL_TYPES, PAPER_OPS, write_genotype
    from scnas.search import cell_edges, derive_genotype

    torch.manual_seed(0)
    probabilities = {name: torch.softmax(torch.randn(len(cell_edges(2)), len(PAPER_OPS)), -1) for name in CELL_TYPES}
    genotype = derive_genotype(probabilities, 2, list(PAPER_OPS), top_k=2,
                               provenance={"epoch": epoch, "search": {"epochs": epochs}})
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    write_genotype(genotype, run / "genotype.yaml")


def test_derive_says_when_the_search_did_not_finish_and_still_derives(cli, tmp_path):
    _searched(tmp_path / "unfinished", 3, 10)
    result = cli("derive", tmp_path / "unfinished", "-o", tmp_path / "a.yaml")
    assert result.code == 0 and (tmp_path / "a.yaml").exists(), result
    assert "the search did not finish: this genotype is from epoch 3 of 10" in result.err, result
    assert f"continue the search with: scnas search -o {tmp_path / 'unfinished'} --resume" in result.err
    _searched(tmp_path / "finished", 10, 10)
    result = cli("derive", tmp_path / "finished", "-o", tmp_path / "b.yaml")
    assert result.code == 0 and "did not finish" not in result.err, result


def test_derive_on_a_search_killed_before_its_first_epoch_says_so(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    _refused(cli("derive", run, "-o", tmp_path / "a.yaml"), f"{run}: is a search that has not finished its first "
             f"epoch", f"continue the search with: scnas search -o {run} --resume")
    assert "not a search run folder" in cli("derive", tmp_path, "-o", tmp_path / "a.yaml").err
