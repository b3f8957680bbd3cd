"""ST-MAE's semantic deep-feature residual: ``mean_c (Ψ − Ψ̂)² · (1 − cos_c(Ψ, Ψ̂))`` per position, upsampled, blurred.

The cosine distance is computed as ``½‖Ψ/‖Ψ‖ − Ψ̂/‖Ψ̂‖‖²``, which equals ``1 − cos`` exactly but does not cancel:
``1 − cos`` from a float32 cosine loses most of its digits once the reconstruction is close (measured on 960-d
features: 2 % relative error at ``1 − cos ≈ 5e-5``, 250 % at ``5e-7``; the difference of unit vectors stays within
1e-5 of float64). The map of well-reconstructed normal regions is exactly that regime, and exported graphs (ONNX
Runtime, OpenVINO) sum in other orders than torch, so the cancelling form would also break export parity after
anomalib's min-max normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.anomaly_map import make_blur

__all__ = ["STMAEAnomalyMap", "cosine_distance_map", "residual_map"]


def cosine_distance_map(target: torch.Tensor, recon: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``1 − cos`` over channels of two ``(B, C, H, W)`` maps → ``(B, 1, H, W)``, as ``½‖t̂ − r̂‖²`` (no cancellation).

    A position where one map is all zero gets ``½`` (the other unit vector's half squared norm), where
    ``F.cosine_similarity`` would give 1; backbone features are never all zero over their channels in practice.
    """
    diff = F.normalize(target, dim=1, eps=eps) - F.normalize(recon, dim=1, eps=eps)
    return 0.5 * diff.pow(2).sum(dim=1, keepdim=True)


def residual_map(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """ST-MAE's residual ``mean_c (t − r)² · (1 − cos_c(t, r))`` per position ``(B, 1, H, W)``."""
    if target.shape != recon.shape or target.dim() != 4:
        msg = f"target and recon must be (B, C, H, W) maps of equal shape, got {tuple(target.shape)}, " + str(
            tuple(recon.shape)
        )
        raise ValueError(msg)
    return (target - recon).pow(2).mean(dim=1, keepdim=True) * cosine_distance_map(target, recon)


class STMAEAnomalyMap(nn.Module):
    """Residual maps of one or more reconstructions, averaged, bilinearly upsampled to the input and blurred.

    Upsampling and blur are linear, so averaging the residual maps of several test partitions before them equals
    averaging the final maps.

    Args:
        blur_sigma: Gaussian σ at the input resolution (4; kernel ``2·int(4σ + 0.5) + 1`` = 33). ``None`` = no blur.
        align_corners: Bilinear upsampling flag (True, as the authors' code resizes).
    """

    def __init__(self, blur_sigma: float | None = 4.0, align_corners: bool = True) -> None:
        super().__init__()
        self.align_corners = bool(align_corners)
        self.blur = make_blur(blur_sigma) if blur_sigma else None

    def forward(self, target: torch.Tensor, recons: Sequence[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """``(B, 1, H, W)`` map at ``out_size`` from the target features and the reconstructions (one per partition)."""
        if len(recons) == 0:
            msg = "STMAEAnomalyMap needs at least one reconstruction."
            raise ValueError(msg)
        amap = residual_map(target, recons[0])
        for recon in recons[1:]:
            amap = amap + residual_map(target, recon)
        if len(recons) > 1:
            amap = amap / len(recons)
        amap = F.interpolate(amap, size=tuple(out_size), mode="bilinear", align_corners=self.align_corners)
        return self.blur(amap) if self.blur is not None else amap
