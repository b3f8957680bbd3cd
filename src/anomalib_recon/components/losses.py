"""Loss library for feature-reconstruction models (components.md C13).

Conventions: feature maps are ``(B, C, H, W)`` with channels on ``dim=1``; pass ``dim=-1`` for ``(B, L, C)``
tokens. Segmentation losses take probabilities (after the sigmoid), not logits, as NAFRAD and DRAEM-style heads do.

Every loss validates its inputs: mismatched shapes and NaN/inf values raise ``ValueError`` (the finite check is
one cheap reduction and is skipped while tracing/exporting; pass ``check_finite=False`` to drop it in hot loops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .tracing import is_tracing as _tracing

_REDUCTIONS = ("mean", "sum", "none")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape:
        msg = f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; pass tensors of the same shape."
        raise ValueError(msg)


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    if _tracing():
        return
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            msg = f"{name}: input contains NaN or inf; check the features/predictions (e.g. lower the learning rate)."
            raise ValueError(msg)


def _check_probs(name: str, *tensors: torch.Tensor) -> None:
    if _tracing():
        return
    for t in tensors:
        if not bool(((t >= 0) & (t <= 1)).all()):  # False for NaN as well
            msg = f"{name}: expects probabilities and targets in [0, 1] without NaN; apply a sigmoid to logits."
            raise ValueError(msg)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
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
    _check_same_shape(a, b, "cosine_distance")
    if check_finite:
        _check_finite("cosine_distance", a, b)
    if per_token:
        dist = 1 - F.cosine_similarity(a, b, dim=dim, eps=eps)
    else:
        dist = 1 - F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1, eps=eps)
    return _reduce(dist, reduction)


def mse_loss(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean", check_finite: bool = True
) -> torch.Tensor:
    """Mean squared error with the library's input checks."""
    _check_same_shape(pred, target, "mse_loss")
    if check_finite:
        _check_finite("mse_loss", pred, target)
    return _reduce((pred - target) ** 2, reduction)


def mse_plus_cos(
    pred: torch.Tensor, target: torch.Tensor, lam: float = 5.0, dim: int = 1, check_finite: bool = True
) -> torch.Tensor:
    """``mean((pred − target)²) + lam · mean_positions(1 − cos)`` (ST-MAE/PSA; AMI-Net's ``L_dis + 5·L_dir``)."""
    _check_same_shape(pred, target, "mse_plus_cos")
    if check_finite:
        _check_finite("mse_plus_cos", pred, target)
    return mse_loss(pred, target, check_finite=False) + lam * cosine_distance(
        pred, target, per_token=True, dim=dim, check_finite=False
    )


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
    _check_same_shape(p, y, "focal_loss_on_probs")
    if gamma < 0:
        msg = f"focal_loss_on_probs: gamma must be >= 0, got {gamma}."
        raise ValueError(msg)
    if check_inputs:
        _check_probs("focal_loss_on_probs", p, y)
    y = y.to(p.dtype)
    p = p.clamp(eps, 1 - eps)
    bce = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
    p_t = p * y + (1 - p) * (1 - y)
    return _reduce(bce * (1 - p_t) ** gamma, reduction)


def l1_loss_on_probs(
    p: torch.Tensor, y: torch.Tensor, reduction: str = "mean", check_inputs: bool = True
) -> torch.Tensor:
    """Mean absolute error between a probability map and a binary mask (NAFRAD)."""
    _check_same_shape(p, y, "l1_loss_on_probs")
    if check_inputs:
        _check_probs("l1_loss_on_probs", p, y)
    return _reduce((p - y.to(p.dtype)).abs(), reduction)


def dice_loss(
    p: torch.Tensor, y: torch.Tensor, smooth: float = 1.0, reduction: str = "mean", check_inputs: bool = True
) -> torch.Tensor:
    """Soft Dice loss per sample, ``1 − (2·Σpy + s) / (Σp + Σy + s)``, then reduced over the batch.

    The smoothing ``s`` keeps the loss defined (0) for an empty mask predicted empty.
    """
    _check_same_shape(p, y, "dice_loss")
    if check_inputs:
        _check_probs("dice_loss", p, y)
    p_flat = p.reshape(p.shape[0], -1)
    y_flat = y.reshape(y.shape[0], -1).to(p.dtype)
    inter = (p_flat * y_flat).sum(1)
    dice = (2 * inter + smooth) / (p_flat.sum(1) + y_flat.sum(1) + smooth)
    return _reduce(1 - dice, reduction)


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
        _check_finite("pairwise_center_diversity", centers)
    k = centers.shape[-2]
    # only k < l: d is symmetric, and the zero diagonal would put sqrt(0) into the backward pass
    rows, cols = torch.triu_indices(k, k, offset=1, device=centers.device)
    return norm_cosine_distance(centers[..., rows, :], centers[..., cols, :]).mean()


def _scale_grad(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return grad * weights


def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _check_feature_lists(name: str, en: list[torch.Tensor], de: list[torch.Tensor]) -> None:
    if len(en) == 0 or len(en) != len(de):
        msg = f"{name}: need equally long non-empty feature lists, got {len(en)} and {len(de)}."
        raise ValueError(msg)
    for e, d in zip(en, de, strict=True):
        _check_same_shape(e, d, name)
        if e.dim() != 4:
            msg = f"{name}: expects (B, C, H, W) maps, got {tuple(e.shape)}; convert tokens with tokens_to_map."
            raise ValueError(msg)


def soft_mining_cosine(
    encoder_features: torch.Tensor | Sequence[torch.Tensor],
    decoder_features: torch.Tensor | Sequence[torch.Tensor],
    power: float = 3.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """INP-Former's soft-mining global cosine loss, reusing anomalib's ``GlobalCosineHmAdaptiveLoss``.

    Value: the global (per-sample flattened) cosine distance, averaged over layers. Gradient: the gradient reaching
    decoder position i is scaled by ``(d_i / mean d)^power`` with ``d_i`` the per-position cosine distance and the
    mean taken over the whole batch. Encoder features are detached.

    anomalib registers its hook on the tensor it receives, which would also re-weight gradients of any other loss
    on the same decoder features; we hand it a view so the re-weighting stays inside this term (INP-Former++ adds
    :func:`soft_mining_mse` on the same features).
    """
    en, de = _as_list(encoder_features), _as_list(decoder_features)
    _check_feature_lists("soft_mining_cosine", en, de)
    if check_finite:
        _check_finite("soft_mining_cosine", *en, *de)
    if not any(d.requires_grad for d in de):  # no graph (evaluation): same value without hooks
        dists = [cosine_distance(e, d, per_token=False, check_finite=False) for e, d in zip(en, de, strict=True)]
        return torch.stack(dists).mean()
    from anomalib.models.image.inp_former.components.loss import GlobalCosineHmAdaptiveLoss  # heavy import

    views = [d.view_as(d) for d in de]
    zero = torch.zeros((), device=de[0].device, dtype=de[0].dtype)
    return GlobalCosineHmAdaptiveLoss(power=power)(encoder_features=en, decoder_features=views, inp_loss=zero)


def soft_mining_mse(
    encoder_features: torch.Tensor | Sequence[torch.Tensor],
    decoder_features: torch.Tensor | Sequence[torch.Tensor],
    power: float = 3.0,
    eps: float = 1e-12,
    check_finite: bool = True,
) -> torch.Tensor:
    """MSE with soft-mining gradient re-weighting (INP-Former++'s added term).

    Value: ``MSE(decoder, encoder.detach())`` averaged over layers. Gradient: the gradient of decoder position i is
    scaled by ``(e_i / mean e)^power`` with ``e_i = mean_c (en − de)²`` (no grad) and the mean over the whole batch,
    matching the convention of anomalib's ``GlobalCosineHmAdaptiveLoss``. The hook sits on a view of the decoder
    features, so gradients from other losses on the same features are not re-weighted.

    Args:
        encoder_features, decoder_features: ``(B, C, H, W)`` maps or lists of them (one per layer group).
        power: Exponent γ (3 in INP-Former).
        eps: Floor of ``mean e`` (a perfect reconstruction yields zero weights instead of NaN).
        check_finite: Raise on NaN/inf inputs.
    """
    en, de = _as_list(encoder_features), _as_list(decoder_features)
    _check_feature_lists("soft_mining_mse", en, de)
    if check_finite:
        _check_finite("soft_mining_mse", *en, *de)
    losses = []
    for e, d in zip(en, de, strict=True):
        e = e.detach()
        if d.requires_grad:
            with torch.no_grad():
                point = ((e - d) ** 2).mean(dim=1, keepdim=True)
                weights = (point / point.mean().clamp_min(eps)) ** power
            d = d.view_as(d)
            d.register_hook(lambda grad, w=weights: _scale_grad(grad, w))
        losses.append(F.mse_loss(d, e))
    return torch.stack(losses).mean()
