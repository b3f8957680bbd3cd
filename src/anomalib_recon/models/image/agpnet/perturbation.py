"""AGPNet's perturbations: attention-guided feature noise and the image-level region noise.

All random functions take an optional ``torch.Generator`` so tests can be made deterministic; the generator must
live on the same device as the tensor being perturbed.
"""

from __future__ import annotations

import torch

__all__ = ["image_region_noise", "min_max_normalize", "top_fraction_mask", "weighted_noise"]


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_std(std: float, name: str) -> None:
    if isinstance(std, (int, float)) and std < 0:
        msg = f"{name}: std must be >= 0, got {std}."
        raise ValueError(msg)


def _expand_weight(weight: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast a (B, L) token weight or (B, H, W) pixel weight over the channel axis of ``target``."""
    if weight.dim() == target.dim() - 1:
        # tokens (B, L, C) take (B, L) -> (B, L, 1); maps (B, C, H, W) take (B, H, W) -> (B, 1, H, W)
        weight = weight.unsqueeze(-1) if target.dim() == 3 else weight.unsqueeze(1)
    try:
        torch.broadcast_shapes(weight.shape, target.shape)
    except RuntimeError:
        msg = (
            f"{name}: weight/mask of shape {tuple(weight.shape)} does not broadcast to {tuple(target.shape)}; "
            "use (B, L) or (B, L, 1) for tokens, (B, H, W) or (B, 1, H, W) for maps."
        )
        raise ValueError(msg) from None
    return weight.to(target.dtype)


def weighted_noise(
    features: torch.Tensor,
    weight_map: torch.Tensor,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """AGPNet attention-guided noise ``F + N(0, 1) · std ⊙ weight`` with the weight broadcast over channels.

    Args:
        features: ``(B, L, C)`` tokens or ``(B, C, H, W)`` maps.
        weight_map: Per-position noise amplitude, e.g. ``α(t)·Φ_norm(A_final) + β``: ``(B, L)`` / ``(B, H, W)`` or
            any shape broadcastable to ``features``.
        std: Global noise multiplier.
        generator: Optional random generator.
    """
    weight = _expand_weight(weight_map, features, "weighted_noise")
    return features + _randn_like(features, generator) * (weight * std)


def image_region_noise(
    image: torch.Tensor, binary_mask: torch.Tensor, std: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x + M ⊙ N(0, std²)``: Gaussian pixel noise inside a region (AGPNet image-level perturbation).

    ``binary_mask`` is ``(B, H, W)`` or ``(B, 1, H, W)`` and is broadcast over the colour channels.
    """
    _check_std(std, "image_region_noise")
    if image.dim() != 4:
        msg = f"image_region_noise expects a (B, C, H, W) image, got {tuple(image.shape)}."
        raise ValueError(msg)
    mask = _expand_weight(binary_mask, image, "image_region_noise")
    return image + mask * _randn_like(image, generator) * std


def min_max_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max scaling to [0, 1] over all non-batch axes (AGPNet ``Φ_norm``); constant maps become 0."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(dim=1).view(-1, *([1] * (x.dim() - 1)))
    hi = flat.amax(dim=1).view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo + eps)


def top_fraction_mask(scores: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """Bool mask of the top ``ratio`` fraction of positions per sample by ``scores`` (AGPNet image mask ``M_img``).

    Exactly ``round(ratio·N)`` positions per sample are True (ties broken by sort order). ``scores`` is
    ``(B, ...)``; the mask has the same shape.
    """
    ratio_t = torch.as_tensor(ratio, dtype=torch.float64, device=scores.device)
    if bool(((ratio_t < 0) | (ratio_t > 1)).any()):
        msg = "top_fraction_mask: ratio must lie in [0, 1]."
        raise ValueError(msg)
    flat = scores.reshape(scores.shape[0], -1)
    n = torch.round(ratio_t * flat.shape[1]).long().reshape(-1, 1)
    ranks = flat.argsort(dim=1, descending=True).argsort(dim=1)
    return (ranks < n).reshape(scores.shape)
