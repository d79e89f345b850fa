"""Regenerate the conformance documents and manifest.json from the cases listed below.

Run ``python tests/conformance/generate.py`` after changing a case. It writes plain YAML/JSON
with PyYAML/json only (not scnas's writer), so invalid documents can be expressed; the
expected hashes of the valid documents come from scnas, the reference implementation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from scnas.genotype import genotype_from_data, genotype_hash  # the reference implementation gives the hashes

HERE = Path(__file__).resolve().parent
PAPER_OPS = ["zero", "identity", "conv_3x3x3", "sep_dil2_conv_3x3x3", "sep_dil3_conv_3x3x3",
             "sep_dil4_conv_3x3x3", "max_pool_3x3x3", "avg_pool_3x3x3"]


def base() -> dict:
    """A small valid genotype (2 intermediate nodes) that the invalid cases mutate."""
    def cell(a: str, b: str, c: str) -> dict:
        return {"edges": [{"from": 0, "to": 2, "op": a}, {"from": 1, "to": 2, "op": b}, {"from": 2, "to": 3, "op": c}],
                "concat": [2, 3]}
    return {"format": "scnas-genotype", "version": 1, "nodes": 2, "ops": list(PAPER_OPS),
            "cells": {"encoder_normal": cell("conv_3x3x3", "identity", "sep_dil2_conv_3x3x3"),
                      "reduction": cell("max_pool_3x3x3", "conv_3x3x3", "avg_pool_3x3x3"),
                      "decoder_normal": cell("sep_dil3_conv_3x3x3", "identity", "conv_3x3x3"),
                      "expansion": cell("conv_3x3x3", "sep_dil4_conv_3x3x3", "identity")}}


def mutate(function):
    doc = base()
    result = function(doc)
    return doc if result is None else result


def _set(path: str, value):
    def apply(doc):
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return apply


_DELETE = object()


def _probabilities(total: float):
    def apply(doc):
        rest = (total - 0.5) / (len(PAPER_OPS) - 1)
        p = {op: (0.5 if op == "conv_3x3x3" else rest) for op in PAPER_OPS}
        doc["provenance"] = {"probabilities": {"encoder_normal": [{"from": 0, "to": 2, "p": p}]}}
    return apply


# name: (mutation, expected error path, words in the reason, does the JSON Schema alone reject it?, rule broken).
# The path follows from the rule (docs/genotype-format.md, "Error paths"); test_conformance.py checks that it does.
INVALID = {
    "wrong-format": (_set("format", "darts-genotype"), "", "format is", True, "S1"),
    "missing-format": (_set("format", _DELETE), "", "'format' is missing", True, "S1"),
    "newer-version": (_set("version", 2), "", "newer than this scnas", True, "S1"),
    "missing-version": (_set("version", _DELETE), "", "'version' is missing", True, "S1"),
    "version-as-string": (_set("version", "1"), "", "version must be an integer", True, "S1"),
    # JSON Schema's "integer" is a value class: 1.0 is an integer to every conforming validator.
    "version-as-float": (_set("version", 1.0), "", "version must be an integer", False, "S1"),
    "top-level-list": (lambda doc: [doc], "", "mapping", True, "S1"),
    "missing-cell": (_set("cells.expansion", _DELETE), "cells.expansion", "missing", True, "S8"),
    "unknown-field": (_set("cells.reduction.colour", "red"), "cells.reduction.colour", "unknown field", True, "S3"),
    "edge-without-op": (_set("cells.reduction.edges.1.op", _DELETE), "cells.reduction.edges[1].op", "missing", True, "S8"),
    "index-as-string": (_set("cells.reduction.edges.1.from", "1"), "cells.reduction.edges[1].from", "integer", True, "S2"),
    "index-as-float": (_set("cells.reduction.edges.1.from", 1.0), "cells.reduction.edges[1].from", "integer", False, "S2"),
    "nodes-as-float": (_set("nodes", 2.0), "nodes", "integer", False, "S2"),
    "negative-index": (_set("cells.reduction.edges.1.from", -1), "cells.reduction.edges[1].from", "greater than or equal",
                       True, "S4"),
    "zero-nodes": (_set("nodes", 0), "nodes", "greater than or equal", True, "S4"),
    "nodes-above-bound": (_set("nodes", 65), "nodes", "less than or equal to 64", True, "S7"),
    "nodes-far-above-bound": (_set("nodes", 1_000_000_000), "nodes", "less than or equal to 64", True, "S7"),
    "empty-concat": (_set("cells.decoder_normal.concat", []), "cells.decoder_normal.concat", "at least 1", True, "S5"),
    "empty-ops": (_set("ops", []), "ops", "at least 1", True, "S9"),
    "unknown-op": (_set("cells.reduction.edges.1.op", "conv_5x5x5"), "cells.reduction.edges[1].op", "unknown op", True, "S6"),
    "zero-edge": (_set("cells.reduction.edges.1.op", "zero"), "cells.reduction.edges[1].op", "delete the edge", True, "S6"),
    "unknown-op-in-vocabulary": (_set("ops.7", "conv_9x9x9"), "ops[7]", "unknown op", True, "R1"),
    "duplicate-op-in-vocabulary": (_set("ops.7", "identity"), "ops[7]", "listed twice", True, "R1"),
    "op-outside-vocabulary": (_set("ops", ["zero", "identity", "conv_3x3x3", "sep_dil2_conv_3x3x3", "sep_dil3_conv_3x3x3",
                                            "sep_dil4_conv_3x3x3", "avg_pool_3x3x3"]),
                              "cells.reduction.edges[0].op", "not in this document's vocabulary", False, "R2"),
    "edge-into-input": (_set("cells.encoder_normal.edges.2.to", 1), "cells.encoder_normal.edges[2].to", "input node",
                        False, "R3"),
    "target-out-of-range": (_set("cells.expansion.edges.2.to", 7), "cells.expansion.edges[2].to", "out of range", False, "R3"),
    "source-out-of-range": (_set("cells.expansion.edges.2", {"from": 5, "to": 3, "op": "identity"}),
                            "cells.expansion.edges[2].from", "out of range", False, "R4"),
    "edge-to-itself": (_set("cells.encoder_normal.edges.2.from", 3), "cells.encoder_normal.edges[2]", "to itself",
                       False, "R5"),
    "backwards-edge": (_set("cells.encoder_normal.edges.2", {"from": 3, "to": 2, "op": "conv_3x3x3"}),
                       "cells.encoder_normal.edges[2]", "backwards", False, "R5"),
    "duplicate-edge": (_set("cells.decoder_normal.edges.2", {"from": 0, "to": 2, "op": "identity"}),
                       "cells.decoder_normal.edges[2]", "duplicate edge", False, "R6"),
    "concat-missing-node": (_set("cells.reduction.concat", [2, 9]), "cells.reduction.concat[1]", "does not exist",
                            False, "R7"),
    "concat-duplicate-node": (_set("cells.reduction.concat", [2, 3, 3]), "cells.reduction.concat[2]", "listed twice",
                              False, "R7"),
    "used-node-without-input": (_set("cells.encoder_normal.edges", [{"from": 0, "to": 3, "op": "conv_3x3x3"}]),
                                "cells.encoder_normal.concat[0]", "no incoming edge", False, "R8"),
    "node-without-input-used-by-edge": (_set("cells.encoder_normal", {"edges": [{"from": 2, "to": 3, "op": "identity"},
                                                                                {"from": 1, "to": 3, "op": "identity"}],
                                                                      "concat": [3]}),
                                        "cells.encoder_normal.edges[0]", "no incoming edge", False, "R8"),
    "probabilities-not-summing-to-one": (_probabilities(0.9), "provenance.probabilities.encoder_normal[0].p", "sum to",
                                         False, "R9"),
}

# Documents only text can express: name -> (suffix, text, path, reason, schema_rejects, rule). schema_rejects is
# null where the document is refused before any schema applies (its meaning depends on the YAML reader).
def _yaml_with(old: str, new: str) -> str:
    return yaml.safe_dump(base(), sort_keys=False).replace(old, new, 1)


RAW_INVALID = {
    "version-as-exponent": (".json", lambda: json.dumps(base(), indent=2).replace('"version": 1', '"version": 1e0', 1),
                            "", "version must be an integer", False, "S1"),
    "ambiguous-yaml-octal": (".yaml", lambda: _yaml_with("nodes: 2", "nodes: 0o2"), "", "ambiguous YAML", None, "E3"),
    "ambiguous-yaml-binary": (".yaml", lambda: _yaml_with("nodes: 2", "nodes: 0b10"), "", "ambiguous YAML", None, "E3"),
    "ambiguous-yaml-sexagesimal": (".yaml", lambda: _yaml_with("ops:", "provenance: {epoch: 1:00}\nops:"), "",
                                   "ambiguous YAML",
                                   None, "E3"),
    "ambiguous-yaml-date": (".yaml", lambda: _yaml_with("ops:", "provenance: {created: 2026-11-27}\nops:"), "",
                            "ambiguous YAML", None, "E3"),
    "ambiguous-yaml-boolean": (".yaml", lambda: _yaml_with("ops:", "provenance: {ok: yes}\nops:"), "", "ambiguous YAML",
                               None, "E3"),
    "yaml-merge-key": (".yaml", lambda: _yaml_with("  reduction:\n", "  reduction:\n    <<: {concat: [2]}\n"), "",
                       "merge key '<<'", None, "E3"),
}


def _valid_cases() -> dict[str, dict]:
    reordered = base()
    for cell in reordered["cells"].values():
        cell["edges"].reverse()
        cell["concat"].reverse()
    dead_node = base()
    dead_node["cells"]["reduction"]["concat"] = [2]  # node 3 computes but nothing uses it: allowed
    lonely_node = base()
    lonely_node["cells"]["reduction"]["edges"] = lonely_node["cells"]["reduction"]["edges"][:2]
    lonely_node["cells"]["reduction"]["concat"] = [2]  # node 3 has no input and no use: allowed
    restricted = base()
    restricted["ops"] = ["zero", "identity", "conv_3x3x3", "sep_dil2_conv_3x3x3", "sep_dil3_conv_3x3x3",
                         "sep_dil4_conv_3x3x3", "max_pool_3x3x3", "avg_pool_3x3x3"][::-1]
    minimal = {"format": "scnas-genotype", "version": 1, "nodes": 1, "ops": ["conv_3x3x3"],
               "cells": {name: {"edges": [{"from": 1, "to": 2, "op": "conv_3x3x3"}], "concat": [2]}
                         for name in ("encoder_normal", "reduction", "decoder_normal", "expansion")}}
    defaults = copy.deepcopy(minimal)
    del defaults["ops"], defaults["nodes"]  # nodes defaults to 4, ops to the paper's eight
    with_provenance = base()
    with_provenance["provenance"] = {
        "scnas_version": "0.1.0", "created": "2026-11-27T10:00:00Z", "epoch": 199, "tool": "another-framework",
        "search": {"dataset": "Task01_BrainTumour", "fold": 0, "seed": 0, "sampling": "pair",
                   "task": "BRATS", "cases": ["BRATS_001", "BRATS_002", "BRATS_004"]},
        "probabilities": {"encoder_normal": [{"from": 0, "to": 2, "p": {op: 1 / 8 for op in PAPER_OPS}}]}}
    # cells chosen by perturbation ('scnas derive --by perturbation'): provenance, so the hash is base's
    with_perturbation = base()
    with_perturbation["provenance"] = {
        "epoch": 3, "search": {
            "sampling": "full", "seed": 1, "countermeasures": {"warmup_epochs": 2},
            "derivation": "perturbation (DARTS-PT): per node the top-2 incoming edges by the loss rise of their best op",
            "perturbation": {"settings": {"patches": 8, "seed": 0}, "base_loss": 0.0889, "epoch": 3,
                             "scores": {"encoder_normal": [[0.0, 0.001, 0.012, -0.002, 0.0, 0.004, 0.0, 0.001]]}}}}
    # read from DARTS with node 2 of encoder_normal listed as inputs (1, 0): provenance, so the hash is base's
    with_darts_order = base()
    with_darts_order["provenance"] = {"darts_ops": {"skip_connect": "identity"},
                                      "darts_order": {"encoder_normal": [[1, 0], [2]]}}
    return {"base": base(), "reordered": reordered, "dead-node": dead_node, "node-without-input-unused": lonely_node,
            "restricted-vocabulary": restricted, "minimal": minimal, "defaults": defaults,
            "with-provenance": with_provenance, "with-darts-order": with_darts_order,
            "with-perturbation": with_perturbation}


def main() -> None:
    manifest = {"format": "scnas-genotype", "version": 1, "valid": [], "invalid": []}
    for folder in ("valid", "invalid"):
        (HERE / folder).mkdir(exist_ok=True)
        for old in (HERE / folder).iterdir():
            old.unlink()
    for name, doc in _valid_cases().items():
        for suffix in (".yaml", ".json") if name == "base" else (".yaml",):
            path = HERE / "valid" / f"{name}{suffix}"
            text = json.dumps(doc, indent=2) + "\n" if suffix == ".json" else yaml.safe_dump(doc, sort_keys=False)
            path.write_text(text)
            manifest["valid"].append({"file": f"valid/{path.name}", "hash": genotype_hash(genotype_from_data(doc))})
    # Rule E3's other side: quoted, the scalars readers disagree on are plain strings to all of them.
    quoted = _yaml_with("ops:", 'provenance: {note: "yes", created: "2026-11-27", at: "1:00", octal: "0o2", '
                               "exponent: '1e3', flag: 'on', key: \"<<\"}\nops:")
    (HERE / "valid" / "quoted-scalars.yaml").write_text(quoted)
    manifest["valid"].append({"file": "valid/quoted-scalars.yaml", "hash": genotype_hash(genotype_from_data(base()))})
    for name, (mutation, path, reason, schema_rejects, rule) in INVALID.items():
        doc = mutate(mutation)
        (HERE / "invalid" / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        manifest["invalid"].append({"file": f"invalid/{name}.yaml", "rule": rule, "path": path, "reason": reason,
                                    "schema_rejects": schema_rejects})
    for name, (suffix, text, path, reason, schema_rejects, rule) in RAW_INVALID.items():
        (HERE / "invalid" / f"{name}{suffix}").write_text(text())
        manifest["invalid"].append({"file": f"invalid/{name}{suffix}", "rule": rule, "path": path, "reason": reason,
                                    "schema_rejects": schema_rejects})
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
