"""Format versions: upgrade functions that take an older document to the current version.

``MIGRATIONS[v]`` turns a version-``v`` document (plain data) into a version-``v+1`` one.
Readers migrate forward step by step and refuse versions newer than ``CURRENT_VERSION``.
Version 1 is the first format, so the registry is empty today; adding version 2 means
bumping ``CURRENT_VERSION`` and registering ``MIGRATIONS[1]``.
"""

from __future__ import annotations

from typing import Any, Callable

from scnas.errors import GenotypeError
from scnas.genotype.model import FORMAT_NAME, FORMAT_VERSION

CURRENT_VERSION = FORMAT_VERSION
OLDEST_VERSION = 1

Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}


def register(from_version: int) -> Callable[[Migration], Migration]:
    """Decorator: register the upgrade from ``from_version`` to ``from_version + 1``."""

    def decorate(function: Migration) -> Migration:
        MIGRATIONS[from_version] = function
        return function

    return decorate


def migrate(data: Any, source: str | None = None) -> dict[str, Any]:
    """Check ``format``/``version`` of raw document data and upgrade it to the current version."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise GenotypeError(f"a genotype document is a mapping with 'format', 'version', 'nodes', 'ops', "
                            f"'cells'; this is {kind}", source=source)
    if "format" not in data:
        raise GenotypeError(f"field 'format' is missing: a genotype document starts with 'format: {FORMAT_NAME}'",
                            source=source)
    if data["format"] != FORMAT_NAME:
        raise GenotypeError(f"format is {data['format']!r}, expected {FORMAT_NAME!r}: is this a genotype file?",
                            source=source)
    version = data.get("version")
    if version is None:
        raise GenotypeError(f"field 'version' is missing (this scnas writes version {CURRENT_VERSION})", source=source)
    if not isinstance(version, int) or isinstance(version, bool):
        raise GenotypeError(f"version must be an integer, not {version!r}", source=source)
    if version > CURRENT_VERSION:
        raise GenotypeError(f"version {version} is newer than this scnas understands (it reads versions "
                            f"{OLDEST_VERSION}..{CURRENT_VERSION}); upgrade scnas to read this file", source=source)
    while version < CURRENT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise GenotypeError(f"version {version} cannot be read: this scnas reads versions "
                                f"{OLDEST_VERSION}..{CURRENT_VERSION}", source=source)
        data = step(dict(data))
        version += 1
        if data.get("version") != version:
            raise AssertionError(f"migration from version {version - 1} did not produce version {version}")
    return data
