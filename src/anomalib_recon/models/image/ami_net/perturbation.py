"""AMI-Net's token perturbations: feature jitter, the random masking ratio and the mask-token swap."""

from __future__ import annotations

import torch

__all__ = ["norm_scaled_jitter", "random_token_mask", "token_mask"]


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
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    jitter = noise * norms * scale
    if prob < 1:
        keep = torch.rand(tokens.shape[0], generator=generator, device=tokens.device) < prob
        jitter = jitter * keep.view(-1, *([1] * (tokens.dim() - 1))).to(tokens.dtype)
    return tokens + jitter


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
