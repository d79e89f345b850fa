"""What checking a cached case costs and what it catches (issue 27): one BraTS-like case
(default 4 channels of 160x192x144 at 1 mm; BraTS at 0.7 mm is ~4x(200x240x200)) prepared into a
v3 cache, then

1. cost: ``Cache.load`` with its CRC-32 check of every file against the same load unchecked
   (as format v2 read it), and both against reading the whole case (every voxel decompressed)
   and one random 128^3 patch; median of --repeats, warm page cache;
2. detection: --flips single-byte flips spread evenly over the image file; how many the check
   detects, and how many the unchecked reader would have used without a word (opened and read
   in full with data differing from the original).

Run: python benchmarks/cache_check_bench.py [--shape 160 192 144] [--repeats 7] [--flips 40] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 144))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--flips", type=int, default=40)
    parser.add_argument("-o", "--output")
    args = parser.parse_args()

    from scnas.data import Cache, PrepareSettings, prepare_dataset, write_phantom_dataset
    from scnas.errors import DamagedFileError
    from scnas.records import open_b2nd

    root = Path(tempfile.mkdtemp(prefix="scnas-check-"))
    task = write_phantom_dataset(root / "task", cases=1, channels=4, foreground_classes=3, shape=tuple(args.shape),
                                 spacing=(1.0, 1.0, 1.0), seed=0)
    prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), workers=1, progress=False)
    cache = Cache(root / "cache")
    case_id = cache.case_ids[0]
    image_path = root / "cache" / f"{case_id}.b2nd"
    files = cache.records[case_id]["files"]

    def unchecked():
        return open_b2nd(image_path, ""), open_b2nd(root / "cache" / f"{case_id}_seg.b2nd", "")

    def read_all():
        image, label = unchecked()
        return np.asarray(image[:]), np.asarray(label[:])

    rng = np.random.default_rng(0)
    shape = tuple(cache.records[case_id]["shape"])

    def patch():
        image, label = unchecked()
        start = [int(rng.integers(0, max(1, n - 128) + 1)) for n in shape]
        region = tuple(slice(s, s + 128) for s in start)
        return np.asarray(image[(slice(None), *region)]), np.asarray(label[region])

    cost = {"load_checked_ms": median_ms(lambda: cache.load(case_id), args.repeats),
            "load_unchecked_ms": median_ms(unchecked, args.repeats),
            "read_whole_case_ms": median_ms(read_all, args.repeats),
            "read_one_128_patch_ms": median_ms(patch, args.repeats)}
    cost["check_ms"] = cost["load_checked_ms"] - cost["load_unchecked_ms"]
    cost["check_mb_per_s"] = sum(entry["bytes"] for entry in files.values()) / 1e6 / (cost["check_ms"] / 1000)
    original = image_path.read_bytes()
    truth = np.asarray(open_b2nd(image_path, "")[:])
    detected = silent = refused_unchecked = 0
    for offset in np.linspace(0, len(original) - 1, args.flips).astype(int):
        data = bytearray(original)
        data[offset] ^= 0xFF
        image_path.write_bytes(bytes(data))
        try:
            cache.load(case_id)
        except DamagedFileError:
            detected += 1
        try:
            changed = not np.array_equal(np.asarray(open_b2nd(image_path, "")[:]), truth, equal_nan=True)
            silent += changed
        except Exception:   # the unchecked reader noticed (a crash before issue 27, an error since)
            refused_unchecked += 1
    image_path.write_bytes(original)
    result = {"case": {"shape": [4, *shape], "file_bytes": {name: entry["bytes"] for name, entry in files.items()}},
              "cost": {k: round(v, 2) for k, v in cost.items()},
              "flips": {"tried": args.flips, "detected_by_checksum": detected,
                        "unchecked_used_changed_data": silent, "unchecked_refused": refused_unchecked}}
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
