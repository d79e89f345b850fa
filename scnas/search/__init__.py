"""SCNAS search: Algorithm 1 (paired Gumbel-softmax operation sampling), the supernet, the
bi-level loop, temperature annealing, genotype derivation, checkpoints."""

from scnas.search.config import SearchConfig
from scnas.search.derive import derive_genotype
from scnas.search.loop import SearchError, SearchResult, load_checkpoint, run_search
from scnas.search.sampling import SAMPLERS, sample_choices, sample_full, sample_one, sample_pair
from scnas.search.supernet import Architecture, EdgeChoice, MixedEdge, SuperNet, cell_edges

__all__ = ["SAMPLERS", "Architecture", "EdgeChoice", "MixedEdge", "SearchConfig", "SearchError", "SearchResult",
           "SuperNet", "cell_edges", "derive_genotype", "load_checkpoint", "run_search", "sample_choices", "sample_full",
           "sample_one", "sample_pair"]
