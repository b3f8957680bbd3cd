"""Anomaly maps from feature residuals, and image-score reducers.

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


def blur_kernel_size(sigma: float, kernel_size: int | None = None) -> int:
    """Side of the Gaussian kernel :func:`make_blur` builds: ``kernel_size``, or ``2·int(4σ + 0.5) + 1`` if unset."""
    return int(kernel_size) if kernel_size is not None else 2 * int(4.0 * float(sigma) + 0.5) + 1


def make_blur(sigma: float, kernel_size: int | None = None) -> nn.Module:
    """anomalib ``GaussianBlur2d`` for a one-channel map; kernel ``2·int(4σ + 0.5) + 1`` (scipy truncate=4) if unset."""
    from anomalib.models.components.filters import GaussianBlur2d  # heavy package import, deferred

    if sigma <= 0:
        msg = f"blur sigma must be > 0, got {sigma}."
        raise ValueError(msg)
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        msg = f"blur kernel size must be a positive odd int, got {kernel_size}."
        raise ValueError(msg)
    module = GaussianBlur2d(sigma=float(sigma), channels=1, kernel_size=kernel_size)
    module.recon_blur_sigma = float(sigma)  # for the message of a map too small for the kernel
    module.recon_blur_kernel = kernel_size
    return module


def _blur_too_large(
    sigma: float | None,
    kernel: int,
    kernel_given: bool,
    map_hw: tuple[int, int],
    owner: str,
    map_what: str,
    allow_off: bool,
) -> str:
    """The message for a map too small for the blur's reflect padding, in the arguments models take.

    ``map_what`` follows the map's size in the message (e.g. ``" (image_size=16)"``); ``allow_off`` adds the
    ``blur_sigma=None`` way out (for models whose blur can be switched off).
    """
    pad = kernel // 2
    sigma_text = f"blur_sigma={sigma:g}" if sigma is not None else "the blur"
    # a kernel that follows sigma fits when int(4σ + 0.5) < min side, i.e. σ < (min side - 0.5) / 4
    smaller = "a smaller blur_kernel" if kernel_given else f"blur_sigma < {(min(map_hw) - 0.5) / 4:g}"
    prefix = f"{owner}: " if owner else ""
    off = " (or blur_sigma=None for no blur)" if allow_off else ""
    return (
        f"{prefix}{sigma_text} blurs the anomaly map with a {kernel}x{kernel} Gaussian kernel, whose reflect "
        f"padding needs a map of at least {pad + 1}x{pad + 1} px, but the anomaly map is {map_hw[0]}x{map_hw[1]}"
        f"{map_what}. Use an image_size of at least {pad + 1}x{pad + 1} or {smaller}{off}."
    )


def check_blur_fits(
    blur_sigma: float | None,
    blur_kernel: int | None,
    map_size: int | Sequence[int],
    owner: str = "",
    *,
    allow_off: bool = True,
) -> None:
    """Raise, at a model's construction, when its Gaussian blur cannot run on a map of ``map_size``.

    The blur pads by reflection, which needs ``min(H, W) > kernel // 2``; without this check the first forward
    fails with a message about padding. Models call it with their own ``blur_sigma`` (``None``/0 = no blur: nothing
    to check), ``blur_kernel`` (``None`` = ``2·int(4σ + 0.5) + 1``) and the size of the map they blur (their
    ``image_size`` when the map is upsampled to the input).

    Args:
        blur_sigma: The model's ``blur_sigma``; ``None`` or 0 = no blur.
        blur_kernel: The model's kernel size, or ``None`` when it follows ``blur_sigma``.
        map_size: ``(H, W)`` (or one int) of the map the blur runs on.
        owner: Model name put at the start of the message, e.g. ``"AGPNet"``.
        allow_off: Also suggest ``blur_sigma=None`` (pass ``False`` for a model whose blur cannot be turned off).

    Raises:
        ValueError: One message naming ``blur_sigma``, ``image_size`` and the smallest ``image_size`` that works.
    """
    if not blur_sigma:
        return
    map_hw = as_image_size(map_size)
    kernel = blur_kernel_size(blur_sigma, blur_kernel)
    if min(map_hw) <= kernel // 2:
        raise ValueError(
            _blur_too_large(
                float(blur_sigma),
                kernel,
                blur_kernel is not None,
                map_hw,
                owner,
                f" (image_size={map_size})",
                allow_off,
            )
        )


def _apply_blur(blur: nn.Module, amap: torch.Tensor) -> torch.Tensor:
    kernel = max(blur.height, blur.width)
    map_hw = (int(amap.shape[-2]), int(amap.shape[-1]))
    if min(map_hw) <= kernel // 2:
        sigma = getattr(blur, "recon_blur_sigma", None)
        kernel_given = getattr(blur, "recon_blur_kernel", None) is not None
        raise ValueError(_blur_too_large(sigma, kernel, kernel_given, map_hw, "", "", allow_off=False))
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
