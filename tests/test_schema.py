"""The shipped JSON Schema must be exactly what the models generate."""

from __future__ import annotations

import json

import jsonschema

from scnas.genotype import BUILTIN_NAMES, builtin_genotype, json_schema, random_genotype
from scnas.genotype.schema import SCHEMA_FILE, json_schema_text, shipped_schema_text


def test_shipped_schema_matches_the_models():
    assert shipped_schema_text() == json_schema_text(), (
        f"models and scnas/genotype/schema/{SCHEMA_FILE} drifted apart: regenerate with "
        f"'scnas schema -o scnas/genotype/schema/{SCHEMA_FILE}'")


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(shipped_schema_text()))


def test_tag_fields_are_required_in_the_schema():
    assert {"format", "version", "cells"} <= set(json_schema()["required"])


def test_documents_written_by_scnas_pass_the_schema():
    validator = jsonschema.Draft202012Validator(json_schema())
    for genotype in [builtin_genotype(n) for n in BUILTIN_NAMES] + [random_genotype(s, nodes=3) for s in range(5)]:
        validator.validate(genotype.to_dict())
