"""AGPNet reconstruction loss (paper Eq. 6-7): the mean distance of every perturbed branch's ``F̂`` to clean ``F``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_recon.components import cosine_distance, mse_loss

from .torch_model import DISTANCES


class AGPNetLoss(nn.Module):
    """``L = mean_i D(F̂_i, F)`` over the branches (feature-level, image+feature-level), so ``½(L_feat + L_img)``
    with both perturbations on.

    Args:
        distance: The anomaly-map distance of the model, which fixes ``D`` so that the map measures what the loss
            trains: ``"l2"`` → MSE (the paper's Eq. 8 pairs an L2 map with an MSE-trained decoder; minimising the
            MSE minimises the squared per-token L2 the map reads) or ``"cos"`` → ``1 − cos`` per token, averaged.
            A cosine loss with an L2 map leaves the reconstruction's length untrained, and the L2 map then measures
            an untrained length gap (issue #13: AUROC fell with training); that pair cannot be built.
    """

    def __init__(self, distance: str = "l2") -> None:
        super().__init__()
        if distance not in DISTANCES:
            msg = f"distance must be one of {DISTANCES}, got {distance!r}."
            raise ValueError(msg)
        self.distance = distance

    def per_pair(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``D(F̂, F)`` for ``(B, C, h, w)`` maps (channels on dim 1)."""
        if self.distance == "cos":
            return cosine_distance(reconstruction, target, per_token=True, dim=1)
        return mse_loss(reconstruction, target)

    def forward(self, target: torch.Tensor, reconstructions: Sequence[torch.Tensor]) -> torch.Tensor:
        """Average of :meth:`per_pair` over the reconstructions; the target carries no gradient."""
        if len(reconstructions) == 0:
            msg = "AGPNetLoss needs at least one reconstruction."
            raise ValueError(msg)
        target = target.detach()
        losses = [self.per_pair(r, target) for r in reconstructions]
        return torch.stack(losses).mean()
