"""Reading back what scnas itself wrote: cache records and arrays, run configs, checkpoints,
study files. Every such read goes through here, so that a damaged file (missing, truncated,
garbled, a flipped byte, a field of the wrong type or shape) is always the one error,
``DamagedFileError``, naming the file, what is wrong and ``fix`` (how to get a good one),
never a crash and never data used as if it were intact.

Arrays carry a CRC-32 of their file's bytes, written beside them in the case's record and
checked when a process first opens them (cost and detection rate: docs/training.md)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from scnas.errors import DamagedFileError

CHECKSUM_KIND = "crc32"
READ_CHUNK = 16 << 20


def damaged(path: str | os.PathLike, what: str, fix: str) -> DamagedFileError:
    """The error for ``path``: ``what`` is wrong with it, then ``fix`` (if any)."""
    return DamagedFileError(f"{what}; {fix}" if fix else what, source=str(path))


def checksum(data: bytes) -> str:
    """The checksum recorded for a file holding ``data``: ``crc32:`` and 8 hex digits. CRC-32
    detects every error burst of up to 32 bits (any single flipped byte) and reads at ~1.7 GB/s."""
    return f"{CHECKSUM_KIND}:{zlib.crc32(data):08x}"


def _read(path: Path, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise damaged(path, "is missing", fix) from None
    except IsADirectoryError:
        raise damaged(path, "is a folder, not a file", fix) from None
    except OSError as exc:
        raise damaged(path, f"cannot be read: {exc.strerror or exc}", fix) from None


def verify_file(path: str | os.PathLike, expected: str, fix: str) -> None:
    """Check the file ``path`` against the ``expected`` checksum, reading it in pieces (no copy
    of a large array in memory)."""
    path = Path(path)
    crc, size, buffer = 0, 0, bytearray(1 << 20)
    view = memoryview(buffer)
    try:
        with path.open("rb") as fh:
            while count := fh.readinto(buffer):
                crc, size = zlib.crc32(view[:count], crc), size + count
    except OSError:
        _read(path, fix)   # says why: missing, a folder, unreadable
        raise
    found = f"{CHECKSUM_KIND}:{crc:08x}"
    if found != expected:
        raise damaged(path, f"is damaged: its checksum is {found}, not the {expected} recorded when it was written "
                            f"({size} bytes now)", fix)


def verified_bytes(path: str | os.PathLike, expected: str | None, fix: str) -> bytes:
    """The bytes of ``path``, checked against the ``expected`` checksum (None: not checked)."""
    if expected is not None:
        verify_file(path, expected, fix)
    return _read(Path(path), fix)


def _shape_problem(exc) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the document"
    return f"{where}: {first['msg']}"


def read_json(path: str | os.PathLike, fix: str, shape: Any = None) -> Any:
    """A JSON document scnas wrote, checked against ``shape`` (a type pydantic validates, e.g.
    a ``BaseModel`` with ``extra="allow"`` naming the fields the reader uses; the validated
    value is returned as plain data, models as dicts); any fault raises :class:`DamagedFileError`."""
    data = _read(Path(path), fix)
    if not data.strip():
        raise damaged(path, "is damaged: empty", fix)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(path, f"is damaged: not valid JSON ({exc}; truncated?)", fix) from None
    return value if shape is None else check_shape(value, shape, path, fix=fix)


def check_shape(value: Any, shape: Any, path: str | os.PathLike, *, fix: str, strict: bool = False) -> Any:
    """``value`` (read from ``path``) validated as ``shape`` (see :func:`read_json`); ``strict``:
    no conversions (``"3"`` is no int).

    Args:
        value: the data read.
        shape: a pydantic model or type it must have.
        path: the file it was read from, named in the error.
        fix: how to get a good file, said in the error.
        strict: no conversions.
    """
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(shape)
    try:
        checked = adapter.validate_python(value, strict=strict)
    except ValidationError as exc:
        raise damaged(path, f"is damaged: {_shape_problem(exc)}", fix) from None
    return adapter.dump_python(checked)


def read_npy(path: str | os.PathLike, fix: str, expected: str | None = None, *, dtype=None, columns: int | None = None):
    """A ``.npy`` array (never unpickled), checked against its checksum, ``dtype`` and, for a
    2-D table, its number of ``columns``.

    Args:
        path: the ``.npy`` file.
        fix: how to get a good file, said in the error.
        expected: its checksum (None: not checked).
        dtype: the dtype it must have (None: any).
        columns: a 2-D table's columns (None: any shape).
    """
    import io

    import numpy as np

    data = verified_bytes(path, expected, fix)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:   # numpy raises ValueError, OSError, EOFError... for a garbled file
        raise damaged(path, f"is damaged: not a readable .npy array ({type(exc).__name__})", fix) from None
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise damaged(path, f"is damaged: holds {array.dtype}, not {np.dtype(dtype)}", fix)
    if columns is not None and (array.ndim != 2 or array.shape[1] != columns):
        raise damaged(path, f"is damaged: shape {array.shape}, not (N, {columns})", fix)
    return array


def open_b2nd(path: str | os.PathLike, fix: str, expected: str | None = None, *, shape=None, dtype=None):
    """A read-only Blosc2 array view of a ``.b2nd`` file (memory-mapped; slicing returns numpy),
    after checking the file against its checksum (None: not checked) and the array against
    ``shape`` and ``dtype``.

    Args:
        path: the ``.b2nd`` file.
        fix: how to get a good file, said in the error.
        expected: its checksum (None: not checked).
        shape: the shape it must have (None: any).
        dtype: the dtype it must have (None: any).
    """
    import blosc2
    import numpy as np

    if expected is not None:
        verify_file(path, expected, fix)
    elif not Path(path).is_file():
        raise damaged(path, "is missing", fix)
    blosc2.set_nthreads(1)
    try:
        array = blosc2.open(str(path), mode="r", mmap_mode="r")
    except Exception as exc:   # blosc2 raises RuntimeError, ValueError, ... for a garbled frame
        raise damaged(path, f"is damaged: not a readable Blosc2 array ({type(exc).__name__}: {exc})", fix) from None
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise damaged(path, f"is damaged: shape {tuple(array.shape)}, not the recorded {tuple(shape)}", fix)
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise damaged(path, f"is damaged: holds {array.dtype}, not {np.dtype(dtype)}", fix)
    return array


def read_checkpoint(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain data only: ``weights_only=True``, never unpickled
    code), which must be a dict."""
    import torch

    if not Path(path).is_file():
        _read(Path(path), fix)   # says why: missing, a folder
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise damaged(path, f"is damaged: cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:120]})",
                      fix) from None
    if not isinstance(state, dict):
        raise damaged(path, f"is damaged: holds a {type(state).__name__}, not a checkpoint's dict", fix)
    return state
