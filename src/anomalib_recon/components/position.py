"""Fixed 2-D sin-cos position embedding in the MAE form.

Used, not trained, by AMI-Net, GLCF, DADF, ST-MAE and PNPT. For a token at column ``x`` and row ``y`` of an
``h × w`` grid and ``D = embed_dim`` (divisible by 4), with ``ω_i = 1 / 10000^(i / (D/4))``, ``i = 0..D/4-1``:

    pos = [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]          (each block D/4 wide)

Tokens are in row-major order (index ``y·w + x``), as ``Conv2d`` patch embeddings flatten them. The values are
computed in float64 and cast, as MAE's numpy ``get_2d_sincos_pos_embed`` does.

timm's ``build_sincos2d_pos_embed(..., interleave_sin_cos=True)`` gives the same numbers with the two halves
swapped (row first) and computed in float32 (≈1e-6 apart), so it is not reused here; the tests pin both facts.
"""

from __future__ import annotations

import torch
from torch import nn


def _grid(grid_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(int(s) for s in grid_size)
    if len(size) != 2 or min(size) <= 0:
        msg = f"grid_size must be a positive int or (height, width), got {grid_size!r}."
        raise ValueError(msg)
    return size  # type: ignore[return-value]


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p·ω), cos(p·ω)]`` for 1-D positions ``(M,)`` → ``(M, embed_dim)`` in float64; ``embed_dim`` even."""
    if embed_dim <= 0 or embed_dim % 2 != 0:
        msg = f"sincos_1d needs a positive even embed_dim, got {embed_dim}."
        raise ValueError(msg)
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1, 1).to(torch.float64) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    num_prefix_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """MAE 2-D sin-cos position embedding of shape ``(num_prefix_tokens + h·w, embed_dim)``.

    Args:
        embed_dim: Token width ``D``; must be divisible by 4.
        grid_size: Token grid ``h`` (square) or ``(h, w)``.
        num_prefix_tokens: Leading all-zero rows for class/centre tokens (MAE's ``cls_token=True`` is 1).
        dtype: Output dtype (values are computed in float64).
    """
    if embed_dim <= 0 or embed_dim % 4 != 0:
        msg = f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}."
        raise ValueError(msg)
    if num_prefix_tokens < 0:
        msg = f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}."
        raise ValueError(msg)
    h, w = _grid(grid_size)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, xs), sincos_1d(embed_dim // 2, ys)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([emb.new_zeros(num_prefix_tokens, embed_dim), emb], dim=0)
    return emb.to(dtype)


class SinCosPositionEmbedding2D(nn.Module):
    """Adds the fixed :func:`get_2d_sincos_pos_embed` to ``(B, h·w, D)`` tokens.

    The table is a buffer (not a parameter), so it follows ``.to(device)`` and never trains; by default it is
    non-persistent (it is recomputed on construction and kept out of checkpoints).

    Args:
        embed_dim: Token width ``D`` (divisible by 4).
        grid_size: Token grid ``h`` or ``(h, w)``.
        persistent: Store the table in ``state_dict`` (MAE keeps it as a frozen parameter).
    """

    def __init__(self, embed_dim: int, grid_size: int | tuple[int, int], persistent: bool = False) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.grid_size = _grid(grid_size)
        self.register_buffer(
            "pos_embed", get_2d_sincos_pos_embed(embed_dim, self.grid_size).unsqueeze(0), persistent=persistent
        )

    @property
    def num_tokens(self) -> int:
        """Number of positions ``h·w``."""
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens + pos`` for ``tokens`` of shape ``(B, h·w, D)``."""
        if tokens.dim() != 3 or tokens.shape[1:] != self.pos_embed.shape[1:]:
            msg = (
                f"Position embedding for a {self.grid_size[0]}x{self.grid_size[1]} grid of {self.embed_dim}-d tokens "
                f"expects (B, {self.num_tokens}, {self.embed_dim}) tokens, got {tuple(tokens.shape)}."
            )
            raise ValueError(msg)
        return tokens + self.pos_embed.to(tokens.dtype)
