"""Reading and writing genotype files, and every kind of bad file."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import yaml

from scnas.errors import GenotypeError, OutputError
from scnas.genotype import (diff, dumps_genotype, genotype_from_data, genotype_hash, load_genotype, normalized,
                            read_genotype, write_genotype)
from scnas.genotype import migrate as migrate_module
from scnas.genotype.io import MAX_BYTES


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _error(path) -> str:
    with pytest.raises(GenotypeError) as info:
        read_genotype(path)
    return str(info.value)


@pytest.mark.parametrize("fmt, suffix", [("yaml", ".yaml"), ("json", ".json"), ("yaml", ".yml")])
def test_write_then_read_gives_the_same_document(tmp_path, uresnet, fmt, suffix):
    path = tmp_path / f"g{suffix}"
    write_genotype(uresnet, path)
    back = read_genotype(path)
    assert back.to_dict() == normalized(uresnet).to_dict()
    assert back.provenance.description == uresnet.provenance.description  # provenance survives


def test_json_and_yaml_carry_the_same_document(small_doc, tmp_path):
    genotype = genotype_from_data(small_doc)
    as_json = json.loads(dumps_genotype(genotype, "json"))
    as_yaml = yaml.safe_load(dumps_genotype(genotype, "yaml"))
    assert as_json == as_yaml


def test_edge_order_does_not_change_the_hash_but_an_op_does(small_doc):
    genotype = genotype_from_data(small_doc)
    small_doc["cells"]["reduction"]["edges"].reverse()
    small_doc["cells"]["reduction"]["concat"].reverse()
    small_doc["provenance"] = {"description": "reordered"}
    reordered = genotype_from_data(small_doc)
    assert genotype_hash(reordered) == genotype_hash(genotype) and not diff(genotype, reordered)
    small_doc["cells"]["reduction"]["edges"][0]["op"] = "identity"
    changed = genotype_from_data(small_doc)
    assert genotype_hash(changed) != genotype_hash(genotype)
    assert [c.kind for c in diff(genotype, changed)] == ["changed"]


def test_diff_reports_added_removed_and_concat(small_doc):
    a = genotype_from_data(small_doc)
    small_doc["cells"]["expansion"]["edges"][2] = {"from": 1, "to": 3, "op": "identity"}
    small_doc["cells"]["expansion"]["concat"] = [3]
    changes = diff(a, genotype_from_data(small_doc))
    assert [(c.cell, c.kind) for c in changes] == [("expansion", "added"), ("expansion", "removed"),
                                                   ("expansion", "concat")]


@pytest.mark.parametrize("name, content, words", [
    ("empty.yaml", "", "file is empty"),
    ("blank.yaml", "  \n\n", "file is empty"),
    ("garbage.yaml", bytes(range(256)) * 4, "not UTF-8 text"),
    ("trailing.json", '{"format": "scnas-genotype", "version": 1,}', "not valid JSON"),
    ("bad.yaml", "format: [unclosed\n", "not valid YAML"),
    ("dup.json", '{"format": "scnas-genotype", "format": "x"}', "duplicate key 'format'"),
    ("dup.yaml", "format: scnas-genotype\nformat: x\n", "duplicate key 'format'"),
    ("scalar.yaml", "42\n", "this is a int"),
    ("v2.yaml", "format: scnas-genotype\nversion: 2\n", "version 2 is newer than this scnas"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_bad_files_give_one_clear_error(tmp_path, name, content, words):
    path = _write(tmp_path, name, content)
    message = _error(path)
    assert message.startswith(str(path)) and words in message and "\n" not in message


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    message = _error(_write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n"))
    assert "expands to more than" in message


def test_self_referencing_yaml_alias_is_refused(tmp_path):
    assert "expands to more than" in _error(_write(tmp_path, "loop.yaml", "a: &a [*a]\n"))


def test_small_yaml_aliases_are_fine(tmp_path, small_doc):
    text = yaml.safe_dump(small_doc, sort_keys=False)
    text = text.replace("  reduction:\n", "  reduction: &shared\n", 1)
    genotype = read_genotype(_write(tmp_path, "alias.yaml", text))
    assert genotype.cells.reduction.edges[0].op == "max_pool_3x3x3"


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as fh:
        fh.truncate(50 * 1024 * 1024)  # sparse: 50 MB that cost nothing to make
    assert f"the limit is {MAX_BYTES} bytes" in _error(path)


def test_missing_file_and_directory(tmp_path):
    assert _error(tmp_path / "nope.yaml").endswith("nope.yaml: no such file")
    assert "is a directory" in _error(tmp_path)


def test_unknown_name_lists_builtins():
    with pytest.raises(GenotypeError, match=r"no built-in genotype of that name \(built-ins: uresnet, minimal\)"):
        load_genotype("resnet")


def test_stdin_is_read_and_format_sniffed(monkeypatch, small_doc):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(small_doc).encode())))
    assert read_genotype("-").nodes == 2


def test_unknown_suffix_is_sniffed(tmp_path, small_doc):
    assert read_genotype(_write(tmp_path, "g.txt", json.dumps(small_doc))).nodes == 2


def test_write_needs_a_known_suffix(tmp_path, uresnet):
    with pytest.raises(GenotypeError, match="cannot tell the format"):
        write_genotype(uresnet, tmp_path / "g.txt")
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, uresnet, monkeypatch):
    target = tmp_path / "g.yaml"
    target.write_text("old content")

    def broken_replace(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match="No space left"):
        write_genotype(uresnet, target)
    assert target.read_text() == "old content" and [p.name for p in tmp_path.iterdir()] == ["g.yaml"]


def test_write_into_missing_folder_is_a_clear_error(tmp_path, uresnet):
    with pytest.raises(OutputError, match="does not exist"):
        write_genotype(uresnet, tmp_path / "no" / "g.yaml")


def test_written_file_has_normal_permissions(tmp_path, uresnet):
    path = tmp_path / "g.yaml"
    write_genotype(uresnet, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_older_versions_are_migrated_forward(monkeypatch, small_doc):
    """The mechanism, exercised with a made-up version 0 that called 'concat' 'output'."""
    monkeypatch.setattr(migrate_module, "OLDEST_VERSION", 0)

    def v0_to_v1(data):
        for cell in data["cells"].values():
            cell["concat"] = cell.pop("output")
        return {**data, "version": 1}
    monkeypatch.setitem(migrate_module.MIGRATIONS, 0, v0_to_v1)
    for cell in small_doc["cells"].values():
        cell["output"] = cell.pop("concat")
    small_doc["version"] = 0
    assert genotype_from_data(small_doc).cell("reduction").concat == [2, 3]


def test_version_without_migration_is_refused(small_doc):
    small_doc["version"] = 0
    with pytest.raises(GenotypeError, match=r"version 0 cannot be read: this scnas reads versions 1..1"):
        genotype_from_data(small_doc)


_AMBIGUOUS = ["yes", "No", "on", "OFF", "y", "0b10", "0o2", "010", "08", "1:00", "2026-11-27", "1e3", "1_000", "="]


@pytest.mark.parametrize("scalar", _AMBIGUOUS)
@pytest.mark.parametrize("as_key", [False, True])
def test_plain_scalars_yaml_1_1_and_1_2_read_differently_are_refused(tmp_path, small_doc, scalar, as_key):
    small_doc["provenance"] = {"note": "PLACEHOLDER"}
    text = yaml.safe_dump(small_doc, sort_keys=False)
    text = text.replace("note: PLACEHOLDER", f"{scalar}: x" if as_key else f"note: {scalar}")
    message = _error(_write(tmp_path, "g.yaml", text))
    assert "ambiguous YAML" in message and repr(scalar) in message and "line " in message and "quote it" in message


@pytest.mark.parametrize("scalar", _AMBIGUOUS)
def test_quoted_ambiguous_scalars_are_read_and_written_quoted(tmp_path, small_doc, scalar):
    small_doc["provenance"] = {"note": scalar, scalar: "key"}
    path = tmp_path / "g.yaml"
    write_genotype(genotype_from_data(small_doc), path)
    back = read_genotype(path)  # refused if the writer left any of them plain
    assert back.provenance.note == scalar and getattr(back.provenance, scalar) == "key"
    assert f'"{scalar}"' in path.read_text() or f"'{scalar}'" in path.read_text()


def test_unambiguous_plain_scalars_are_accepted(tmp_path, small_doc):
    small_doc["provenance"] = {"PLACEHOLDER": 1}
    text = yaml.safe_dump(small_doc, sort_keys=False).replace(
        "PLACEHOLDER: 1", "a: true\n  b: 0.5\n  c: .inf\n  d: ~\n  e: 0x1F\n  f: -3\n  g: '1:00'")
    provenance = read_genotype(_write(tmp_path, "g.yaml", text)).provenance
    assert (provenance.a, provenance.b, provenance.d, provenance.e, provenance.f, provenance.g) == (True, 0.5, None, 31, -3, "1:00")


def test_yaml_merge_key_is_refused_by_name(tmp_path, small_doc):
    text = yaml.safe_dump(small_doc, sort_keys=False)
    text = text.replace("  reduction:\n", "  reduction:\n    <<: *enc\n", 1).replace("  encoder_normal:\n", "  encoder_normal: &enc\n", 1)
    message = _error(_write(tmp_path, "merge.yaml", text))
    assert "merge key '<<'" in message and "line " in message and message.startswith(str(tmp_path / "merge.yaml"))


def test_scnas_shows_one_short_hash_the_first_12_digits_of_the_full_one(cli, uresnet):
    import re

    from conftest import ROOT
    from scnas.genotype import SHORT_HASH_DIGITS, short_hash

    full = genotype_hash(uresnet)
    assert re.fullmatch(r"[0-9a-f]{64}", full) and SHORT_HASH_DIGITS == 12
    assert short_hash(uresnet) == short_hash(full) == full[:12]
    spec = " ".join((ROOT / "docs" / "genotype-format.md").read_text().split())
    assert "scnas shows the first 12 hex digits (the short hash" in spec   # the length the spec states
    for args in (("validate", "uresnet"), ("show", "uresnet")):
        printed = cli(*args).out
        assert full[:12] in printed and full[:13] not in printed, args
    # one definition: no other module cuts a genotype hash to a length of its own
    for path in (ROOT / "scnas").rglob("*.py"):
        if path.name != "canonical.py":
            assert not re.search(r"genotype_hash[^\n]*\[:\d*\]", path.read_text()), path
