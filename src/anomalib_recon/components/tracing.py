"""One test for "a graph is being captured", where eager-only checks (NaN scans, ``.item()``) must be skipped."""

from __future__ import annotations

import torch


def is_tracing() -> bool:
    """True under torch.compile / torch.export, TorchScript tracing or ONNX export."""
    return bool(
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )
