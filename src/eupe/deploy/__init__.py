"""Inference cost (params, FLOPs, latency) and export (ONNX, ExecuTorch, torch.export)."""

from .cost import FLOP_CONVENTION, cost_table, count_flops, measure_latency, to_markdown
from .export import FORMATS, ExportResult, export_model

__all__ = [
    "FLOP_CONVENTION",
    "FORMATS",
    "ExportResult",
    "cost_table",
    "count_flops",
    "export_model",
    "measure_latency",
    "to_markdown",
]
