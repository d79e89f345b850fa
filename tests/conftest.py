"""Shared fixtures: running the CLI in-process and small genotype documents."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from hypothesis import settings

from scnas.cli import main
from scnas.genotype import builtin_genotype

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``-n N``) each worker is a process of its own: one torch thread each, set
# before torch is imported and inherited by the commands a test starts, so that N workers share
# the cores instead of N x cores threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

# Hypothesis draws the same examples in every run (derandomized, no example database), so that
# the suite passes or fails the same way each time; HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("seeded", derandomize=True, database=None)
settings.register_profile("explore", settings.get_profile("default"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))


@pytest.fixture(autouse=True, scope="session")
def _shared_caches_in_a_temporary_folder(tmp_path_factory):
    """Task folders given as --data are prepared into $SCNAS_CACHE: never the user's own."""
    folder = tmp_path_factory.mktemp("scnas-cache")
    # Every in-process CLI call sets torch's threads (scnas.threads): keep the test process's
    # own count, whatever the load of the machine, so results do not change between calls.
    import torch
    os.environ.setdefault("SCNAS_THREADS", str(torch.get_num_threads()))
    previous = os.environ.get("SCNAS_CACHE")
    os.environ["SCNAS_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SCNAS_CACHE", None)
    else:
        os.environ["SCNAS_CACHE"] = previous


@pytest.fixture(autouse=True)
def _same_random_state_and_threads_for_every_test():
    """Each test starts from the same random state (torch, numpy, random; seed 0, or
    ``SCNAS_TEST_SEED`` to try a tolerance at other seeds), whatever ran before it, so that a test
    which passes alone passes in the suite; and torch's thread count is put back after it, so that
    a test which changes it (an in-process CLI call with ``--threads``) cannot slow the others."""
    import random

    import numpy as np
    import torch

    seed = int(os.environ.get("SCNAS_TEST_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def load_script(path: Path, name: str | None = None):
    """A script outside the package (a benchmark, a generator) as a module, without running its
    ``main``: its functions and constants can then be tested in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun_report(result) -> str:
    """What a failed torchrun printed, for an assertion message: the ranks' own errors come
    first in stderr, torchrun's long summary of exit codes last."""
    head = result.stderr[:4000]
    return head + ("\n[...]\n" + result.stderr[-600:] if len(result.stderr) > 4600 else result.stderr[4000:])


def torchrun(*args, processes: int = 2, timeout: float = 300):
    """``python -m torch.distributed.run`` with ``processes`` local processes on a free port,
    one thread each, running ``ARGS`` (e.g. ``"-m", "scnas", "train", ...``)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=timeout)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-400:]!r}, err={self.err[-400:]!r})"


@pytest.fixture
def cli(capsys):
    """Run ``scnas ARGS...`` in this process; returns exit code, stdout and stderr."""
    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return run


@pytest.fixture
def small_doc() -> dict:
    """A valid 2-node genotype document as plain data, to mutate in tests."""
    def cell(a: str, b: str, c: str) -> dict:
        return {"edges": [{"from": 0, "to": 2, "op": a}, {"from": 1, "to": 2, "op": b}, {"from": 2, "to": 3, "op": c}],
                "concat": [2, 3]}
    return copy.deepcopy({
        "format": "scnas-genotype", "version": 1, "nodes": 2,
        "ops": ["zero", "identity", "conv_3x3x3", "sep_dil2_conv_3x3x3", "sep_dil3_conv_3x3x3",
                "sep_dil4_conv_3x3x3", "max_pool_3x3x3", "avg_pool_3x3x3"],
        "cells": {"encoder_normal": cell("conv_3x3x3", "identity", "sep_dil2_conv_3x3x3"),
                  "reduction": cell("max_pool_3x3x3", "conv_3x3x3", "avg_pool_3x3x3"),
                  "decoder_normal": cell("sep_dil3_conv_3x3x3", "identity", "conv_3x3x3"),
                  "expansion": cell("conv_3x3x3", "sep_dil4_conv_3x3x3", "identity")}})


@pytest.fixture
def uresnet():
    return builtin_genotype("uresnet")
