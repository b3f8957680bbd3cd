"""AMI-Net training loss: direction + distance reconstruction terms and the mask generator's auxiliary term."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.losses import cosine_distance, mse_loss, require_finite

__all__ = ["AMINetLoss", "norm_cosine_distance", "pairwise_center_diversity"]


def norm_cosine_distance(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """AMI-Net's distance ``d(a, b) = ‖a − b‖₂ · (1 − cos(a, b))`` along ``dim`` (broadcasting allowed)."""
    return torch.linalg.vector_norm(a - b, dim=dim) * (1 - F.cosine_similarity(a, b, dim=dim, eps=eps))


def pairwise_center_diversity(centers: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """Mean of ``d(c_k, c_l)`` over all pairs ``k ≠ l`` with ``d = ‖a−b‖₂·(1−cos)`` (AMI-Net ``L_aux``, weight −0.1).

    Args:
        centers: ``(K, D)`` or batched ``(B, K, D)`` cluster centres, ``K >= 2``. Batched input is averaged over B.
    """
    if centers.dim() not in (2, 3) or centers.shape[-2] < 2:
        msg = f"pairwise_center_diversity expects (K, D) or (B, K, D) with K >= 2, got {tuple(centers.shape)}."
        raise ValueError(msg)
    if check_finite:
        require_finite("pairwise_center_diversity", centers)
    k = centers.shape[-2]
    # only k < l: d is symmetric, and the zero diagonal would put sqrt(0) into the backward pass
    rows, cols = torch.triu_indices(k, k, offset=1, device=centers.device)
    return norm_cosine_distance(centers[..., rows, :], centers[..., cols, :]).mean()


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
