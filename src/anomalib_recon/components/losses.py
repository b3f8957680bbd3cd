"""Loss library for feature-reconstruction models.

Conventions: feature maps are ``(B, C, H, W)`` with channels on ``dim=1``; pass ``dim=-1`` for ``(B, L, C)``
tokens. Segmentation losses take probabilities (after the sigmoid), not logits, as NAFRAD and DRAEM-style heads do.

Every loss validates its inputs: mismatched shapes and NaN/inf values raise ``ValueError`` (the finite check is
one cheap reduction and is skipped while tracing/exporting; pass ``check_finite=False`` to drop it in hot loops).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .guards import NonFiniteError
from .tracing import is_tracing as _tracing

_REDUCTIONS = ("mean", "sum", "none")


def require_same_shape(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Raise one ``ValueError`` naming the loss ``name`` when ``a`` and ``b`` differ in shape."""
    if a.shape != b.shape:
        msg = f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; pass tensors of the same shape."
        raise ValueError(msg)


def require_finite(name: str, *tensors: torch.Tensor) -> None:
    """Raise one :class:`NonFiniteError` (a ``ValueError``) when a floating-point input holds NaN/inf; skipped while
    tracing."""
    if _tracing():
        return
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            msg = f"{name}: input contains NaN or inf; check the features/predictions (e.g. lower the learning rate)."
            raise NonFiniteError(msg)


def require_probs(name: str, *tensors: torch.Tensor) -> None:
    """Raise one ``ValueError`` unless every value lies in [0, 1] (NaN fails too); skipped while tracing."""
    if _tracing():
        return
    for t in tensors:
        if not bool(((t >= 0) & (t <= 1)).all()):  # False for NaN as well
            msg = f"{name}: expects probabilities and targets in [0, 1] without NaN; apply a sigmoid to logits."
            raise ValueError(msg)


def reduce_loss(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"``, ``"sum"`` or ``"none"`` (unreduced) of a per-element loss."""
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    msg = f"reduction must be one of {_REDUCTIONS}, got {reduction!r}."
    raise ValueError(msg)


def cosine_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    per_token: bool = True,
    dim: int = 1,
    reduction: str = "mean",
    eps: float = 1e-8,
    check_finite: bool = True,
) -> torch.Tensor:
    """Cosine distance ``1 − cos`` between features.

    Args:
        a, b: Features of equal shape.
        per_token: ``True``: distance per position over the channel axis ``dim``, then averaged over positions and
            batch (AGPNet, AMI-Net ``L_dir``, ST-MAE). ``False``: each sample flattened to one vector, averaged over
            the batch (RD4AD/Dinomaly/INP-Former global loss).
        dim: Channel axis for ``per_token=True`` (1 for maps, -1 for tokens).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per position, or per sample when ``per_token=False``).
        eps: Norm floor of ``F.cosine_similarity``.
        check_finite: Raise on NaN/inf inputs.

    Returns:
        0 for identical features, 2 for opposite ones.
    """
    require_same_shape(a, b, "cosine_distance")
    if check_finite:
        require_finite("cosine_distance", a, b)
    if per_token:
        dist = 1 - F.cosine_similarity(a, b, dim=dim, eps=eps)
    else:
        dist = 1 - F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1, eps=eps)
    return reduce_loss(dist, reduction)


def mse_loss(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean", check_finite: bool = True
) -> torch.Tensor:
    """Mean squared error with the library's input checks."""
    require_same_shape(pred, target, "mse_loss")
    if check_finite:
        require_finite("mse_loss", pred, target)
    return reduce_loss((pred - target) ** 2, reduction)


def focal_loss_on_probs(
    p: torch.Tensor,
    y: torch.Tensor,
    gamma: float = 2.0,
    reduction: str = "mean",
    eps: float = 1e-6,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Binary focal loss on probabilities: ``BCE(p, y) · (1 − p_t)^γ`` with ``p_t = p·y + (1−p)·(1−y)``, no α.

    NAFRAD uses γ=4, INP-Former++'s segmentation head γ=2. With γ=0 it equals binary cross-entropy. ``p`` is
    clamped to ``[eps, 1 − eps]`` so the log never sees 0.
    """
    require_same_shape(p, y, "focal_loss_on_probs")
    if gamma < 0:
        msg = f"focal_loss_on_probs: gamma must be >= 0, got {gamma}."
        raise ValueError(msg)
    if check_inputs:
        require_probs("focal_loss_on_probs", p, y)
    y = y.to(p.dtype)
    p = p.clamp(eps, 1 - eps)
    bce = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
    p_t = p * y + (1 - p) * (1 - y)
    return reduce_loss(bce * (1 - p_t) ** gamma, reduction)


def dice_loss(
    p: torch.Tensor, y: torch.Tensor, smooth: float = 1.0, reduction: str = "mean", check_inputs: bool = True
) -> torch.Tensor:
    """Soft Dice loss per sample, ``1 − (2·Σpy + s) / (Σp + Σy + s)``, then reduced over the batch.

    The smoothing ``s`` keeps the loss defined (0) for an empty mask predicted empty.
    """
    require_same_shape(p, y, "dice_loss")
    if check_inputs:
        require_probs("dice_loss", p, y)
    p_flat = p.reshape(p.shape[0], -1)
    y_flat = y.reshape(y.shape[0], -1).to(p.dtype)
    inter = (p_flat * y_flat).sum(1)
    dice = (2 * inter + smooth) / (p_flat.sum(1) + y_flat.sum(1) + smooth)
    return reduce_loss(1 - dice, reduction)
