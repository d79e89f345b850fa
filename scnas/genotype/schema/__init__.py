"""The JSON Schema of the genotype format, generated from the pydantic models.

The generated schema is shipped as ``scnas-genotype-v1.schema.json`` beside this file so
that other languages can validate documents without scnas; a test fails when the models
and the shipped file drift apart (regenerate with ``scnas schema -o <that file>``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from scnas.genotype.model import FORMAT_VERSION, Genotype

SCHEMA_FILE = f"scnas-genotype-v{FORMAT_VERSION}.schema.json"
SCHEMA_ID = f"https://scnas.invalid/schema/{SCHEMA_FILE}"  # a name, not a download location


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) generated from the models. Rules needing the whole
    document (node ranges, duplicates, reachability) are semantic and stated in the spec."""
    schema = Genotype.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


def shipped_schema_text() -> str:
    """The schema file as shipped in the package."""
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
