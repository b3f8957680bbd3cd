"""Patch embeddings of feature maps and the matching token → feature-map head.

* :class:`PatchEmbed`: one ``Conv2d(C, D, kernel=p, stride=p)`` → ``(B, L, D)`` tokens (AMI-Net: two of them,
  1792 → 768 with p = 4; ST-MAE adds a LayerNorm).
* :class:`MultiScalePatchEmbed`: one such conv per scale, patch sizes chosen so that every scale lands on the
  same token grid, fused by sum (GLCF) or concatenation (DADF, PNPT); :func:`one_grid_patch_sizes` chooses them
  (or checks the user's) from the feature-map sizes, with one error naming the input size.
* :func:`patchify` / :func:`unpatchify`: ``(B, C, h·p, w·p)`` ↔ ``(B, h·w, p·p·C)``; the default ``"pqc"`` layout
  is MAE's ``nchpwq -> nhwpqc`` (AMI-Net's ``n h w p q c``).
* :class:`TokenToFeatureHead`: ``Linear(D, p·p·C)`` + :func:`unpatchify` (AMI-Net's inpainting head).

Initialisation follows MAE/AMI-Net: conv weights xavier-uniform as if they were a ``Linear`` on the flattened
patch (bias left at PyTorch's default), linear heads xavier-uniform with zero bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

LAYOUTS = ("pqc", "cpq")
FUSES = ("sum", "concat")


def init_conv_as_linear(conv: nn.Conv2d) -> None:
    """Xavier-uniform on the conv weight viewed as ``(out, in·k·k)``, i.e. like ``nn.Linear`` (MAE)."""
    weight = conv.weight.data
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        msg = f"layout must be one of {LAYOUTS}, got {layout!r}."
        raise ValueError(msg)


def _grid(grid_size: int | Sequence[int] | None, num_tokens: int) -> tuple[int, int]:
    if grid_size is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            msg = f"{num_tokens} tokens do not form a square grid; pass grid_size=(h, w)."
            raise ValueError(msg)
        return side, side
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))
    if h * w != num_tokens:
        msg = f"grid_size {h}x{w} does not match {num_tokens} tokens."
        raise ValueError(msg)
    return h, w


def patchify(feature_map: torch.Tensor, patch_size: int, layout: str = "pqc") -> torch.Tensor:
    """Cut ``(B, C, H, W)`` into non-overlapping ``p × p`` patches → ``(B, (H/p)·(W/p), p·p·C)``, row-major.

    ``layout="pqc"``: each token vector is ordered (row in patch, column in patch, channel), MAE/AMI-Net.
    ``layout="cpq"``: (channel, row, column), the order a ``Conv2d`` weight sees.
    """
    _check_layout(layout)
    if feature_map.dim() != 4:
        msg = f"patchify expects a (B, C, H, W) map, got {tuple(feature_map.shape)}."
        raise ValueError(msg)
    b, c, H, W = feature_map.shape
    if H % patch_size or W % patch_size:
        msg = f"patchify: map size {H}x{W} is not divisible by patch_size {patch_size}."
        raise ValueError(msg)
    h, w = H // patch_size, W // patch_size
    x = feature_map.reshape(b, c, h, patch_size, w, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1) if layout == "pqc" else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h * w, patch_size * patch_size * c)


def unpatchify(
    tokens: torch.Tensor,
    patch_size: int,
    channels: int,
    grid_size: int | Sequence[int] | None = None,
    layout: str = "pqc",
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, h·w, p·p·C)`` → ``(B, C, h·p, w·p)``; ``grid_size=None`` means square."""
    _check_layout(layout)
    if tokens.dim() != 3 or tokens.shape[-1] != patch_size * patch_size * channels:
        msg = (
            f"unpatchify expects (B, L, {patch_size}*{patch_size}*{channels}={patch_size * patch_size * channels}) "
            f"tokens, got {tuple(tokens.shape)}."
        )
        raise ValueError(msg)
    b, n, _ = tokens.shape
    h, w = _grid(grid_size, n)
    p = patch_size
    if layout == "pqc":
        x = tokens.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    else:
        x = tokens.reshape(b, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h * p, w * p)


class PatchEmbed(nn.Module):
    """Single-scale patch embedding of a feature map: ``Conv2d(C, D, p, stride=p)`` → ``(B, L, D)`` tokens.

    Args:
        in_channels: Channels ``C`` of the input map.
        embed_dim: Token width ``D``.
        patch_size: Kernel = stride ``p``; the map size must be divisible by it.
        norm: Apply a LayerNorm to the tokens (ST-MAE).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, norm: bool = False) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("embed_dim", embed_dim), ("patch_size", patch_size)):
            if int(value) <= 0:
                msg = f"PatchEmbed: {name} must be a positive int, got {value}."
                raise ValueError(msg)
        self.in_channels = int(in_channels)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        init_conv_as_linear(self.proj)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for a ``height × width`` map (raises if not divisible by the patch size)."""
        if height % self.patch_size or width % self.patch_size:
            msg = (
                f"PatchEmbed: feature map {height}x{width} is not divisible by patch_size {self.patch_size}; "
                f"choose an input size whose feature map is a multiple of {self.patch_size}."
            )
            raise ValueError(msg)
        return height // self.patch_size, width // self.patch_size

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, (H/p)·(W/p), D)``."""
        if feature_map.dim() != 4 or feature_map.shape[1] != self.in_channels:
            msg = f"PatchEmbed expects a (B, {self.in_channels}, H, W) map, got {tuple(feature_map.shape)}."
            raise ValueError(msg)
        self.grid_size(int(feature_map.shape[-2]), int(feature_map.shape[-1]))
        return self.norm(self.proj(feature_map).flatten(2).transpose(1, 2))


def one_grid_patch_sizes(
    feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], patch_sizes: Sequence[int] | None = None
) -> tuple[list[int], tuple[int, int]]:
    """Per-scale patch sizes that cut every feature map into one token grid, and that grid ``(h, w)``.

    Args:
        feature_sizes: ``(H_s, W_s)`` of each scale's map, shallow to deep.
        image_size: The input size that gave them (named in the error).
        patch_sizes: ``None``: each map's size over the deepest map's (``(4, 2, 1)`` at strides 4, 8, 16); else
            one positive int per scale, checked.

    Raises:
        ValueError: Patch sizes that are not one per scale and positive, or that give more than one grid (an input
            size the strides do not divide: the message names the maps and asks for a multiple of 16).
    """
    sizes = [(int(a), int(b)) for a, b in feature_sizes]
    if patch_sizes is None:
        deep_h, deep_w = sizes[-1]
        patch_sizes = [a // deep_h for a, _ in sizes]
        ok = all(a == p * deep_h and b == p * deep_w for (a, b), p in zip(sizes, patch_sizes, strict=True))
    else:
        patch_sizes = [int(p) for p in patch_sizes]
        if len(patch_sizes) != len(sizes) or min(patch_sizes) < 1:
            msg = f"patch_sizes must be {len(sizes)} positive ints (one per scale), got {patch_sizes}."
            raise ValueError(msg)
        grids = {(a // p, b // p) for (a, b), p in zip(sizes, patch_sizes, strict=True)}
        ok = len(grids) == 1 and all(a % p == 0 and b % p == 0 for (a, b), p in zip(sizes, patch_sizes, strict=True))
    if not ok:
        described = ", ".join(f"{a}x{b}" for a, b in sizes)
        msg = (
            f"image_size {image_size[0]}x{image_size[1]} gives feature maps {described}, which patch sizes "
            f"{patch_sizes} do not cut into one token grid. Use an input size that is a multiple of 16 (e.g. 64, "
            "128, 256)."
        )
        raise ValueError(msg)
    return list(patch_sizes), (sizes[0][0] // patch_sizes[0], sizes[0][1] // patch_sizes[0])


class MultiScalePatchEmbed(nn.Module):
    """Hierarchical patch embedding ("HPE"): one :class:`PatchEmbed` per scale onto one shared token grid.

    Args:
        in_channels: Channels of each scale's map, shallow to deep.
        patch_sizes: Patch size per scale, e.g. ``(4, 2, 1)`` for maps at strides 4, 8, 16 (16×16 tokens from
            a 256 input).
        embed_dim: Token width of each scale.
        fuse: ``"sum"`` (output width ``embed_dim``, GLCF) or ``"concat"`` (``len(scales)·embed_dim``, DADF).
        norm: LayerNorm on each scale's tokens.

    Attributes:
        out_dim: Width of the fused tokens.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        patch_sizes: Sequence[int],
        embed_dim: int,
        fuse: str = "sum",
        norm: bool = False,
    ) -> None:
        super().__init__()
        if fuse not in FUSES:
            msg = f"fuse must be one of {FUSES}, got {fuse!r}."
            raise ValueError(msg)
        if len(in_channels) == 0 or len(in_channels) != len(patch_sizes):
            msg = (
                "MultiScalePatchEmbed needs one patch size per scale, got "
                f"{len(in_channels)} channel counts and {len(patch_sizes)} patch sizes."
            )
            raise ValueError(msg)
        self.fuse = fuse
        self.patch_sizes = [int(p) for p in patch_sizes]
        self.embeds = nn.ModuleList(
            PatchEmbed(c, embed_dim, p, norm=norm) for c, p in zip(in_channels, patch_sizes, strict=True)
        )
        self.out_dim = embed_dim * (len(self.embeds) if fuse == "concat" else 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale maps ``(B, C_s, H_s, W_s)`` → fused tokens ``(B, L, out_dim)``."""
        if isinstance(features, torch.Tensor) or len(features) != len(self.embeds):
            msg = f"MultiScalePatchEmbed expects a list of {len(self.embeds)} feature maps."
            raise ValueError(msg)
        grids = [
            embed.grid_size(int(f.shape[-2]), int(f.shape[-1])) for embed, f in zip(self.embeds, features, strict=True)
        ]
        if len(set(grids)) != 1:
            msg = (
                f"Scales land on different token grids {grids} with patch sizes {self.patch_sizes}; "
                "choose patch sizes proportional to each map's size."
            )
            raise ValueError(msg)
        tokens = [embed(f) for embed, f in zip(self.embeds, features, strict=True)]
        if self.fuse == "concat":
            return torch.cat(tokens, dim=-1)
        return torch.stack(tokens, dim=0).sum(dim=0)


class TokenToFeatureHead(nn.Module):
    """``Linear(D, p·p·C)`` per token followed by :func:`unpatchify` to a ``(B, C, h·p, w·p)`` map.

    ``project`` gives the per-token vectors (compare them with :func:`patchify` of the target), ``forward`` the
    map. Xavier-uniform weight, zero bias.
    """

    def __init__(self, embed_dim: int, out_channels: int, patch_size: int, layout: str = "pqc") -> None:
        super().__init__()
        _check_layout(layout)
        self.out_channels = int(out_channels)
        self.patch_size = int(patch_size)
        self.layout = layout
        self.linear = nn.Linear(embed_dim, patch_size * patch_size * out_channels)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` → ``(B, L, p·p·C)``."""
        return self.linear(tokens)

    def to_map(self, projected: torch.Tensor, grid_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """Unpatchify projected tokens ``(B, L, p·p·C)`` to ``(B, C, h·p, w·p)``."""
        return unpatchify(projected, self.patch_size, self.out_channels, grid_size, self.layout)

    def forward(self, tokens: torch.Tensor, grid_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """``(B, L, D)`` tokens on an ``h × w`` grid → ``(B, C, h·p, w·p)`` map."""
        return self.to_map(self.project(tokens), grid_size)
