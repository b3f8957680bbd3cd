"""Anomaly maps from feature residuals, and image-score reducers (components.md C14).

:class:`AnomalyMapGenerator` turns (target, reconstruction) feature pairs into one ``(B, 1, H, W)`` map:
per-position distance per scale (:func:`distance_map`) → optional standardisation → bilinear upsampling →
combination over scales → optional Gaussian blur (anomalib's ``GaussianBlur2d``, :func:`make_blur`). The reducers
turn maps into ``(B,)`` image scores.

Everything here is export-friendly (``torch.onnx.export(..., dynamo=True)``, OpenVINO): no ``.item()``, no
data-dependent shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .preprocessing import as_image_size

DISTANCES = ("cos", "l2", "l2sq_mean", "l2sq_sum", "cos*l2sq")
COMBINES = ("mean", "sum", "prod")


def distance_map(target: torch.Tensor, recon: torch.Tensor, distance: str = "cos", eps: float = 1e-8) -> torch.Tensor:
    """Per-position distance over channels of two ``(B, C, H, W)`` maps → ``(B, 1, H, W)``.

    ``cos``: 1 − cos (INP-Former++, GLCF); ``l2``: ‖F − F̂‖₂ (AGPNet); ``l2sq_mean`` / ``l2sq_sum``: mean or sum
    of squared residuals (LGFDR, NAFRAD visualisation); ``cos*l2sq``: ``l2sq_mean · (1 − cos)`` (ST-MAE).
    """
    if distance not in DISTANCES:
        msg = f"distance must be one of {DISTANCES}, got {distance!r}."
        raise ValueError(msg)
    if target.shape != recon.shape or target.dim() != 4:
        msg = (
            "target and recon must be (B, C, H, W) maps of equal shape, "
            f"got {tuple(target.shape)} and {tuple(recon.shape)}."
        )
        raise ValueError(msg)
    if distance == "cos":
        return (1 - F.cosine_similarity(target, recon, dim=1, eps=eps)).unsqueeze(1)
    diff = target - recon
    if distance == "l2":
        return torch.linalg.vector_norm(diff, dim=1, keepdim=True)
    sq = diff.pow(2)
    if distance == "l2sq_sum":
        return sq.sum(dim=1, keepdim=True)
    l2sq = sq.mean(dim=1, keepdim=True)
    if distance == "l2sq_mean":
        return l2sq
    return l2sq * (1 - F.cosine_similarity(target, recon, dim=1, eps=eps)).unsqueeze(1)


def make_blur(sigma: float, kernel_size: int | None = None) -> nn.Module:
    """anomalib ``GaussianBlur2d`` for a one-channel map; kernel ``2·int(4σ + 0.5) + 1`` (scipy truncate=4) if unset."""
    from anomalib.models.components.filters import GaussianBlur2d  # heavy package import, deferred

    if sigma <= 0:
        msg = f"blur sigma must be > 0, got {sigma}."
        raise ValueError(msg)
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        msg = f"blur kernel size must be a positive odd int, got {kernel_size}."
        raise ValueError(msg)
    return GaussianBlur2d(sigma=float(sigma), channels=1, kernel_size=kernel_size)


def _apply_blur(blur: nn.Module, amap: torch.Tensor) -> torch.Tensor:
    pad = max(blur.height, blur.width) // 2
    if min(amap.shape[-2:]) <= pad:
        msg = (
            f"Gaussian kernel {blur.height}x{blur.width} needs a map larger than {pad} pixels for reflect padding, "
            f"got {tuple(amap.shape[-2:])}; set a smaller blur_kernel or a larger out_size."
        )
        raise ValueError(msg)
    return blur(amap)


def _combine(maps: list[torch.Tensor], combine: str | Sequence[float]) -> torch.Tensor:
    if isinstance(combine, str):
        if combine not in COMBINES:
            msg = f"combine must be one of {COMBINES} or a list of weights, got {combine!r}."
            raise ValueError(msg)
        stacked = torch.cat(maps, dim=1)
        if combine == "mean":
            return stacked.mean(dim=1, keepdim=True)
        if combine == "sum":
            return stacked.sum(dim=1, keepdim=True)
        return stacked.prod(dim=1, keepdim=True)
    weights = [float(w) for w in combine]
    if len(weights) != len(maps):
        msg = f"combine got {len(weights)} weights for {len(maps)} maps."
        raise ValueError(msg)
    out = maps[0] * weights[0]
    for m, w in zip(maps[1:], weights[1:], strict=True):
        out = out + m * w
    return out


def _residual_map(
    targets: Sequence[torch.Tensor],
    recons: Sequence[torch.Tensor],
    distance: str,
    out_size: int | tuple[int, int] | None,
    align_corners: bool,
    combine: str | Sequence[float],
    blur: nn.Module | None,
    scale_stats: Sequence[tuple[float, float]] | None,
    product_after_blur: bool,
) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        targets = [targets]
    if isinstance(recons, torch.Tensor):
        recons = [recons]
    if len(targets) == 0 or len(targets) != len(recons):
        msg = f"targets and recons must be equally long non-empty lists, got {len(targets)} and {len(recons)}."
        raise ValueError(msg)
    if scale_stats is not None and len(scale_stats) != len(targets):
        msg = f"scale_stats needs one (mean, std) per scale: {len(scale_stats)} given for {len(targets)} scales."
        raise ValueError(msg)
    if distance not in DISTANCES:
        msg = f"distance must be one of {DISTANCES}, got {distance!r}."
        raise ValueError(msg)
    size = (
        as_image_size(out_size)
        if out_size is not None
        else max((tuple(int(s) for s in t.shape[-2:]) for t in targets), key=lambda hw: hw[0] * hw[1])
    )

    factors = ("l2sq_mean", "cos") if (distance == "cos*l2sq" and product_after_blur) else (distance,)
    results = []
    for dist in factors:
        maps = []
        for i, (t, r) in enumerate(zip(targets, recons, strict=True)):
            m = distance_map(t, r, dist)
            if scale_stats is not None:
                mean, std = scale_stats[i]
                m = (m - float(mean)) / float(std)
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=align_corners)
            maps.append(m)
        amap = _combine(maps, combine)
        if blur is not None:
            amap = _apply_blur(blur, amap)
        results.append(amap)
    return results[0] if len(results) == 1 else results[0] * results[1]


class AnomalyMapGenerator(nn.Module):
    """Anomaly map ``(B, 1, H, W)`` from per-scale feature residuals; the Gaussian blur is a registered submodule.

    The blur kernel moves with the model and exports as a constant. ``forward(targets, recons, out_size=None)``
    lets the caller pass the image size at run time.

    Args:
        distance: One of :data:`DISTANCES` (see :func:`distance_map`).
        out_size: Output size (usually the input image size); ``None`` = the largest feature map.
        align_corners: Bilinear upsampling flag (True in AGPNet, AMI-Net, GLCF, INP-Former; False in NAFRAD).
        combine: ``"mean"``, ``"sum"``, ``"prod"`` or a list of per-scale weights (weighted sum).
        blur_sigma: Gaussian σ (e.g. 4); ``None`` = no blur.
        blur_kernel: Odd kernel size (INP-Former: 5); ``None`` = ``2·int(4σ+0.5)+1`` (33 for σ=4, AMI-Net).
        scale_stats: Optional per-scale ``(mean, std)`` fitted on normal images; maps become ``(m − mean)/std``.
        product_after_blur: For ``"cos*l2sq"`` only: upsample, combine and blur the squared-error and cosine maps
            separately and multiply at the end (AMI-Net) instead of multiplying per position first (ST-MAE).
    """

    def __init__(
        self,
        distance: str = "cos",
        out_size: int | tuple[int, int] | None = None,
        align_corners: bool = False,
        combine: str | Sequence[float] = "mean",
        blur_sigma: float | None = None,
        blur_kernel: int | None = None,
        scale_stats: Sequence[tuple[float, float]] | None = None,
        product_after_blur: bool = False,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            msg = f"distance must be one of {DISTANCES}, got {distance!r}."
            raise ValueError(msg)
        if isinstance(combine, str) and combine not in COMBINES:
            msg = f"combine must be one of {COMBINES} or a list of weights, got {combine!r}."
            raise ValueError(msg)
        self.distance = distance
        self.out_size = None if out_size is None else as_image_size(out_size)
        self.align_corners = align_corners
        self.combine = combine if isinstance(combine, str) else [float(w) for w in combine]
        self.scale_stats = None if scale_stats is None else [(float(m), float(s)) for m, s in scale_stats]
        self.product_after_blur = product_after_blur
        self.blur = make_blur(blur_sigma, blur_kernel) if blur_sigma is not None else None

    def forward(
        self,
        targets: Sequence[torch.Tensor],
        recons: Sequence[torch.Tensor],
        out_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map; ``out_size`` overrides the constructor's."""
        return _residual_map(
            targets,
            recons,
            self.distance,
            out_size if out_size is not None else self.out_size,
            self.align_corners,
            self.combine,
            self.blur,
            self.scale_stats,
            self.product_after_blur,
        )


def _flat(amap: torch.Tensor) -> torch.Tensor:
    if amap.dim() not in (3, 4):
        msg = f"expected an anomaly map (B, 1, H, W) or (B, H, W), got {tuple(amap.shape)}."
        raise ValueError(msg)
    return amap.flatten(1)


def reduce_max(amap: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the map, shape ``(B,)``."""
    return _flat(amap).amax(dim=1)


def reduce_max_avgpool(
    amap: torch.Tensor, kernel_size: int = 16, stride: int = 1, padding: int = 0, count_include_pad: bool = True
) -> torch.Tensor:
    """Image score = ``max(avg_pool2d(map, k, stride, padding))`` (NAFRAD k=32 pad 16; ADer/AGPNet k=16 pad 0).

    The ``k × k`` box filter runs as a ``k × 1`` then a ``1 × k`` filter: the same function (rectangular windows, so
    the divisor factorises for either ``count_include_pad``), but each output sums ``2k`` fp32 terms instead of
    ``k²``. PyTorch's CPU ``avg_pool2d`` adds a 32×32 window's 1024 terms one after another and lands up to 1e-6
    from float64 on maps near 0.5; anomalib's min-max normalisation divides that by the validation score range
    (about 3e-3 after a short fit), which broke ONNX/OpenVINO parity (≤ 1e-4). The separable form stays within
    about 1e-7 of float64 in torch, ONNX Runtime and OpenVINO.
    """
    if amap.dim() == 3:
        amap = amap.unsqueeze(1)
    if amap.dim() != 4:
        msg = f"expected an anomaly map (B, 1, H, W) or (B, H, W), got {tuple(amap.shape)}."
        raise ValueError(msg)
    if padding > kernel_size // 2:
        msg = f"padding ({padding}) must be at most half the kernel size ({kernel_size}) for avg_pool2d."
        raise ValueError(msg)
    h, w = amap.shape[-2:]
    if h + 2 * padding < kernel_size or w + 2 * padding < kernel_size:
        msg = f"kernel_size {kernel_size} is larger than the padded map {tuple(amap.shape[-2:])}."
        raise ValueError(msg)
    k, pad = int(kernel_size), int(padding)
    pooled = F.avg_pool2d(amap, (k, 1), stride=(stride, 1), padding=(pad, 0), count_include_pad=count_include_pad)
    pooled = F.avg_pool2d(pooled, (1, k), stride=(1, stride), padding=(0, pad), count_include_pad=count_include_pad)
    return pooled.flatten(1).amax(dim=1)


def reduce_std(amap: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Image score = standard deviation of the map (AMI-Net, GLCF); population std by default, like ``np.std``."""
    return _flat(amap).std(dim=1, correction=1 if unbiased else 0)
