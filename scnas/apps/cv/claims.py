"""Locks that let several processes (shards, machines sharing the study folder) run one study."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def study_lock(out: Path):
    """One process at a time plans the study and prepares its cache (shards start together)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def job_claim(folder: Path, *, wait: bool = False):
    """Whether this process may run the job (a retraining or a search) in ``folder``: an
    exclusive lock on ``folder/.running``, held while the job runs, so that two processes
    continuing the same study never run the same job twice; ``wait``: wait for the holder to
    end instead of answering False. The kernel releases the lock when its process ends, even
    by SIGKILL, so a killed job is free to be resumed at once.

    Args:
        folder: the job's folder; its ``.running`` file is locked.
        wait: wait for another holder to end instead of answering False.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".running", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
