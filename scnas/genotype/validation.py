"""Plain data (as parsed from JSON or YAML) to a validated ``Genotype``: older versions are
migrated forward, and every problem pydantic finds becomes a ``Problem`` naming the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from scnas.errors import GenotypeError, Problem
from scnas.genotype.migrate import migrate
from scnas.genotype.model import MAX_NODES, Genotype


def genotype_from_data(data: Any, source: str | None = None) -> Genotype:
    """Validate plain data (as parsed from JSON/YAML), migrating older versions forward."""
    data = migrate(data, source)
    try:
        return Genotype.model_validate(data)
    except ValidationError as exc:
        raise GenotypeError(problems=[_problem_from_pydantic(e) for e in exc.errors()], source=source) from None
    except GenotypeError as exc:
        raise exc.with_source(source) if source else exc
    except RecursionError:
        raise GenotypeError("document is nested too deeply", source=source) from None


def _problem_from_pydantic(error: dict[str, Any]) -> Problem:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = {"missing": "required field is missing",
               "extra_forbidden": "unknown field (see docs/genotype-format.md for the fields)"}.get(error["type"], error["msg"])
    if error["type"] not in ("missing",):
        message += f" (got {error['input']!r:.60})"
    if path == "nodes" and error["type"] == "less_than_equal":
        message += f": a genotype has at most {MAX_NODES} intermediate nodes (docs/genotype-format.md, rule S7)"
    return Problem(path, message)
