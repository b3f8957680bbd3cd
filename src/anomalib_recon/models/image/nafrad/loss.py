"""NAFRAD training loss: ``MSE(F̂, F_n) + Focal(P, M; γ=4) + L1(P, M)``, as the authors' code trains it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.losses import (
    focal_loss_on_probs,
    mse_loss,
    reduce_loss,
    require_probs,
    require_same_shape,
)


def l1_loss_on_probs(
    p: torch.Tensor, y: torch.Tensor, reduction: str = "mean", check_inputs: bool = True
) -> torch.Tensor:
    """Mean absolute error between a probability map and a binary mask (NAFRAD)."""
    require_same_shape(p, y, "l1_loss_on_probs")
    if check_inputs:
        require_probs("l1_loss_on_probs", p, y)
    return reduce_loss((p - y.to(p.dtype)).abs(), reduction)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Binary mask on the feature grid: bilinear resize (``align_corners=False``), then ``>= 0.5``.

    Args:
        mask: ``(B, 1, H, W)`` or ``(B, H, W)`` mask in {0, 1} at image resolution.
        size: Target ``(h, w)``.
    """
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        msg = f"mask must be (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}."
        raise ValueError(msg)
    small = F.interpolate(mask.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return (small >= 0.5).float()


class NAFRADLoss(nn.Module):
    """Reconstruction + segmentation loss of NAFRAD.

    * ``MSE(F̂, F_n)``: the reconstruction of the pseudo-anomalous features must match the *normal* features;
    * ``Focal(P, M)`` with γ=4 and no α, and ``L1(P, M)`` on the mask ``M`` downsampled to the grid of ``P``.

    The segmentation terms are not detached from ``F̂``: their gradients also train the autoencoder, as in the
    reference.

    Args:
        focal_gamma: Focusing parameter γ of the focal loss (4).
    """

    def __init__(self, focal_gamma: float = 4.0) -> None:
        super().__init__()
        self.focal_gamma = float(focal_gamma)

    def forward(
        self,
        reconstruction: torch.Tensor,
        normal_features: torch.Tensor,
        prediction: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss", "reconstruction", "focal", "l1"}`` (scalars; ``loss`` is their sum).

        Args:
            reconstruction: ``F̂`` ``(B, C, h, w)``.
            normal_features: ``F_n`` ``(B, C, h, w)``.
            prediction: ``P`` ``(B, 1, h, w)``, probabilities.
            mask: Synthetic-anomaly mask at image resolution ``(B, 1, H, W)``.
        """
        target = downsample_mask(mask, prediction.shape[-2:]).to(prediction.dtype)
        rec = mse_loss(reconstruction, normal_features)
        focal = focal_loss_on_probs(prediction, target, gamma=self.focal_gamma)
        l1 = l1_loss_on_probs(prediction, target)
        return {"loss": rec + focal + l1, "reconstruction": rec, "focal": focal, "l1": l1}
