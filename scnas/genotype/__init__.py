"""The scnas genotype: a versioned, validated, framework-free description of the four cells.

Importing this package never imports torch: any program can read, validate, convert and
hash genotypes. Start with :func:`load_genotype` and :func:`write_genotype`.
"""

from scnas.errors import GenotypeError
from scnas.genotype.builtin import BUILTIN_NAMES, builtin_genotype, load_genotype, random_genotype
from scnas.genotype.canonical import (SHORT_HASH_DIGITS, Change, canonical_dict, diff, genotype_hash, normalized,
                                      short_hash)
from scnas.genotype.io import dumps_genotype, parse_genotype, read_genotype, write_genotype
from scnas.genotype.migrate import CURRENT_VERSION
from scnas.genotype.model import CELL_TYPES, FORMAT_NAME, MAX_NODES, NUM_INPUTS, Cell, Edge, Genotype
from scnas.genotype.ops import OPS, PAPER_OPS, OpSpec
from scnas.genotype.schema import json_schema
from scnas.genotype.validation import genotype_from_data

__all__ = [
    "BUILTIN_NAMES", "CELL_TYPES", "CURRENT_VERSION", "FORMAT_NAME", "MAX_NODES", "NUM_INPUTS", "OPS", "PAPER_OPS",
    "SHORT_HASH_DIGITS",
    "Cell", "Change", "Edge", "Genotype", "GenotypeError", "OpSpec",
    "builtin_genotype", "canonical_dict", "diff", "dumps_genotype", "genotype_from_data", "genotype_hash",
    "json_schema", "load_genotype", "normalized", "parse_genotype", "random_genotype", "read_genotype",
    "short_hash", "write_genotype",
]
