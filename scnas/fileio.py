"""Reading user files with a size bound, and writing outputs atomically.

Outputs are written to a temporary file in the destination folder and renamed into place,
so an interrupted or failed write never leaves a partial file behind.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from scnas.errors import OutputError, ScnasError

STDIO = "-"


def check_input_file(path: str | os.PathLike, error: type[ScnasError]) -> None:
    """Raise ``error`` naming the file when it is missing or a folder."""
    p = Path(path)
    if not p.exists():
        raise error("no such file", source=str(path))
    if p.is_dir():
        raise error("is a directory, not a file", source=str(path))


def _output_folder(path: str | os.PathLike) -> Path:
    """The folder an output goes to, after checking that it exists and ``path`` is no folder."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"folder {str(folder)!r} does not exist", source=str(path))
    if target.is_dir():
        raise OutputError("is a directory; give a file name", source=str(path))
    return folder


def read_bytes_bounded(path: str | os.PathLike, limit: int, error: type[ScnasError]) -> bytes:
    """Read a whole file (or stdin for ``-``), refusing anything larger than ``limit`` bytes.

    Raises ``error`` naming the file for a missing file, a folder, unreadable or oversized input.
    """
    name = str(path)
    if name == STDIO:
        data = sys.stdin.buffer.read(limit + 1)
    else:
        check_input_file(path, error)
        p = Path(path)
        try:
            size = p.stat().st_size
            if size > limit:
                raise error(f"file is {size} bytes; the limit is {limit} bytes", source=name)
            with p.open("rb") as fh:
                data = fh.read(limit + 1)
        except PermissionError:
            raise error("permission denied", source=name) from None
        except OSError as exc:
            raise error(f"cannot read: {exc.strerror or exc}", source=name) from None
    if len(data) > limit:
        raise error(f"input is larger than the limit of {limit} bytes", source=name)
    return data


def ensure_writable(path: str | os.PathLike) -> None:
    """Fail early, before slow work, when ``path`` cannot be written (missing or read-only
    folder, a folder in the way). Probes by creating and removing a temporary file."""
    name = str(path)
    if name == STDIO:
        return
    folder = _output_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write in {str(folder)!r}: {exc.strerror or exc}", source=name) from None
    os.close(fd)
    os.unlink(probe)


def current_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status`` on Linux; else
    set and restored, which other threads could observe for an instant)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the permissions a plain
    ``open()`` or ``mkdir()`` would: 0666 or 0777 less the umask."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~current_umask())


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that exists and is not a folder, if any."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def ensure_folder(folder: str | os.PathLike, error: type[ScnasError] = OutputError, what: str = "an output folder") -> Path:
    """Create ``folder`` (and its parents) where it is missing and check that files can be
    written in it, before slow work starts; otherwise raise ``error`` naming the folder and
    the fault: a file in the way, no permission, a read-only or full file system. Every
    command that writes into a folder of its own (run folders, caches, predictions,
    phantoms) goes through here."""
    folder = Path(folder)
    blocker = file_in_the_way(folder)
    if blocker is not None:
        where = "is a file" if blocker == folder else f"cannot be created: {str(blocker)!r} is a file"
        raise error(f"{where}, not a folder; cannot be used as {what}", source=str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".scnas-write-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        Path(probe).unlink(missing_ok=True)   # a preparation cleaning the folder may have removed it
    except OSError as exc:
        raise error(f"cannot be used as {what}: {exc.strerror or exc}", source=str(folder)) from None
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (``-`` writes to stdout)."""
    name = str(path)
    if name == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    target = Path(path)
    folder = _output_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write in {str(folder)!r}: {exc.strerror or exc}", source=name) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        give_default_mode(tmp)   # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write: {exc.strerror or exc}", source=name) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
