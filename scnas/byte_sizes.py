"""Memory sizes as people write them ('24GiB', '16GB') and as scnas prints them."""

from __future__ import annotations

import math


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '12G', '800MiB', '1.5TiB' or a plain number of bytes -> bytes.
    Decimal units (GB) are powers of 1000, binary ones (GiB, and the bare letter G) of 1024."""
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
             "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abgikmt")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a memory size (examples: 24GiB, 16GB, 800MiB)") from None
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a memory size (examples: 24GiB, 16GB, 800MiB)")
    return int(value * units[unit])


def format_bytes(nbytes: float) -> str:
    """Bytes in MiB, GiB or TiB (binary units), one decimal from GiB on."""
    if nbytes >= 2**40:
        return f"{nbytes / 2**40:,.1f} TiB"
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
