"""Inference cost (params, FLOPs, latency) and export (ONNX, ExecuTorch, torch.export)."""
