"""AMI-Net training loss: direction + distance reconstruction terms and the mask generator's auxiliary term."""

from __future__ import annotations

import torch
from torch import nn

from anomalib_recon.components.losses import cosine_distance, mse_loss, pairwise_center_diversity

__all__ = ["AMINetLoss"]


class AMINetLoss(nn.Module):
    """``L = w_dir·L_dir + L_dis + L_aux`` over all tokens (masked or not).

    * ``L_dir = mean_i (1 − cos(F̂_i, T_i))`` on the patchified tokens (``p·p·C``-d vectors);
    * ``L_dis = mean((F̂ − T)²)``;
    * ``L_aux = mean_i s_i − w_div · mean_{k≠l} d(c_k, c_l)``: compact clusters, diverse centres,
      ``d(a, b) = ‖a − b‖ · (1 − cos(a, b))``.

    Args:
        direction_weight: ``w_dir`` (5).
        diversity_weight: ``w_div`` (0.1).
    """

    def __init__(self, direction_weight: float = 5.0, diversity_weight: float = 0.1) -> None:
        super().__init__()
        self.direction_weight = float(direction_weight)
        self.diversity_weight = float(diversity_weight)

    def forward(
        self,
        pred_tokens: torch.Tensor,
        target_tokens: torch.Tensor,
        token_scores: torch.Tensor,
        centers: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss", "direction", "distance", "compactness", "diversity"}`` (scalars).

        Args:
            pred_tokens: Inpainted tokens ``(B, N, p·p·C)``.
            target_tokens: Patchified frozen features, same shape.
            token_scores: ``s_i = min_k d(t_i, c_k)`` ``(B, N)``.
            centers: Cluster centres ``(B, K, D)``.
        """
        direction = cosine_distance(pred_tokens, target_tokens, per_token=True, dim=-1)
        distance = mse_loss(pred_tokens, target_tokens, check_finite=False)
        compactness = token_scores.mean()
        diversity = pairwise_center_diversity(centers)
        loss = self.direction_weight * direction + distance + compactness - self.diversity_weight * diversity
        return {
            "loss": loss,
            "direction": direction,
            "distance": distance,
            "compactness": compactness,
            "diversity": diversity,
        }
