"""The conformance suite, through scnas and, independently, through jsonschema."""

from __future__ import annotations

import json
import re
from decimal import Decimal
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
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return yaml.safe_load(path.read_text())


# docs/genotype-format.md, "Error paths": the shape of the path each rule reports.
PATH_SHAPES = {
    "S1": r"", "E1": r"", "E2": r"", "E3": r"",
    "S2": r".+", "S3": r".+", "S4": r"nodes|.+\.(from|to)", "S5": r".+\.concat", "S6": r"(ops\[\d+\]|.+\.op)",
    "S7": r"nodes", "S8": r".+", "S9": r"ops",
    "R1": r"ops\[\d+\]", "R2": r"cells\.\w+\.edges\[\d+\]\.op", "R3": r"cells\.\w+\.edges\[\d+\]\.to",
    "R4": r"cells\.\w+\.edges\[\d+\]\.from", "R5": r"cells\.\w+\.edges\[\d+\]", "R6": r"cells\.\w+\.edges\[\d+\]",
    "R7": r"cells\.\w+\.concat\[\d+\]", "R8": r"cells\.\w+\.(concat|edges)\[\d+\]",
    "R9": r"provenance\.probabilities\.\w+\[\d+\](\.p(\.\w+)?)?",
}
_MISSING = object()


def _resolve(doc, path: str):
    """The value a field path names in plain data, or _MISSING; also the parent container and the last step."""
    parent, step, node = None, None, doc
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        parent, step = node, (int(index) if index else name)
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return _MISSING, parent, step
    return node, parent, step


@pytest.mark.parametrize("entry", MANIFEST["invalid"], ids=lambda e: e["file"])
def test_every_invalid_entry_reports_the_path_its_rule_prescribes(entry):
    doc = _raw(HERE / entry["file"]) if entry["rule"] not in ("E1", "E2", "E3") else None
    path, rule = entry["path"], entry["rule"]
    assert re.fullmatch(PATH_SHAPES[rule], path), (rule, path)
    if not path:
        return
    value, parent, step = _resolve(doc, path)
    if rule == "S8":  # a missing field: the path names it, its parent exists
        assert value is _MISSING and parent is not _MISSING and isinstance(parent, dict)
        return
    assert value is not _MISSING, "every other path names a value the document holds"
    if rule in ("S5", "S9"):
        assert value == []
    if rule == "R6":  # the later of two edges between the same nodes
        assert any((e["from"], e["to"]) == (value["from"], value["to"]) for e in parent[:step])
    if rule in ("R1", "R7") and "twice" in entry["reason"]:  # the later of two equal entries
        assert value in parent[:step]
    if rule == "R8":  # the node's first use, concat before edges
        cell = _resolve(doc, path.rsplit(".", 1)[0])[0]
        node = value if path.rsplit(".", 1)[1].startswith("concat") else value["from"]
        uses = [f"concat[{i}]" for i, n in enumerate(cell["concat"]) if n == node]
        uses += [f"edges[{i}]" for i, e in enumerate(cell["edges"]) if e["from"] == node]
        assert path.endswith("." + uses[0])


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
    if entry["schema_rejects"] is not None:
        assert VALIDATOR.is_valid(_raw(path)) is not entry["schema_rejects"]


def test_decimal_parsing_makes_the_schema_refuse_integers_written_with_a_fraction_or_exponent():
    """The README's recipe: with parse_float=Decimal, 1.0 and 1e0 are no longer JSON Schema integers."""
    text = (HERE / "invalid" / "version-as-exponent.json").read_text()
    assert VALIDATOR.is_valid(json.loads(text))  # plain parsing: the schema alone cannot tell
    assert not VALIDATOR.is_valid(json.loads(text, parse_float=Decimal))
    for entry in MANIFEST["valid"]:
        if entry["file"].endswith(".json"):
            VALIDATOR.validate(json.loads((HERE / entry["file"]).read_text(), parse_float=Decimal))
