"""LGFDR training loss: reconstruct the *clean* features from the noisy ones, ``MSE(R, F) + λ·(MSE(R_l, F) +
MSE(R_g, F))``.

The fused term trains the SRH and both towers through it; the per-tower terms (deep supervision, **INFERRED**,
λ = ``tower_loss_weight`` = 1) keep each tower a reconstruction of ``F`` on its own, so that the gate chooses between
two reconstructions rather than two halves of one. With a single tower (the ablations) the loss is ``MSE(R, F)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from anomalib_recon.components.losses import mse_loss


class LGFDRLoss(nn.Module):
    """``MSE(R, F) + λ·(MSE(R_l, F) + MSE(R_g, F))`` (the tower terms only when both towers exist).

    Args:
        tower_loss_weight: λ (1); 0 = the fused term alone.
    """

    def __init__(self, tower_loss_weight: float = 1.0) -> None:
        super().__init__()
        if isinstance(tower_loss_weight, bool) or not isinstance(tower_loss_weight, int | float):
            tower_loss_weight = float("nan")
        if not math.isfinite(tower_loss_weight) or tower_loss_weight < 0:
            msg = f"LGFDR: tower_loss_weight must be a finite number >= 0, got {tower_loss_weight!r}."
            raise ValueError(msg)
        self.tower_loss_weight = float(tower_loss_weight)

    def forward(
        self,
        reconstruction: torch.Tensor,
        features: torch.Tensor,
        local: torch.Tensor | None = None,
        global_: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "fused", "local", "global"}``; the tower entries are 0 when that tower's term is absent.

        Args:
            reconstruction: ``R`` ``(B, C, h, w)``.
            features: The clean target ``F`` (never the noisy input).
            local: ``R_l`` (``None`` without the local tower).
            global_: ``R_g`` (``None`` without the global tower).
        """
        fused = mse_loss(reconstruction, features)
        zero = fused.new_zeros(())
        both = local is not None and global_ is not None
        local_term = mse_loss(local, features) if both else zero
        global_term = mse_loss(global_, features) if both else zero
        loss = fused + self.tower_loss_weight * (local_term + global_term) if both else fused
        return {"loss": loss, "fused": fused, "local": local_term, "global": global_term}
