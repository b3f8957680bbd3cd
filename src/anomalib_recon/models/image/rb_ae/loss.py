"""RB-AE / NDP-Net training losses (arXiv 2211.10060; the form of each term is INFERRED from the abstracts).

* Stage 1, :class:`RBAEReconstructionLoss`: ``L_rec + λ_p · L_per`` with
  ``L_rec = mean((x̂ − x)²) + (1 − SSIM(x̂, x))`` (11×11 Gaussian SSIM, images in [0, 1]) between the reconstruction
  of the pseudo-anomalous image and the clean image, and the defective-feature perception loss
  :func:`perception_loss` on the encoder maps.
* Stage 2, :class:`RBAESegmentationLoss`: the pixel-level loss ``L_pix = Focal(P, M; γ=2) + Dice(P, M)`` of the
  MSFDM's defect probability against the synthetic-defect mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kornia.metrics import ssim
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.losses import dice_loss, focal_loss_on_probs, mse_loss, require_finite

SSIM_WINDOW = 11


def mask_coverage(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Fraction of each cell of a ``size`` grid covered by the defect mask (area interpolation), ``(B, 1, h, w)``."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        msg = f"mask must be (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}."
        raise ValueError(msg)
    return F.interpolate(mask.float(), size=tuple(int(s) for s in size), mode="area")


def perception_loss(
    augmented_features: Sequence[torch.Tensor],
    normal_features: Sequence[torch.Tensor],
    mask: torch.Tensor,
    margin: float = 0.5,
    defect_threshold: float = 0.5,
) -> torch.Tensor:
    """Defective-feature perception loss on the encoder maps, averaged over scales.

    Per scale, with ``c = cos(E_s(x_a), E_s(x))`` over channels at each position and the mask's coverage of each
    position: positions covered at least ``defect_threshold`` are *defective* and pay ``max(0, c − margin)`` (their
    features must differ from the clean ones); positions with no defect at all are *normal* and pay ``1 − c`` (the
    encoder must be invariant to defects elsewhere); partly covered positions are ignored. Each term is a mean over
    its positions (0 when there are none).
    """
    if len(augmented_features) != len(normal_features) or not augmented_features:
        msg = "perception_loss needs one clean map per augmented map."
        raise ValueError(msg)
    terms = []
    for aug, clean in zip(augmented_features, normal_features, strict=True):
        require_finite("perception_loss", aug, clean)
        cos = F.cosine_similarity(aug, clean, dim=1, eps=1e-8).unsqueeze(1)
        coverage = mask_coverage(mask, aug.shape[-2:]).to(cos.dtype)
        defect = (coverage >= defect_threshold).to(cos.dtype)
        normal = (coverage == 0).to(cos.dtype)
        defect_term = (F.relu(cos - margin) * defect).sum() / defect.sum().clamp_min(1)
        normal_term = ((1 - cos) * normal).sum() / normal.sum().clamp_min(1)
        terms.append(defect_term + normal_term)
    return torch.stack(terms).mean()


def ssim_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 − mean(SSIM)`` with kornia's 11×11 Gaussian window (images in [0, 1], data range 1)."""
    return 1 - ssim(prediction, target, SSIM_WINDOW, max_val=1.0).mean()


class RBAEReconstructionLoss(nn.Module):
    """Stage-1 loss ``MSE(x̂, x) + (1 − SSIM(x̂, x)) + λ_p · L_per``.

    Args:
        perception_loss_weight: ``λ_p`` (1.0); 0 = the "without perception loss" ablation.
        perception_margin: Cosine margin of defective positions (0.5).
    """

    def __init__(self, perception_loss_weight: float = 1.0, perception_margin: float = 0.5) -> None:
        super().__init__()
        self.perception_loss_weight = float(perception_loss_weight)
        self.perception_margin = float(perception_margin)

    def forward(
        self,
        reconstruction: torch.Tensor,
        normal_images: torch.Tensor,
        mask: torch.Tensor,
        augmented_features: Sequence[torch.Tensor],
        normal_features: Sequence[torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "mse", "ssim", "perception"}``; ``perception`` is 0 without clean maps (weight 0)."""
        mse = mse_loss(reconstruction, normal_images)
        structural = ssim_loss(reconstruction, normal_images)
        loss = mse + structural
        if normal_features is not None and self.perception_loss_weight > 0:
            perception = perception_loss(augmented_features, normal_features, mask, self.perception_margin)
            loss = loss + self.perception_loss_weight * perception
        else:
            perception = reconstruction.new_zeros(())
        return {"loss": loss, "mse": mse, "ssim": structural, "perception": perception}


class RBAESegmentationLoss(nn.Module):
    """Stage-2 pixel-level loss ``Focal(P, M; γ) + Dice(P, M)`` at the input resolution.

    Args:
        focal_gamma: γ of the focal loss (2).
    """

    def __init__(self, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.focal_gamma = float(focal_gamma)

    def forward(self, probability: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "focal", "dice"}`` for ``probability`` and ``mask`` of shape ``(B, 1, H, W)``."""
        mask = mask.to(probability.dtype)
        focal = focal_loss_on_probs(probability, mask, gamma=self.focal_gamma)
        dice = dice_loss(probability, mask)
        return {"loss": focal + dice, "focal": focal, "dice": dice}
