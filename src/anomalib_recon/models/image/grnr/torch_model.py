"""PyTorch model of GRNR: global-regularised neighbourhood regression on frozen CNN features (training-free).

Per image and per scale, on the 3×3-average-pooled feature map ``E`` (``N = h·w`` positions, ``C`` channels):

1. **Self filtering** (global normality prior ``S_G``): the ``K`` features with the smallest mean Euclidean
   distance to all *other* features of the same image; only their sum ``Σ_j μ_j`` is needed.
2. **Local support** ``S_n ∈ R^{8×C}``: the 8 neighbours of position ``n`` in the reflect-padded map (centre
   excluded).
3. **Regression**: ``min_w ‖q − wS‖² + λ Σ_j ‖μ_j − wS‖²`` has the closed form
   ``q̂ = t Sᵀ (S Sᵀ)⁻¹ S`` with the regularised target ``t = (q + λ Σ_j μ_j) / (1 + λK)`` (the projection of
   ``t`` onto the span of the neighbours). ``λ = 0`` is plain neighbourhood regression (RNR).
4. **Residual** ``a_n = ‖q_n − q̂_n‖``; border band set to the map minimum, bilinear upsampling, Gaussian blur;
   product over the scales; central crop with the outer band replicated; image score = max of the map.

Everything is batched over images and positions and uses only ops that export to ONNX/OpenVINO: the 8×8
solves are an unrolled batched Cholesky (:func:`spd_solve`), ``torch.linalg`` has no ONNX lowering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from anomalib.models.components import GaussianBlur2d
from torch import nn

from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.tracing import is_tracing

__all__ = [
    "GRNRModel",
    "global_prior_sum",
    "mean_distance_to_others",
    "neighbourhood_support",
    "regularised_projection",
    "resolve_layers",
    "spd_solve",
]

FEATURE_STRIDES = (8, 16)
"""Strides of the default layers (WRN50 ``layer2``/``layer3``, the paper's choice)."""
REFERENCE_SIZE = 320
"""Input size at which the paper's border cut, blur σ and crop are given (they scale with the input)."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None) -> list[int | str]:
    """``layers`` as given, or for ``None`` the last feature layer at strides 8 and 16.

    ``layer2, layer3`` for ResNets (the paper), ``blocks.2, blocks.4`` (``features_only`` indices 2, 3) for
    EfficientNet-Lite.
    """
    return layers_at_strides(backbone, layers, FEATURE_STRIDES)


# ------------------------------------------------------------------------------------------------ the algorithm
def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = b`` for a batch of small symmetric positive-definite ``A (..., n, n)``, ``b (..., n)``.

    An unrolled Cholesky factorisation ``A = L Lᵀ`` with forward and back substitution, written with slicing,
    products and sums only, so that it exports to ONNX/OpenVINO (``torch.linalg.solve``/``cholesky`` do not).
    ``n`` is fixed at trace time (8 for GRNR), so the loops unroll into a fixed graph. The pivots are clamped to
    a tiny positive value; callers regularise ``A`` (GRNR adds ``εI``).
    """
    n = matrix.shape[-1]
    tiny = torch.finfo(matrix.dtype).tiny
    rows = torch.arange(n, device=matrix.device)
    cols: list[torch.Tensor] = []  # columns of L, zero above the diagonal
    for j in range(n):
        v = matrix[..., :, j]
        if j:
            done = torch.stack(cols, dim=-1)  # (..., n, j)
            v = v - (done * done[..., j : j + 1, :]).sum(-1)
        pivot = v[..., j : j + 1].clamp_min(tiny).sqrt()
        cols.append(v / pivot * (rows >= j).to(matrix.dtype))
    lower = torch.stack(cols, dim=-1)
    ys: list[torch.Tensor] = []  # L y = b
    for i in range(n):
        s = rhs[..., i]
        if i:
            s = s - (lower[..., i, :i] * torch.stack(ys, dim=-1)).sum(-1)
        ys.append(s / lower[..., i, i])
    xs: list[torch.Tensor] = [rhs[..., 0]] * n  # Lᵀ x = y
    for i in reversed(range(n)):
        s = ys[i]
        if i < n - 1:
            s = s - (lower[..., i + 1 :, i] * torch.stack(xs[i + 1 :], dim=-1)).sum(-1)
        xs[i] = s / lower[..., i, i]
    return torch.stack(xs, dim=-1)


def mean_distance_to_others(features: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Mean Euclidean distance of every feature to all the *other* features of its image.

    ``features (B, N, C)`` → ``(B, N)``. Distances in matmul form ``√(‖x‖² + ‖y‖² − 2 x·y)`` on features centred
    on their image mean (exact, and it avoids float32 cancellation when features are far from 0); the diagonal
    (a feature with itself) is excluded by zeroing it and dividing by ``N − 1`` (the reference demo writes
    ``inf`` there, which makes every mean infinite — not reproduced). With ``chunk_size`` rows of the ``N × N``
    matrix are computed at a time: exact, and memory ``B·chunk_size·N`` instead of ``B·N²``.
    """
    n = features.shape[1]
    features = features - features.mean(dim=1, keepdim=True)  # distances are shift-invariant; less cancellation
    squared = (features * features).sum(-1)  # (B, N)
    step = n if chunk_size is None or chunk_size >= n else int(chunk_size)
    columns = torch.arange(n, device=features.device)
    sums = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        gram = features[:, start:stop] @ features.transpose(1, 2)  # (B, rows, N)
        d2 = squared[:, start:stop, None] + squared[:, None, :] - 2.0 * gram
        dist = d2.clamp_min(0.0).sqrt()
        self_mask = columns[start:stop, None] == columns[None, :]
        sums.append(dist.masked_fill(self_mask, 0.0).sum(-1))
    return torch.cat(sums, dim=1) / (n - 1)


def global_prior_sum(features: torch.Tensor, num_priors: int, chunk_size: int | None = None) -> torch.Tensor:
    """Self filtering: ``Σ_j μ_j`` over the ``num_priors`` features with the smallest mean distance to the others.

    ``features (B, N, C)`` → ``(B, C)``. Only the sum enters the closed form.
    """
    mean_dist = mean_distance_to_others(features, chunk_size)
    index = torch.topk(mean_dist, num_priors, dim=1, largest=False).indices  # (B, K)
    priors = torch.gather(features, 1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return priors.sum(1)


def neighbourhood_support(pooled: torch.Tensor) -> torch.Tensor:
    """The 8 neighbours (3×3 without the centre) of every position of the reflect-padded map.

    ``pooled (B, C, h, w)`` → ``S (B, N, 8, C)`` with ``N = h·w`` in row-major order.
    """
    b, c, h, w = pooled.shape
    padded = F.pad(pooled, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    return torch.stack(shifted, dim=1).reshape(b, 8, c, h * w).permute(0, 3, 1, 2)


def regularised_projection(support: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``q̂ = w S`` with ``w = t Sᵀ (S Sᵀ + ε̃ I)⁻¹``: the regularised target projected onto the neighbours' span.

    ``target (B, N, C)``, ``support (B, N, 8, C)``. ``ε̃ = ε · trace(S Sᵀ)/8`` (plus the smallest
    normal float) keeps the Gram matrix invertible when neighbours are (nearly) collinear (**ASSUMPTION** of the
    spec; the demo adds 0.001·U[0,1) noise to the neighbours instead).
    """
    gram = support @ support.transpose(-1, -2)  # (B, N, 8, 8)
    k = support.shape[-2]
    trace = (support * support).sum((-1, -2))
    ridge = eps * trace / k + torch.finfo(support.dtype).tiny
    eye = torch.eye(k, dtype=support.dtype, device=support.device)
    rhs = (support @ target.unsqueeze(-1)).squeeze(-1)  # (B, N, 8)
    weights = spd_solve(gram + ridge[..., None, None] * eye, rhs)
    return (weights.unsqueeze(-2) @ support).squeeze(-2)


def grnr_residual(
    pooled: torch.Tensor,
    num_priors: int,
    lam: float,
    eps: float = 1e-6,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Regression residual ``‖q − q̂‖`` at every position of a pooled map ``(B, C, h, w)`` → ``(B, 1, h, w)``."""
    b, _, h, w = pooled.shape
    query = pooled.flatten(2).transpose(1, 2)  # (B, N, C)
    support = neighbourhood_support(pooled)
    if lam > 0:
        prior = global_prior_sum(query, num_priors, chunk_size)
        target = (query + lam * prior.unsqueeze(1)) / (1.0 + lam * num_priors)
    else:
        target = query
    residual = query - regularised_projection(support, target, eps)
    return (residual * residual).sum(-1).sqrt().reshape(b, 1, h, w)


def _gaussian_kernel_size(sigma: float) -> int:
    """scipy's ``gaussian_filter`` support: radius ``int(4σ + 0.5)``."""
    return 2 * int(4.0 * sigma + 0.5) + 1


# ------------------------------------------------------------------------------------------------ the module
class GRNRModel(nn.Module):
    """Frozen feature extractor + GRNR on each selected layer; returns ``InferenceBatch(pred_score, anomaly_map)``.

    Args:
        backbone: timm CNN (``wide_resnet50_2.tv_in1k`` in the paper).
        layers: Layers (names or ``features_only`` indices); ``None`` = strides 8 and 16 (:func:`resolve_layers`).
        weights: ``"imagenet"``, a local weights file, or ``None``.
        image_size: Input size the default sizes are scaled for (the paper: 320×320).
        pool_kernel: Local aggregation (3×3 average pooling, ``count_include_pad=True``, as the demo).
        num_global_priors: ``K``, features kept by self filtering (40).
        lam: ``λ``, weight of the global regularisation (5); 0 = plain neighbourhood regression.
        border_cut: Border band (in feature cells at 320 px, per layer) set to the map minimum: (3, 2). Scaled
            by ``input / 320`` and rounded (**INFERRED** for other sizes).
        blur_sigma: Gaussian σ in pixels at 320 px (3), scaled by ``min(input) / 320``; 0 = no blur.
        crop: Border band in pixels at 320 px (32) outside the evaluated centre; the map keeps the input size and
            the band repeats the centre's edge (the spec's default option). 0 = no crop.
        eps: Relative ridge on the 8×8 Gram matrices (1e-6, **ASSUMPTION** of the spec).
        distance_chunk: Rows of the per-image ``N × N`` distance matrix computed at once (exact; bounds memory
            at large inputs). ``None`` = all rows at once.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: tuple[int, int] = (REFERENCE_SIZE, REFERENCE_SIZE),
        pool_kernel: int = 3,
        num_global_priors: int = 40,
        lam: float = 5.0,
        border_cut: Sequence[int] = (3, 2),
        blur_sigma: float = 3.0,
        crop: int = 32,
        eps: float = 1e-6,
        distance_chunk: int | None = 1024,
    ) -> None:
        super().__init__()
        layers = resolve_layers(backbone, layers)
        self._check_args(layers, pool_kernel, num_global_priors, lam, border_cut, blur_sigma, crop, eps, distance_chunk)
        self.feature_extractor = FeatureExtractor(backbone, layers=layers, weights=weights)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.pool_kernel = int(pool_kernel)
        self.num_global_priors = int(num_global_priors)
        self.lam = float(lam)
        self.border_cut = [int(c) for c in border_cut]
        self.crop = int(crop)
        self.eps = float(eps)
        self.distance_chunk = None if distance_chunk is None else int(distance_chunk)
        self.sigma = float(blur_sigma) * min(self.image_size) / REFERENCE_SIZE
        self.blur = (
            GaussianBlur2d(sigma=self.sigma, channels=1, kernel_size=_gaussian_kernel_size(self.sigma))
            if self.sigma > 0
            else None
        )
        self.check_image_size(self.image_size)

    @staticmethod
    def _check_args(
        layers: list,
        pool_kernel: int,
        k: int,
        lam: float,
        cut: Sequence[int],
        sigma: float,
        crop: int,
        eps: float,
        chunk: int | None,
    ) -> None:
        problems = []
        if not (isinstance(k, int) and k >= 1):
            problems.append(f"num_global_priors must be an integer >= 1, got {k!r}")
        if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
            problems.append(f"lam must be a finite number >= 0 (0 = plain neighbourhood regression), got {lam!r}")
        if not (isinstance(pool_kernel, int) and pool_kernel >= 1 and pool_kernel % 2 == 1):
            problems.append(f"pool_kernel must be an odd integer >= 1, got {pool_kernel!r}")
        if len(cut) != len(layers) or any(int(c) < 0 for c in cut):
            problems.append(f"border_cut needs one non-negative value per layer ({len(layers)}), got {list(cut)}")
        if sigma < 0 or crop < 0 or eps < 0:
            problems.append(f"blur_sigma, crop and eps must be >= 0, got {sigma}, {crop}, {eps}")
        if chunk is not None and chunk < 1:
            problems.append(f"distance_chunk must be >= 1 or None, got {chunk}")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    # -------------------------------------------------------------------------------------------- sizes
    def grid_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Feature-grid size of each layer for an input size (``ceil(size / stride)``, as timm's CNNs)."""
        return [(math.ceil(image_size[0] / r), math.ceil(image_size[1] / r)) for r in self.feature_extractor.reductions]

    def cuts(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Border band (rows, cols) per layer: the 320-px value scaled with the input size."""
        return [
            (round(c * image_size[0] / REFERENCE_SIZE), round(c * image_size[1] / REFERENCE_SIZE))
            for c in self.border_cut
        ]

    def crop_band(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Outer band (rows, cols) outside the evaluated centre (32 px of 320 → 10 % per side)."""
        return (
            round(self.crop * image_size[0] / REFERENCE_SIZE),
            round(self.crop * image_size[1] / REFERENCE_SIZE),
        )

    def check_image_size(self, image_size: tuple[int, int], grids: list[tuple[int, int]] | None = None) -> None:
        """One clear error when a layer's grid is too small for reflect padding, the border cut or ``K``."""
        grids = grids or self.grid_sizes(image_size)
        for layer, (h, w), (ch, cw) in zip(self.feature_extractor.layers, grids, self.cuts(image_size), strict=True):
            if min(h, w) < 2 or h <= 2 * ch or w <= 2 * cw or h * w <= self.num_global_priors:
                msg = (
                    f"Input {image_size[0]}x{image_size[1]} gives a {h}x{w} feature grid at layer {layer!r}: GRNR "
                    f"needs at least 2x2 cells, more than 2x the border cut ({ch}, {cw}) and more than "
                    f"num_global_priors={self.num_global_priors} cells. Use a larger image_size, fewer "
                    "num_global_priors, or earlier layers."
                )
                raise ValueError(msg)
        band = self.crop_band(image_size)
        if image_size[0] <= 2 * band[0] or image_size[1] <= 2 * band[1]:
            msg = f"crop={self.crop} leaves nothing of a {image_size[0]}x{image_size[1]} input; lower crop."
            raise ValueError(msg)

    # -------------------------------------------------------------------------------------------- forward
    def scale_map(self, features: torch.Tensor, cut: tuple[int, int]) -> torch.Tensor:
        """Residual map of one layer ``(B, C, h, w)`` → ``(B, 1, h, w)`` with its border band at the map minimum."""
        pooled = F.avg_pool2d(features, self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        residual = grnr_residual(pooled, self.num_global_priors, self.lam, self.eps, self.distance_chunk)
        ch, cw = cut
        if ch or cw:
            h, w = residual.shape[-2:]
            rows = torch.arange(h, device=residual.device)
            columns = torch.arange(w, device=residual.device)
            inside = ((rows >= ch) & (rows < h - ch))[:, None] & ((columns >= cw) & (columns < w - cw))[None, :]
            minimum = residual.amin(dim=(-2, -1), keepdim=True)
            residual = torch.where(inside, residual, minimum)
        return residual

    def anomaly_map(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Upsampled, blurred per-layer maps, their product, the central crop with the band replicated."""
        fused = None
        for feature, cut in zip(features, self.cuts(image_size), strict=True):
            layer_map = F.interpolate(
                self.scale_map(feature, cut), size=image_size, mode="bilinear", align_corners=False
            )
            if self.blur is not None:
                layer_map = self.blur(layer_map)
            fused = layer_map if fused is None else fused * layer_map
        bh, bw = self.crop_band(image_size)
        if bh or bw:
            centre = fused[:, :, bh : image_size[0] - bh, bw : image_size[1] - bw]
            fused = F.pad(centre, (bw, bw, bh, bh), mode="replicate")
        return fused

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """``images (B, 3, H, W)`` (normalised) → anomaly map ``(B, 1, H, W)`` and image score = its max."""
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        if not is_tracing() and not bool(torch.isfinite(images).all()):
            msg = "images contain NaN or Inf values; GRNR needs finite, normalised images (check the input files)."
            raise ValueError(msg)
        features = self.feature_extractor(images)
        if not is_tracing():
            self.check_image_size(image_size, [tuple(f.shape[-2:]) for f in features])
        anomaly_map = self.anomaly_map(features, image_size)
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(-3, -2, -1)), anomaly_map=anomaly_map)
