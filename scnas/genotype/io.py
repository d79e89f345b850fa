"""Reading and writing genotype files: JSON, YAML, DARTS strings and one-line strings.

The format follows the file suffix (``.json``, ``.yaml``/``.yml``, ``.darts``, ``.oneline``);
``-`` means stdin/stdout. Reading is bounded (``MAX_BYTES``, ``MAX_YAML_NODES`` after alias
expansion) and uses YAML's safe loader; writing is atomic. Every failure is a
``GenotypeError`` that names the file and, where it applies, the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from scnas.errors import GenotypeError
from scnas.fileio import STDIO, atomic_write_text, read_bytes_bounded
from scnas.genotype import convert
from scnas.genotype.canonical import normalized
from scnas.genotype.model import Genotype
from scnas.genotype.validation import genotype_from_data

MAX_BYTES = 1 << 20
"""Genotype files larger than this (1 MiB) are refused; real ones are a few KiB."""
MAX_YAML_NODES = 100_000
"""YAML documents expanding (aliases included) to more nodes than this are refused."""

FORMATS = ("yaml", "json", "darts", "oneline")
SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".darts": "darts", ".oneline": "oneline"}

_YAML_HEADER = "# scnas genotype (format version 1); specification: docs/genotype-format.md\n"


# ----------------------------------------------------------------------------- parsing text

class _BoundedLoader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate keys (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 core schema resolution of plain scalars (YAML 1.2.2, section 10.3.2), in order.
_CORE_12: tuple[tuple[re.Pattern[str], Any], ...] = tuple((re.compile(pattern), make) for pattern, make in (
    (r"null|Null|NULL|~|", lambda v: None),
    (r"true|True|TRUE|false|False|FALSE", lambda v: v.lower() == "true"),
    (r"[-+]?[0-9]+", int),
    (r"0o[0-7]+", lambda v: int(v[2:], 8)),
    (r"0x[0-9a-fA-F]+", lambda v: int(v[2:], 16)),
    (r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?", float),
    (r"[-+]?(\.inf|\.Inf|\.INF)", lambda v: float(v.lower().replace(".inf", "inf"))),
    (r"\.nan|\.NaN|\.NAN", lambda v: math.nan),
))


def core_12_value(text: str) -> Any:
    """What a YAML 1.2 core-schema reader makes of the plain (unquoted) scalar ``text``."""
    for pattern, make in _CORE_12:
        if pattern.fullmatch(text):
            return make(text)
    return text


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _describe(value: Any) -> str:
    kind = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")
    if value is None or isinstance(value, str):
        return kind
    return f"{kind} ({value!r})" if isinstance(value, (bool, int, float)) else f"{kind} ({value})"


_YAML_11_SPEC_BOOLS = {"y": True, "Y": True, "n": False, "N": False}
"""Booleans in the YAML 1.1 type repository that PyYAML reads as strings; other 1.1 readers do not."""


def _check_scalar(loader: yaml.SafeLoader, node: yaml.ScalarNode, is_key: bool, source: str | None) -> None:
    """Refuse a plain scalar that YAML 1.1 (PyYAML, many other readers) and the YAML 1.2 core
    schema read differently (``yes``, ``0b10``, ``0o2``, ``010``, ``1:00``, ``2026-11-27``,
    ``1e3``, ``1_000``, ``<<``, ...): the document would mean different things to different readers."""
    if node.style is not None or node.tag != loader.resolve(yaml.ScalarNode, node.value, (True, False)):
        return  # quoted, block or explicitly tagged: unambiguous
    where = f"line {node.start_mark.line + 1} column {node.start_mark.column + 1}"
    if node.value == "<<" and is_key:
        raise GenotypeError(f"not supported YAML: merge key '<<' at {where}: YAML 1.2 has no merge keys and readers "
                            "disagree on them; write the mapping's fields out (an alias of a whole value is fine)",
                            source=source)
    constructor = yaml.SafeLoader.yaml_constructors.get(node.tag)
    try:
        old = constructor(loader, node) if constructor else None
    except (yaml.YAMLError, ValueError, TypeError):
        constructor = None
    old = _YAML_11_SPEC_BOOLS.get(node.value, old)
    new = core_12_value(node.value)
    if constructor is None or not _same_value(old, new):
        as_old = _describe(old) if constructor else f"the special tag {node.tag.rsplit(':', 1)[-1]!r}"
        raise GenotypeError(f"ambiguous YAML: the unquoted {'key' if is_key else 'value'} {node.value!r} at {where} "
                            f"is {as_old} in YAML 1.1 but {_describe(new)} in YAML 1.2; quote it "
                            f"(\"{node.value}\") or write it in a form both read alike", source=source)


def _check_document(loader: yaml.SafeLoader, root: yaml.Node, source: str | None) -> None:
    # Aliases share composed nodes, so the walk below counts what a consumer would traverse;
    # "billion laughs" documents and self-referencing aliases stop at the bound.
    count, stack, checked = 0, [(root, False)], set()
    while stack:
        node, is_key = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise GenotypeError(f"YAML document expands to more than {MAX_YAML_NODES} nodes "
                                "(aliases nested to explode?); refusing to load it", source=source)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack += ((key, True), (value, False))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, False) for item in node.value)
        elif id(node) not in checked:
            checked.add(id(node))
            _check_scalar(loader, node, is_key, source)


def _parse_yaml(text: str, source: str | None) -> Any:
    try:
        loader = _BoundedLoader(text)  # the reader rejects control characters right here
    except yaml.reader.ReaderError as exc:
        raise GenotypeError(f"not valid YAML: control character U+{exc.character:04X} at position {exc.position} "
                            "is not allowed", source=source) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_document(loader, root, source)
        return loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise GenotypeError(f"not valid YAML: {exc.problem or exc.context}{where}", source=source) from None
    except yaml.YAMLError as exc:
        raise GenotypeError(f"not valid YAML: {exc}", source=source) from None
    finally:
        loader.dispose()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(text: str, source: str | None) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise GenotypeError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", source=source) from None
    except ValueError as exc:
        raise GenotypeError(f"not valid JSON: {exc}", source=source) from None


def sniff_format(text: str) -> str:
    """Guess the format of genotype text whose file name does not say it."""
    start = text.lstrip()
    if start.startswith("{"):
        return "json"
    if start.startswith("scnas-v"):
        return "oneline"
    if start.startswith("Genotype(") or "Genotype(" in start.split("\n", 1)[0]:
        return "darts"
    return "yaml"


def format_for_path(path: str | os.PathLike, explicit: str | None = None) -> str | None:
    """The format named by ``explicit`` or by the file's suffix; None when neither says."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise GenotypeError(f"unknown genotype format {explicit!r}; formats: {', '.join(FORMATS)}")
        return explicit
    return SUFFIXES.get(Path(str(path)).suffix.lower())


def parse_genotype(text: str, fmt: str, source: str | None = None, **options: Any) -> Genotype:
    """Parse genotype text of a known format; ``options`` (``op_map``, ``cells``, ``darts_names``) go to the
    DARTS reader and are ignored by the others."""
    if not text.strip():
        raise GenotypeError("file is empty", source=source)
    try:
        if fmt == "json":
            return genotype_from_data(_parse_json(text, source), source)
        if fmt == "yaml":
            return genotype_from_data(_parse_yaml(text, source), source)
        if fmt == "darts":
            return convert.from_darts(text, source=source, **options)
        if fmt == "oneline":
            return convert.from_oneline(text, source=source)
    except RecursionError:
        raise GenotypeError("document is nested too deeply", source=source) from None
    raise GenotypeError(f"unknown genotype format {fmt!r}; formats: {', '.join(FORMATS)}", source=source)


def read_genotype(path: str | os.PathLike, fmt: str | None = None, **options: Any) -> Genotype:
    """Read and validate a genotype file (``-``: stdin). The format comes from ``fmt``, the
    suffix, or the content."""
    source = "<stdin>" if str(path) == STDIO else str(path)
    raw = read_bytes_bounded(path, MAX_BYTES, GenotypeError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GenotypeError(f"not UTF-8 text (byte {exc.start}); is this a binary file?", source=source) from None
    fmt = format_for_path(path, fmt) or sniff_format(text)
    return parse_genotype(text, fmt, source, **options)



class _Flow(dict):
    """A mapping written on one line in YAML."""


class _FlowList(list):
    """A list written on one line in YAML."""


class _Dumper(yaml.SafeDumper):
    """Quotes every string a YAML 1.1 or a YAML 1.2 core reader would not read back as that string."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        if not isinstance(core_12_value(data), str) or data in ("<<", "=") or data in _YAML_11_SPEC_BOOLS:
            return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')
        return super().represent_str(data)


_Dumper.add_representer(str, _Dumper.represent_str)


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _yaml_layout(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["ops"] = _FlowList(data["ops"])
    for cell in data["cells"].values():
        cell["edges"] = [_Flow(edge) for edge in cell["edges"]]
        cell["concat"] = _FlowList(cell["concat"])
    probabilities = (data.get("provenance") or {}).get("probabilities") or {}
    for entries in probabilities.values():
        entries[:] = [_Flow(entry) for entry in entries]
    return data


def dumps_genotype(genotype: Genotype, fmt: str = "yaml", **options: Any) -> str:
    """The genotype as text (edges in canonical order); ``options`` (``op_map``, ``cells``, ``darts_names``) go
    to the DARTS writer and are ignored by the others."""
    data = normalized(genotype).to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        return _YAML_HEADER + yaml.dump(_yaml_layout(data), Dumper=_Dumper, sort_keys=False,
                                        default_flow_style=False, width=120)
    if fmt == "darts":
        return convert.to_darts(genotype, **options) + "\n"
    if fmt == "oneline":
        return convert.to_oneline(genotype) + "\n"
    raise GenotypeError(f"unknown genotype format {fmt!r}; formats: {', '.join(FORMATS)}")


def write_genotype(genotype: Genotype, path: str | os.PathLike, fmt: str | None = None, **options: Any) -> None:
    """Write a genotype atomically; the format comes from ``fmt`` or the suffix (``-``: YAML to stdout)."""
    resolved = format_for_path(path, fmt)
    if resolved is None:
        if str(path) != STDIO:
            raise GenotypeError(f"cannot tell the format from the file name; use a suffix "
                                f"({', '.join(SUFFIXES)}) or name the format", source=str(path))
        resolved = "yaml"
    atomic_write_text(path, dumps_genotype(genotype, resolved, **options))
