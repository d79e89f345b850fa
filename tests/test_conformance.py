"""The conformance suite, through scnas and, independently, through jsonschema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from scnas.errors import GenotypeError
from scnas.genotype import genotype_hash, json_schema, read_genotype

HERE = Path(__file__).resolve().parent / "conformance"
MANIFEST = json.loads((HERE / "manifest.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def _raw(path: Path):
    return yaml.safe_load(path.read_text())


def test_manifest_lists_every_document():
    listed = {entry["file"] for entry in MANIFEST["valid"] + MANIFEST["invalid"]}
    on_disk = {str(p.relative_to(HERE)) for p in HERE.glob("*valid/*") if p.is_file()}
    assert listed == on_disk and len(MANIFEST["invalid"]) >= 25


@pytest.mark.parametrize("entry", MANIFEST["valid"], ids=lambda e: e["file"])
def test_valid_documents_pass_scnas_and_the_schema_with_the_stated_hash(entry):
    path = HERE / entry["file"]
    assert genotype_hash(read_genotype(path)) == entry["hash"]
    VALIDATOR.validate(_raw(path))


@pytest.mark.parametrize("entry", MANIFEST["invalid"], ids=lambda e: e["file"])
def test_invalid_documents_fail_with_the_stated_path(entry):
    path = HERE / entry["file"]
    with pytest.raises(GenotypeError) as info:
        read_genotype(path)
    matching = [p for p in info.value.problems if p.path == entry["path"]]
    assert matching, f"expected a problem at {entry['path']!r}, got {info.value}"
    assert entry["reason"] in str(info.value)
    assert VALIDATOR.is_valid(_raw(path)) is not entry["schema_rejects"]
