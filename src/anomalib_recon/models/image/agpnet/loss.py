"""AGPNet reconstruction loss (paper Eq. 6-7): the mean distance of every perturbed branch's ``F̂`` to clean ``F``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_recon.components import cosine_distance, mse_loss

LOSS_TYPES = ("cosine", "mse")


class AGPNetLoss(nn.Module):
    """``L = mean_i D(F̂_i, F)`` over the branches (feature-level, image+feature-level), so ``½(L_feat + L_img)``
    with both perturbations on.

    Args:
        loss_type: ``"cosine"`` (``1 − cos`` per token, averaged over tokens; default) or ``"mse"``. The sources
            disagree on ``D`` (agpnet.md §4), so both are offered.
    """

    def __init__(self, loss_type: str = "cosine") -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            msg = f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}."
            raise ValueError(msg)
        self.loss_type = loss_type

    def distance(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``D(F̂, F)`` for ``(B, C, h, w)`` maps (channels on dim 1)."""
        if self.loss_type == "cosine":
            return cosine_distance(reconstruction, target, per_token=True, dim=1)
        return mse_loss(reconstruction, target)

    def forward(self, target: torch.Tensor, reconstructions: Sequence[torch.Tensor]) -> torch.Tensor:
        """Average of :meth:`distance` over the reconstructions; the target carries no gradient."""
        if len(reconstructions) == 0:
            msg = "AGPNetLoss needs at least one reconstruction."
            raise ValueError(msg)
        target = target.detach()
        losses = [self.distance(r, target) for r in reconstructions]
        return torch.stack(losses).mean()
