"""Feature/image perturbations and token masking used during training (components.md C8, C9).

All random functions take an optional ``torch.Generator`` so tests and evaluation can be made deterministic; the
generator must live on the same device as the tensor being perturbed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_std(std: float, name: str) -> None:
    if isinstance(std, (int, float)) and std < 0:
        msg = f"{name}: std must be >= 0, got {std}."
        raise ValueError(msg)


def gaussian_feature_noise(
    features: torch.Tensor, std: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``F + N(0, std²)`` element-wise (LGFDR); ``std`` may be a tensor broadcastable to ``features``."""
    _check_std(std, "gaussian_feature_noise")
    return features + _randn_like(features, generator) * std


def norm_scaled_jitter(
    tokens: torch.Tensor, scale: float = 20.0, prob: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """UniAD/AMI-Net feature jitter: ``tok + N(0,1) · ‖tok‖₂ / D · scale`` per token.

    Args:
        tokens: ``(..., D)`` tokens, the last axis is the embedding (AMI-Net: ``(B, 256, 768)``, scale 20).
        scale: Jitter scale.
        prob: Probability that a sample (first axis) is jittered, drawn per sample; 1.0 always jitters.
        generator: Optional random generator.
    """
    if not 0 <= prob <= 1:
        msg = f"norm_scaled_jitter: prob must be in [0, 1], got {prob}."
        raise ValueError(msg)
    if tokens.dim() < 2:
        msg = f"norm_scaled_jitter expects (..., D) tokens with a batch axis, got {tuple(tokens.shape)}."
        raise ValueError(msg)
    norms = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True) / tokens.shape[-1]
    jitter = _randn_like(tokens, generator) * norms * scale
    if prob < 1:
        keep = torch.rand(tokens.shape[0], generator=generator, device=tokens.device) < prob
        jitter = jitter * keep.view(-1, *([1] * (tokens.dim() - 1))).to(tokens.dtype)
    return tokens + jitter


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


def token_mask(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace masked tokens by a (learnable) mask token (AMI-Net inpainting branch).

    Args:
        tokens: ``(B, L, D)``.
        mask: ``(B, L)`` bool, True = replace.
        mask_token: ``(D,)``, ``(1, D)`` or ``(1, 1, D)``; gradients flow into it from masked positions.
    """
    if tokens.dim() != 3 or mask.shape != tokens.shape[:2]:
        msg = f"token_mask expects tokens (B, L, D) and mask (B, L), got {tuple(tokens.shape)} and {tuple(mask.shape)}."
        raise ValueError(msg)
    if mask_token.numel() != tokens.shape[-1]:
        msg = f"mask_token has {mask_token.numel()} elements, expected D={tokens.shape[-1]}."
        raise ValueError(msg)
    return torch.where(mask.bool().unsqueeze(-1), mask_token.reshape(1, 1, -1).to(tokens.dtype), tokens)


def random_token_mask(
    batch_size: int,
    num_tokens: int,
    ratio: float | torch.Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    rounding: str = "round",
) -> torch.Tensor:
    """Bool mask ``(B, L)`` with exactly ``n = round(ratio·L)`` (or ``floor``) uniformly chosen True per sample.

    Args:
        batch_size, num_tokens: ``B`` and ``L``.
        ratio: Masking ratio in [0, 1]: a float, or a ``(B,)`` tensor of per-sample ratios (AMI-Net draws
            ``r ~ U(0, 1)`` per sample and masks ``floor(L·r)`` tokens: use ``rounding="floor"``).
        generator: Optional random generator (on ``device``).
        device: Device of the mask.
        rounding: ``"round"`` or ``"floor"`` for ``ratio·L``.
    """
    if rounding not in ("round", "floor"):
        msg = f"rounding must be 'round' or 'floor', got {rounding!r}."
        raise ValueError(msg)
    if device is None and isinstance(ratio, torch.Tensor):
        device = ratio.device
    ratio_t = torch.as_tensor(ratio, dtype=torch.float64, device=device)
    if ratio_t.dim() > 1 or (ratio_t.dim() == 1 and ratio_t.shape[0] != batch_size):
        msg = f"ratio must be a float or a ({batch_size},) tensor, got shape {tuple(ratio_t.shape)}."
        raise ValueError(msg)
    if bool(((ratio_t < 0) | (ratio_t > 1)).any()):
        msg = "ratio must lie in [0, 1]."
        raise ValueError(msg)
    scaled = ratio_t * num_tokens
    n_masked = (torch.round(scaled) if rounding == "round" else torch.floor(scaled)).long()
    n_masked = n_masked.reshape(-1, 1).expand(batch_size, 1)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order
    return ranks < n_masked


def random_partition(
    batch_size: int,
    num_tokens: int,
    n_subsets: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random disjoint partition of ``L`` token positions into ``n_subsets`` equal subsets, per sample (ST-MAE).

    Returns:
        ``(subsets, inverse)``: ``subsets[s]`` is a ``(B, L / n)`` long tensor of positions; concatenating the
        subsets gives a permutation ``perm`` of ``0..L-1`` and ``inverse`` (``(B, L)``) undoes it, so
        :func:`restore_order` of the concatenated gathered tokens is the original sequence.
    """
    if n_subsets < 1 or num_tokens % n_subsets != 0:
        msg = f"num_tokens ({num_tokens}) must be divisible by n_subsets ({n_subsets})."
        raise ValueError(msg)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    perm = noise.argsort(dim=1)
    inverse = perm.argsort(dim=1)
    return list(perm.chunk(n_subsets, dim=1)), inverse


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select tokens ``(B, L, D)`` at positions ``index`` ``(B, K)`` → ``(B, K, D)``."""
    if tokens.dim() != 3 or index.dim() != 2 or index.shape[0] != tokens.shape[0]:
        msg = (
            f"gather_tokens expects tokens (B, L, D) and index (B, K), got {tuple(tokens.shape)}, {tuple(index.shape)}"
        )
        raise ValueError(msg)
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(
    parts: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], num_tokens: int, fill: float = 0.0
) -> torch.Tensor:
    """Put token groups back at their positions: ``out[b, indices[s][b, j]] = parts[s][b, j]``.

    Positions not covered by any index keep ``fill``; with a full partition every position is covered and
    ``scatter_tokens([gather_tokens(x, i) for i in subsets], subsets, L) == x``.
    """
    if len(parts) == 0 or len(parts) != len(indices):
        msg = f"scatter_tokens needs one index tensor per part, got {len(parts)} parts and {len(indices)} indices."
        raise ValueError(msg)
    first = parts[0]
    out = first.new_full((first.shape[0], num_tokens, first.shape[-1]), fill)
    for p, idx in zip(parts, indices, strict=True):
        if p.shape[:2] != idx.shape:
            msg = f"part of shape {tuple(p.shape)} does not match index of shape {tuple(idx.shape)}."
            raise ValueError(msg)
        out = out.scatter(1, idx.unsqueeze(-1).expand(-1, -1, p.shape[-1]), p)
    return out


def restore_order(tokens: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo a permutation: tokens in ``perm`` order ``(B, L, D)`` back to the original order via ``inverse``."""
    return gather_tokens(tokens, inverse)


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
