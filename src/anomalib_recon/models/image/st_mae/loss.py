"""ST-MAE training loss: squared error plus weighted per-token cosine distance between Ψ̂ and Ψ."""

from __future__ import annotations

import torch
from torch import nn

from anomalib_recon.components.losses import cosine_distance, mse_loss

__all__ = ["STMAELoss"]


class STMAELoss(nn.Module):
    """``L = mean((Ψ̂ − Ψ)²) + w_dir · mean_tokens (1 − cos(Ψ̂_i, Ψ_i))`` over every token.

    Tokens are the patchified fused features (``p·p·C``-d vectors); the cosine is taken per token, as in the authors'
    code (hmyao22/PSA ``forward_loss``), not over the whole flattened map. Every token is reconstructed in each
    forward pass (from the other subset's encoding), so every token is in the loss.

    Args:
        direction_weight: ``w_dir`` (5).
    """

    def __init__(self, direction_weight: float = 5.0) -> None:
        super().__init__()
        self.direction_weight = float(direction_weight)

    def forward(self, pred_tokens: torch.Tensor, target_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"loss", "distance", "direction"}`` (scalars) for ``(B, L, p·p·C)`` predictions and targets."""
        distance = mse_loss(pred_tokens, target_tokens, check_finite=False)  # ModelGuard names a NaN loss's cause
        direction = cosine_distance(pred_tokens, target_tokens, per_token=True, dim=-1, check_finite=False)
        return {
            "loss": distance + self.direction_weight * direction,
            "distance": distance,
            "direction": direction,
        }
