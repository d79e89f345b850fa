"""Case arrays on disk: Blosc2 NDArrays (``.b2nd``) in chunks that random patches read fast.

nnU-Net v2 stores its preprocessed data the same way (it moved from ``.npz``/``.npy`` to
Blosc2 because unpacked ``.npy`` files take the disk of a large task several times over and
``.npz`` must be decompressed whole). A ``.b2nd`` file is split into chunks, each chunk into
blocks compressed independently, so that slicing a patch decompresses only the blocks it
touches. The parameters were chosen by measurement (``benchmarks/data_bench.py``, table in
docs/benchmarks.md) on a BraTS-size case:

- one channel per chunk, chunks of 64³ voxels and blocks of 32³: a random patch decompresses
  little more than its own voxels; larger blocks read more, smaller ones add overhead;
- LZ4 at level 5 without the byte shuffle: as small as LZ4 with shuffle on half floats and
  the fastest to read (ZSTD is smaller and slower to read);
- one decompression thread: loaders run one process per core already.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CHUNK = 64
BLOCK = 32
SUFFIX = ".b2nd"
TEMPORARY = ".partial" + SUFFIX
"""Ending of a file older scnas versions were writing (leftovers are removed by the next preparation)."""


def _blosc2():
    import blosc2

    blosc2.set_nthreads(1)
    return blosc2


def _layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for an array of ``shape``: (C, X, Y, Z) channel by channel, or (X, Y, Z)."""
    lead = (1,) if len(shape) == 4 else ()
    spatial = shape[len(lead):]
    return lead + tuple(min(CHUNK, n) for n in spatial), lead + tuple(min(BLOCK, n) for n in spatial)


def write_array(path: str | os.PathLike, array: np.ndarray) -> dict[str, int | str]:
    """Write ``array`` compressed to ``path`` (``.b2nd``), atomically (``scnas.fileio``: a full
    disk is an ``OutputError`` saying so, naming the file); returns the file's ``bytes`` and
    ``checksum`` for the case's record. Compressed in memory first (a case's compressed
    arrays, tens of MB), so that the bytes written are the bytes checksummed and blosc2's own
    file writing, which reports a full disk as "Error while creating the NDArray", is not used."""
    from scnas.fileio import atomic_write_bytes
    from scnas.records import checksum

    blosc2 = _blosc2()
    array = np.ascontiguousarray(array)
    chunks, blocks = _layout(array.shape)
    frame = blosc2.asarray(array, chunks=chunks, blocks=blocks,
                           cparams={"codec": blosc2.Codec.LZ4, "clevel": 5, "filters": [blosc2.Filter.NOFILTER],
                                    "nthreads": 1}).to_cframe()
    atomic_write_bytes(path, frame)
    return {"bytes": len(frame), "checksum": checksum(frame)}


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete what interrupted writes left in ``folder``; returns the paths removed."""
    removed = []
    for path in Path(folder).glob(f".*{TEMPORARY}"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
