"""Setting up a run folder and its data for search and training, alone or under torchrun."""

from __future__ import annotations

from pathlib import Path

from scnas.errors import ScnasError
from scnas.fileio import ensure_folder
from scnas.processes import Processes


def ensure_run_folder(folder: Path, error: type[ScnasError]) -> None:
    """Create a run folder (and parents), or fail with a message naming it (a file in the way,
    no permission, a read-only file system)."""
    ensure_folder(folder, error, "a run folder")


def open_or_prepare(data: str, spacing, processes: Processes, say=lambda line: None, poll_seconds: float = 5.0,
                    start_timeout: float = 600.0):
    """``data`` as a prepared cache: a cache folder itself, or a task folder that the main
    process prepares into its shared cache (``scnas.data.cache.shared_cache_folder``) with
    one worker per usable core, alone or under torchrun. The other processes wait by
    watching the file system rather than at a collective, which would time out (after 30
    minutes by default) on a task the size of BraTS."""
    import time as _time

    from scnas.data.cache import DEFAULT_SPACING, Cache, open_or_prepare as _open, shared_cache_folder
    from scnas.data.preprocess import PrepareSettings

    if processes.world == 1 or processes.main or (Path(data) / "cache.json").exists():
        cache = _open(data, spacing, prepare=processes.main, workers="auto", say=say if processes.main else
                      (lambda line: None))
    else:
        # prepare_dataset writes settings.json before the first case: if it never appears, rank 0
        # writes to a file system this process does not see (several machines, local disks).
        prepared = shared_cache_folder(data, PrepareSettings(target_spacing=spacing or DEFAULT_SPACING))
        started, marker, begun = _time.monotonic(), prepared / "cache.json", prepared / "settings.json"
        while not marker.exists():
            if not begun.exists() and _time.monotonic() - started > start_timeout:
                raise ScnasError(f"rank {processes.rank} waited {start_timeout:.0f} s for rank 0 to start preparing "
                                 f"{data} into {prepared} and saw nothing: on several machines without a shared file "
                                 "system, run 'scnas data prepare' first and pass the cache folder as --data (or "
                                 "set SCNAS_CACHE to a shared folder)", source=str(prepared))
            _time.sleep(poll_seconds)
        cache = None
    processes.barrier()   # every process past preparation (a failing main process ends the torchrun job)
    return cache if cache is not None else Cache(prepared)
