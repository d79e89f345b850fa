"""What leaves scnas: ONNX models for other runtimes, and drawings of genotypes and networks.
Model files of either kind are read by :mod:`scnas.build` (``read_any_model_info``,
``read_onnx_info``)."""

from scnas.export.draw import DrawError, cells_graph, network_graph, write_drawing
from scnas.export.onnx_export import ExportError, ExportReport, ParityCheck, export_onnx

__all__ = ["DrawError", "ExportError", "ExportReport", "ParityCheck", "cells_graph", "export_onnx",
           "network_graph", "write_drawing"]
