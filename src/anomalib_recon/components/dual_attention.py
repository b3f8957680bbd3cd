"""The dual-attention transformer block of DADF (Yao et al., the authors' code GitHub hmyao22/DADF), also PNPT's SACE
encoder block (the same first author): one set of weights serves a patch stream and a memory (or prompt) stream, the
memory stream attending with the patch stream's keys."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn


class DualAttention(nn.Module):
    """Multi-head self-attention of the patch stream and "memorial" attention of the memory stream.

    One ``qkv`` and one ``proj`` serve both streams. For patch tokens ``X`` and memory tokens ``M`` (already
    normalised), per head with ``d = D / heads``::

        q1, k1, v1 = qkv(X);  q2, k2, v2 = qkv(M)
        X_att = proj(softmax(q1 k1ᵀ / √d) v1)
        M_att = proj(softmax(q2 k1ᵀ / √d) v2)          # keys from the patch tokens

    so each memory token is a mixture of memory values, weighted by how well its query matches the image's
    patches. ``k2`` is computed (one fused projection) but unused, as in the reference.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            msg = f"embed dim ({dim}) must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = weights @ v  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(X_att, M_att)``; ``M_att`` is ``None`` without a memory stream."""
        q1, k1, v1 = self._split(x)
        x_att = self._attend(q1, k1, v1)
        if memory is None:
            return x_att, None
        if memory.shape[1] != x.shape[1]:
            msg = f"memory and patch streams need the same length, got {memory.shape[1]} and {x.shape[1]}."
            raise ValueError(msg)
        q2, _, v2 = self._split(memory)
        return x_att, self._attend(q2, k1, v2)


class DualAttentionBlock(nn.Module):
    """Pre-norm dual-attention transformer block; all weights shared by the two streams (as the reference code).

    ``X = X + X_att; X = X + MLP(LN2(X))`` and the same for ``M`` with ``M_att``, where both attentions read
    ``LN1`` of the block's inputs (so the memory stream uses the keys of the *incoming* patch tokens).
    The paper's figure draws post-norm blocks; the code is pre-norm and is followed here.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DualAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update both streams ``(B, L, D)``; ``memory=None`` runs the self-attention stream only."""
        x_att, m_att = self.attn(self.norm1(x), None if memory is None else self.norm1(memory))
        x = x + x_att
        x = x + self.mlp(self.norm2(x))
        if memory is None or m_att is None:
            return x, None
        memory = memory + m_att
        memory = memory + self.mlp(self.norm2(memory))
        return x, memory
