"""PNPT's per-position cosine residual and its anomaly map.

The residual of a reconstruction ``R`` of a feature map ``f`` is ``1 − cos(f, R)`` over the channels at every
position. It is computed as ``½·‖f/‖f‖ − R/‖R‖‖²``, the same number written without the cancellation of
``1 − cos`` in float32: a good reconstruction has ``cos`` within ``1e-5`` of 1, where float32 keeps about two
significant digits of ``1 − cos`` but all of ``½·‖f̂ − R̂‖²`` (``tests/models/test_pnpt.py`` checks both against
float64). The loss and the map use the same residual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MAP_STREAMS", "cosine_residual", "residual_map"]

MAP_STREAMS = ("both", "sample", "prompt")
"""Which reconstruction the map reads: the mean of the two streams (the paper's dual-stream map), or one of them."""


def cosine_residual(features: torch.Tensor, reconstruction: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 − cos(f, R)`` over channels per position, ``(B, C, H, W)`` → ``(B, 1, H, W)``, in ``[0, 2]``.

    Computed as ``½·‖f̂ − R̂‖²`` with ``x̂ = x / max(‖x‖, eps)`` (``F.normalize``): equal to ``1 − cos`` for non-zero
    vectors, without its float32 cancellation near ``cos = 1``.
    """
    if features.shape != reconstruction.shape or features.dim() != 4:
        msg = (
            "cosine_residual expects two (B, C, H, W) maps of the same shape, got "
            f"{tuple(features.shape)} and {tuple(reconstruction.shape)}."
        )
        raise ValueError(msg)
    diff = F.normalize(features, dim=1, eps=eps) - F.normalize(reconstruction, dim=1, eps=eps)
    return 0.5 * diff.pow(2).sum(dim=1, keepdim=True)


def residual_map(
    sample: Sequence[torch.Tensor],
    prompt: Sequence[torch.Tensor] | None,
    out_size: tuple[int, int],
    streams: str = "both",
    blur: nn.Module | None = None,
    scale_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """The anomaly map ``(B, 1, H, W)`` from per-scale residual maps of the two streams.

    Per scale ``m_s = ½·(r^x_s + r^p_s)`` (``streams="both"``; ``r^x_s`` alone without a prompt stream or with
    ``streams="sample"``, ``r^p_s`` with ``streams="prompt"``), bilinearly upsampled to ``out_size``
    (``align_corners=False``), summed over the scales with ``scale_weights`` (all 1 by default; a scale of weight 0 is
    not computed), then blurred.

    Args:
        sample: ``r^x_s = 1 − cos(f_s, R^x_s)`` per scale, each ``(B, 1, H_s, W_s)``.
        prompt: ``r^p_s = 1 − cos(f_s, R^p_s)`` per scale, or ``None`` (no prompt stream).
        out_size: ``(H, W)`` of the map (the input size).
        streams: One of :data:`MAP_STREAMS`.
        blur: A Gaussian blur module (``components.anomaly_map.make_blur``) or ``None``.
        scale_weights: One weight per scale (``None`` = 1 each).
    """
    if streams not in MAP_STREAMS:
        msg = f"streams must be one of {MAP_STREAMS}, got {streams!r}."
        raise ValueError(msg)
    if prompt is None and streams == "prompt":
        msg = 'streams="prompt" needs the prompt stream (prompts="class" or "shared").'
        raise ValueError(msg)
    weights = [1.0] * len(sample) if scale_weights is None else [float(w) for w in scale_weights]
    if len(weights) != len(sample):
        msg = f"scale_weights needs one weight per scale ({len(sample)}), got {list(weights)}."
        raise ValueError(msg)
    total = None
    for i, r_x in enumerate(sample):
        if weights[i] == 0:
            continue
        if prompt is None or streams == "sample":
            m = r_x
        elif streams == "prompt":
            m = prompt[i]
        else:
            m = 0.5 * (r_x + prompt[i])
        m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)
        if weights[i] != 1:
            m = weights[i] * m
        total = m if total is None else total + m
    if total is None:
        msg = "residual_map needs at least one scale of weight > 0."
        raise ValueError(msg)
    return blur(total) if blur is not None else total
