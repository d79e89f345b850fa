"""What leaves scnas: ONNX models for other runtimes, and drawings of genotypes and networks."""

from scnas.export.draw import DrawError, cells_graph, network_graph, write_drawing
from scnas.export.onnx_export import (ExportError, ExportReport, ParityCheck, export_onnx, read_any_model_info,
                                      read_onnx_info)

__all__ = ["DrawError", "ExportError", "ExportReport", "ParityCheck", "cells_graph", "export_onnx",
           "network_graph", "read_any_model_info", "read_onnx_info", "write_drawing"]
