"""Multi-layer feature aggregation.

Feature-reconstruction models reconstruct a single target built from several backbone layers. The recipe is
always the same few steps, only the switches differ between methods:

1. optional per-position LayerNorm over channels without affine, at each map's own resolution
   (Swin stage norms in NAFRAD/LGFDR, layer-normed ViT tokens in AGPNet);
2. bilinear resize of every map to a common grid (``align_corners=True`` in NAFRAD and AMI-Net);
3. optional 3×3 average-pool smoothing, stride 1, padding 1, ``count_include_pad=True`` (AMI-Net, GRNR);
4. combine by channel concatenation (NAFRAD, AMI-Net, ST-MAE), sum (AGPNet) or mean (INP-Former++);
5. optionally prepend the resized raw image as extra channels (NAFRAD: 3 + 64 + 128 = 195 channels).

ViT backbones give token sequences; :func:`tokens_to_map` and :func:`map_to_tokens` convert between
``(B, L, C)`` and ``(B, C, h, w)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

_MODES = ("concat", "sum", "mean")


def _to_size(size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or (h, w) pair to a tuple of two positive ints."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        msg = f"size must be a positive int or a (height, width) pair, got {size}."
        raise ValueError(msg)
    return size  # type: ignore[return-value]


def tokens_to_map(tokens: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Reshape patch tokens ``(B, L, C)`` to a feature map ``(B, C, h, w)``.

    Args:
        tokens: Patch tokens without class/register tokens.
        size: Token grid ``(h, w)`` (an int means square). ``None`` assumes a square grid ``h = w = sqrt(L)``.

    Returns:
        The feature map, channels first.
    """
    if tokens.dim() != 3:
        msg = f"tokens_to_map expects (B, L, C) tokens, got shape {tuple(tokens.shape)}."
        raise ValueError(msg)
    batch, length, channels = tokens.shape
    if size is None:
        side = math.isqrt(length)
        if side * side != length:
            msg = f"{length} tokens do not form a square grid; pass size=(h, w) (and strip class/register tokens)."
            raise ValueError(msg)
        h, w = side, side
    else:
        h, w = _to_size(size)
        if h * w != length:
            msg = f"Grid {h}x{w} does not match {length} tokens."
            raise ValueError(msg)
    return tokens.transpose(1, 2).reshape(batch, channels, h, w)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """Flatten a feature map ``(B, C, H, W)`` to tokens ``(B, H·W, C)`` in row-major order."""
    if feature_map.dim() != 4:
        msg = f"map_to_tokens expects a (B, C, H, W) map, got shape {tuple(feature_map.shape)}."
        raise ValueError(msg)
    return feature_map.flatten(2).transpose(1, 2)


def layer_norm_channels(feature_map: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-position LayerNorm over the channels of a ``(B, C, H, W)`` map, without affine parameters.

    Equals ``F.layer_norm`` on the ``(B, H·W, C)`` tokens, i.e. the stage norm of a Swin/ViT whose weight is 1
    and bias 0.
    """
    return F.layer_norm(feature_map.permute(0, 2, 3, 1), feature_map.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def smooth_map(feature_map: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Local average smoothing: ``avg_pool2d(k, stride=1, padding=k // 2, count_include_pad=True)``.

    With the default k=3 this is AMI-Net's and GRNR's ``AvgPool2d(3, 1, 1)``; zero padding counts in the
    border average, as in ``torch.nn.AvgPool2d``'s default.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        msg = f"kernel_size must be a positive odd int to keep the map size, got {kernel_size}."
        raise ValueError(msg)
    return F.avg_pool2d(feature_map, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)


class FeatureAggregator(nn.Module):
    """Resize, optionally normalise/smooth, and combine multi-layer feature maps into one target map.

    Args:
        out_size: Common grid ``(H, W)`` (int = square). ``None`` uses the largest input map's size, or the
            smallest with ``grid="smallest"``.
        mode: ``"concat"`` (channel concatenation), ``"sum"`` or ``"mean"`` (element-wise; maps must have equal
            channel counts).
        align_corners: ``align_corners`` of the bilinear resize.
        smooth: Apply :func:`smooth_map` (3×3 average pool) to every resized map.
        layer_norm: Apply :func:`layer_norm_channels` to every map before resizing.
        include_image: Prepend the bilinearly resized raw image as extra channels (``"concat"`` only). The image
            is neither normalised nor smoothed.
        smooth_kernel: Kernel size of the smoothing pool.
        grid: With ``out_size=None``: ``"largest"`` (upsample to the finest map) or ``"smallest"`` (pool to the
            coarsest map, AGPNet's token grid).
        resize_mode: ``"bilinear"`` (``align_corners`` as set) or ``"area"`` (average pooling; for maps whose size
            is a multiple of the grid, the exact mean of each cell).
        norm_after_resize: Apply ``layer_norm`` on the common grid instead of at each map's own resolution
            (AGPNet normalises the pooled tokens).

    Example:
        >>> agg = FeatureAggregator(out_size=64, align_corners=True, smooth=True)   # AMI-Net
        >>> agg([torch.rand(1, 256, 64, 64), torch.rand(1, 512, 32, 32)]).shape
        torch.Size([1, 768, 64, 64])
        >>> agpnet = FeatureAggregator(grid="smallest", resize_mode="area", layer_norm=True, norm_after_resize=True)
    """

    def __init__(
        self,
        out_size: int | tuple[int, int] | None = None,
        mode: str = "concat",
        align_corners: bool = False,
        smooth: bool = False,
        layer_norm: bool = False,
        include_image: bool = False,
        smooth_kernel: int = 3,
        grid: str = "largest",
        resize_mode: str = "bilinear",
        norm_after_resize: bool = False,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            msg = f"mode must be one of {_MODES}, got {mode!r}."
            raise ValueError(msg)
        if include_image and mode != "concat":
            msg = "include_image=True prepends image channels and therefore needs mode='concat'."
            raise ValueError(msg)
        if smooth and (smooth_kernel < 1 or smooth_kernel % 2 == 0):
            msg = f"smooth_kernel must be a positive odd int, got {smooth_kernel}."
            raise ValueError(msg)
        if grid not in ("largest", "smallest") or resize_mode not in ("bilinear", "area"):
            msg = (
                f"grid must be 'largest' or 'smallest' and resize_mode 'bilinear' or 'area'; "
                f"got {grid!r}, {resize_mode!r}."
            )
            raise ValueError(msg)
        self.out_size = None if out_size is None else _to_size(out_size)
        self.grid = grid
        self.resize_mode = resize_mode
        self.norm_after_resize = norm_after_resize
        self.mode = mode
        self.align_corners = align_corners
        self.smooth = smooth
        self.layer_norm = layer_norm
        self.include_image = include_image
        self.smooth_kernel = smooth_kernel

    def output_channels(self, in_channels: Sequence[int], image_channels: int = 3) -> int:
        """Number of output channels for maps with ``in_channels`` (handy to size the next layer)."""
        if self.mode == "concat":
            return int(sum(in_channels)) + (image_channels if self.include_image else 0)
        return int(in_channels[0])

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if self.resize_mode == "area":
            return F.adaptive_avg_pool2d(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        """Aggregate ``features`` (each ``(B, C_i, H_i, W_i)``) into one ``(B, C_out, H, W)`` map.

        Args:
            features: Feature maps, shallow to deep.
            image: Raw image ``(B, 3, H_img, W_img)``; required when ``include_image=True``.
        """
        if isinstance(features, torch.Tensor) or len(features) == 0:
            msg = "features must be a non-empty list of (B, C, H, W) tensors."
            raise ValueError(msg)
        batch = features[0].shape[0]
        for i, f in enumerate(features):
            if f.dim() != 4:
                msg = (
                    f"features[{i}] has shape {tuple(f.shape)}; expected (B, C, H, W). "
                    "Convert ViT tokens with tokens_to_map first."
                )
                raise ValueError(msg)
            if f.shape[0] != batch:
                msg = f"features[{i}] has batch size {f.shape[0]}, expected {batch}."
                raise ValueError(msg)
        if self.mode != "concat":
            channels = [int(f.shape[1]) for f in features]
            if len(set(channels)) != 1:
                msg = f"mode={self.mode!r} needs equal channel counts, got {channels}; use mode='concat'."
                raise ValueError(msg)
        if self.include_image and image is None:
            msg = "include_image=True: pass the raw image, forward(features, image=image)."
            raise ValueError(msg)

        if self.out_size is not None:
            size = self.out_size
        else:
            pick = min if self.grid == "smallest" else max
            size = pick((tuple(int(s) for s in f.shape[-2:]) for f in features), key=lambda hw: hw[0] * hw[1])

        maps = []
        for f in features:
            x = layer_norm_channels(f) if self.layer_norm and not self.norm_after_resize else f
            x = self._resize(x, size)
            if self.layer_norm and self.norm_after_resize:
                x = layer_norm_channels(x)
            if self.smooth:
                x = smooth_map(x, self.smooth_kernel)
            maps.append(x)

        if self.mode == "concat":
            if self.include_image:
                maps.insert(0, self._resize(image.to(maps[0].dtype), size))
            return torch.cat(maps, dim=1)
        out = torch.stack(maps, dim=0).sum(dim=0)
        return out / len(maps) if self.mode == "mean" else out
