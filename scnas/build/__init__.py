"""From genotype to network: the op modules, cells, the U-Net macro layout, stats and model files.

``build_network(genotype, BuildConfig(...))`` is the one door; ``load_model(path)`` rebuilds
a network from a model file alone.
"""

from scnas.build.config import BuildConfig, BuildError
from scnas.build.model_file import (ModelFileError, ModelInfo, load_model, load_weights,
                                    read_any_model_info, read_model_info, read_onnx_info, save_model)
from scnas.build.network import (CHECKPOINT_MODES, CellGraph, CellModule, CellSlot, MacroUNet, SCNASUNet, build_network,
                                 macro_layout, node_width)
from scnas.build.ops import OP_BUILDERS, make_op
from scnas.build.stats import NetworkStats, network_stats

__all__ = [
    "CHECKPOINT_MODES", "BuildConfig", "BuildError", "CellGraph", "CellModule", "MacroUNet", "CellSlot", "ModelFileError", "ModelInfo", "NetworkStats",
    "OP_BUILDERS", "SCNASUNet", "build_network", "load_model", "load_weights", "macro_layout", "make_op",
    "network_stats", "node_width", "read_any_model_info", "read_model_info", "read_onnx_info", "save_model",
]
