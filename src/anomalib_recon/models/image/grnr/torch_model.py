"""PyTorch model of GRNR: global-regularised neighbourhood regression on frozen CNN features (training-free).

Per image and per scale, on the 3×3-average-pooled feature map ``E`` (``N = h·w`` positions ``q_n``, ``C``
channels):

1. **Self filtering** (global normality prior ``S_G``, :func:`select_global_priors`): the ``K`` features with the
   smallest mean Euclidean distance to all *other* features of the same image.
2. **Local support** ``S_n ∈ R^{8×C}`` (:func:`neighbourhood_support`): the 8 neighbours of position ``n`` in the
   reflect-padded map (centre excluded).
3. **Regression** (:func:`neighbourhood_regression`, which takes the priors as an argument):
   ``min_w ‖q − wS‖² + λ Σ_j ‖μ_j − wS‖² + ε̃ ‖w‖²`` has the closed form ``q̂ = w S`` with
   ``w = t Sᵀ (S Sᵀ + ε̃ I)⁻¹`` and the regularised target ``t = (q + λ Σ_j μ_j) / (1 + λK)``: the ridge projection
   of ``t`` onto the span of the neighbours. ``λ = 0`` is plain neighbourhood regression (RNR);
   ``ε̃ = ε · trace(S Sᵀ)/8`` (+ the smallest normal float) keeps the system invertible.
4. **Residual** ``a_n = ‖q_n − q̂_n‖``; a border band per layer takes the minimum of the interior
   (:func:`fill_border`), bilinear upsampling, Gaussian blur; product over the scales; central crop with the outer
   band replicated; image score = max of the map.

Numerics of step 3 in float32. On flat regions (plain backgrounds, black borders) the 8 neighbours are nearly equal,
``S Sᵀ`` is nearly rank one and its entries are large numbers whose small differences carry the answer: formed and
factorised directly in float32 it loses the answer (residuals off by orders of magnitude, negative pivots, NaN).
The same problem is solved in a basis where nothing cancels: the anchor ``a = s_8`` and the differences
``d_i = s_i − a`` (``B = T S``, ``T`` a fixed 8×8 matrix), so ``w S = c B`` and the ridge becomes ``ε̃ c T Tᵀ cᵀ``;
the system ``(B Bᵀ + ε̃ T Tᵀ) c = B (t − a) − ε̃ T Tᵀ e_1`` is Jacobi-scaled (unit diagonal), and the residual is
``(q − a) − c B`` (``a`` lies in the span, so its part of the projection is exact except for the ridge term on the
right). It is the same regularised problem, exact in float32 to about 1e-6 relative on near-flat neighbourhoods
(``benchmarks/grnr_precision.py``), and it stays float32 so ONNX/OpenVINO run the identical graph (OpenVINO's CPU
plugin computes float64 graphs in float32).

Everything is batched over images and positions and uses only ops that export to ONNX/OpenVINO: the 8×8 solves are
an unrolled batched Cholesky (:func:`spd_solve`), ``torch.linalg`` has no ONNX lowering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_recon.components.anomaly_map import check_blur_fits, make_blur, reduce_max
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.guards import check_finite
from anomalib_recon.components.tracing import is_tracing

__all__ = [
    "GRNRModel",
    "fill_border",
    "grnr_residual",
    "mean_distance_to_others",
    "nearest_bank_rows",
    "neighbourhood_regression",
    "neighbourhood_support",
    "resolve_layers",
    "select_global_priors",
    "spd_solve",
]

FEATURE_STRIDES = (8, 16)
"""Strides of the default layers (WRN50 ``layer2``/``layer3``, the paper's choice)."""
REFERENCE_SIZE = 320
"""Input size at which the paper's border cut, blur σ and crop are given (they scale with the input)."""
NUM_NEIGHBOURS = 8
"""The 3×3 window without its centre."""
PRIOR_SOURCES = ("image", "normal")
"""Where the global priors come from: the test image itself (the paper, zero-shot) or a bank of normal features."""
SOLVE_DTYPES = (torch.float32, torch.float64)
"""Dtypes the regression accepts: its residuals are small differences of large feature norms."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None) -> list[int | str]:
    """``layers`` as given, or for ``None`` the last feature layer at strides 8 and 16.

    ``layer2, layer3`` for ResNets (the paper), ``blocks.2, blocks.4`` (``features_only`` indices 2, 3) for
    EfficientNet-Lite.
    """
    return layers_at_strides(backbone, layers, FEATURE_STRIDES)


# ------------------------------------------------------------------------------------------------ the algorithm
def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, min_pivot: float | None = None) -> torch.Tensor:
    """Solve ``A x = b`` for a batch of small symmetric positive-definite ``A (..., n, n)``, ``b (..., n)``.

    An unrolled Cholesky factorisation ``A = L Lᵀ`` with forward and back substitution, written with slicing,
    products and sums only, so that it exports to ONNX/OpenVINO (``torch.linalg.solve``/``cholesky`` do not).
    ``n`` is fixed at trace time (8 for GRNR), so the loops unroll into a fixed graph. Each pivot (before its square
    root) is clamped to ``min_pivot`` (default: the smallest normal float): a caller that knows a lower bound of
    ``A``'s eigenvalues passes it, so rounding can never produce a zero or negative pivot.
    """
    n = matrix.shape[-1]
    floor = torch.finfo(matrix.dtype).tiny if min_pivot is None else float(min_pivot)
    rows = torch.arange(n, device=matrix.device)
    cols: list[torch.Tensor] = []  # columns of L, zero above the diagonal
    for j in range(n):
        v = matrix[..., :, j]
        if j:
            done = torch.stack(cols, dim=-1)  # (..., n, j)
            v = v - (done * done[..., j : j + 1, :]).sum(-1)
        pivot = v[..., j : j + 1].clamp_min(floor).sqrt()
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
    (a feature with itself) is excluded by zeroing it and dividing by ``N − 1`` (the authors' demo writes ``inf``
    there, which makes every mean infinite — not reproduced). With ``chunk_size`` rows of the ``N × N`` matrix are
    computed at a time: exact, and memory ``B·chunk_size·N`` instead of ``B·N²``.
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


def select_global_priors(features: torch.Tensor, num_priors: int, chunk_size: int | None = None) -> torch.Tensor:
    """Self filtering: the ``num_priors`` features with the smallest mean distance to the others, ``(B, K, C)``.

    ``features (B, N, C)`` with ``N >= 2`` (a mean distance to the others needs another feature) and
    ``1 <= num_priors <= N``.
    """
    if features.dim() != 3:
        msg = f"select_global_priors expects features (B, N, C), got shape {tuple(features.shape)}."
        raise ValueError(msg)
    n = features.shape[1]
    if not 1 <= num_priors <= n or n < 2:
        msg = (
            f"num_global_priors={num_priors} needs between 1 and N feature vectors per image and N >= 2, but the map "
            f"has N={n}. Use fewer num_global_priors or a larger image_size."
        )
        raise ValueError(msg)
    mean_dist = mean_distance_to_others(features, chunk_size)
    index = torch.topk(mean_dist, num_priors, dim=1, largest=False).indices  # (B, K)
    return torch.gather(features, 1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def neighbourhood_support(pooled: torch.Tensor) -> torch.Tensor:
    """The 8 neighbours (3×3 without the centre) of every position of the reflect-padded map.

    ``pooled (B, C, h, w)`` → ``S (B, N, 8, C)`` with ``N = h·w`` in row-major order.
    """
    b, c, h, w = pooled.shape
    padded = F.pad(pooled, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    return torch.stack(shifted, dim=1).reshape(b, NUM_NEIGHBOURS, c, h * w).permute(0, 3, 1, 2)


def _anchor_ridge(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``T Tᵀ``, its diagonal and its first row, for the basis ``B = T S``: row 0 the anchor ``s_8``, row ``i`` the
    difference ``s_i − s_8``.

    ``(T Tᵀ)_00 = 1``, ``(T Tᵀ)_0i = −1``, ``(T Tᵀ)_ij = 1 + δ_ij`` (``i, j ≥ 1``); eigenvalues 0.1125 ... 8.89.
    """
    index = torch.arange(NUM_NEIGHBOURS, device=device)
    anchor_row = index == 0
    tt_first = torch.where(anchor_row, 1.0, -1.0).to(dtype)
    tt_diagonal = torch.where(anchor_row, 1.0, 2.0).to(dtype)
    differences = (index[:, None] != 0) & (index[None, :] != 0)
    tt = torch.where(differences, 1.0, tt_first[:, None] * tt_first[None, :]).to(dtype)  # off-diagonal block
    tt = tt + torch.where(differences & (index[:, None] == index[None, :]), 1.0, 0.0).to(dtype)
    return tt, tt_diagonal, tt_first


TT_MIN_EIGENVALUE = 0.1125
"""Smallest eigenvalue of ``T Tᵀ`` (0.11252...; rounded down)."""


def pivot_floor(eps: float) -> float:
    """A lower bound of the eigenvalues of the Jacobi-scaled system of :func:`neighbourhood_regression`.

    ``λ_min(B Bᵀ + ε̃ T Tᵀ) >= ε̃ λ_min(T Tᵀ)`` and its diagonal is at most ``2 trace(S Sᵀ) + 2ε̃`` with
    ``ε̃ >= ε trace(S Sᵀ)/8``, so every Cholesky pivot of the scaled system is at least
    ``λ_min(T Tᵀ) ε / (16 + 2ε)``; 90 % of it is the floor that rounding may never cross.
    """
    return 0.9 * TT_MIN_EIGENVALUE * eps / (16.0 + 2.0 * eps)


def neighbourhood_regression(
    support: torch.Tensor,
    query: torch.Tensor,
    priors: torch.Tensor | None = None,
    lam: float = 0.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Residual norms ``‖q − q̂‖`` of the global-regularised neighbourhood regression, ``(B, N)``.

    Solves ``min_w ‖q − wS‖² + λ Σ_j ‖μ_j − wS‖² + ε̃ ‖w‖²`` per position (module docstring) in the anchored,
    Jacobi-scaled basis that keeps float32 exact on near-flat neighbourhoods.

    Args:
        support: Neighbours ``S (B, N, 8, C)`` (:func:`neighbourhood_support`).
        query: Features ``q (B, N, C)``.
        priors: The global priors ``μ_j``: one set per image ``(B, K, C)`` (self filtering,
            :func:`select_global_priors`) or one set per position ``(B, N, K, C)`` (the ``K`` nearest vectors of a
            bank of normal features, :func:`nearest_bank_rows`); their count ``K`` is the ``K`` of the target.
            Needed when ``lam > 0``, ignored when ``lam == 0``.
        lam: ``λ >= 0``.
        eps: ``ε > 0``, the ridge relative to ``trace(S Sᵀ)/8``.
    """
    if support.dim() != 4 or query.dim() != 3 or support.shape[-2] != NUM_NEIGHBOURS:
        msg = (
            f"neighbourhood_regression expects support (B, N, 8, C) and query (B, N, C), got {tuple(support.shape)} "
            f"and {tuple(query.shape)}."
        )
        raise ValueError(msg)
    if support.shape[:2] != query.shape[:2] or support.shape[-1] != query.shape[-1]:
        msg = f"support {tuple(support.shape)} and query {tuple(query.shape)} disagree on B, N or C."
        raise ValueError(msg)
    if query.dtype not in SOLVE_DTYPES or support.dtype != query.dtype:
        msg = (
            f"the GRNR regression runs in float32 or float64, got {query.dtype}/{support.dtype}: its residuals are "
            "small differences of large feature norms, which half precision cannot hold. Run the model in float32."
        )
        raise TypeError(msg)
    if not (math.isfinite(eps) and eps > 0):
        msg = f"eps must be a finite number > 0 (the ridge that keeps the 8x8 systems invertible), got {eps!r}."
        raise ValueError(msg)
    if eps < torch.finfo(query.dtype).eps:
        msg = (
            f"eps={eps!r} is below the {query.dtype} machine epsilon ({torch.finfo(query.dtype).eps:.3g}): on the "
            "unit-diagonal 8x8 systems such a ridge rounds away, and repeated neighbours (reflect-padded borders, "
            "flat regions) leave them singular, so the solve returns NaN. Use eps >= "
            f"{torch.finfo(query.dtype).eps:.3g} (default 1e-6), or float64 inputs for a smaller ridge."
        )
        raise ValueError(msg)
    if not (math.isfinite(lam) and lam >= 0):
        msg = f"lam must be a finite number >= 0, got {lam!r}."
        raise ValueError(msg)
    k = NUM_NEIGHBOURS
    anchor = support[..., k - 1, :]  # (B, N, C)
    basis = torch.cat([anchor.unsqueeze(-2), support[..., : k - 1, :] - anchor.unsqueeze(-2)], dim=-2)
    if lam > 0 and priors is not None and priors.dim() == 4:  # per-position priors (B, N, K, C)
        if priors.shape[:2] != query.shape[:2] or priors.shape[-1] != query.shape[-1] or priors.shape[2] < 1:
            b, n, c = query.shape
            msg = f"per-position priors must have shape (B, N, K, C) = ({b}, {n}, K, {c}), got {tuple(priors.shape)}."
            raise ValueError(msg)
        weight = lam * priors.shape[2]  # λK
        first = priors[:, :, 0]
        # μ̄ − a as small differences (μ_j − μ_1 and μ_1 − a), as for per-image priors below
        prior_offset = (priors - first.unsqueeze(2)).mean(dim=2) + (first - anchor)  # Σ_j μ_j / K − a
        offset = ((query - anchor) + weight * prior_offset) / (1.0 + weight)  # t − a
    elif lam > 0:
        if (
            priors is None
            or priors.dim() != 3
            or priors.shape[0] != query.shape[0]
            or priors.shape[-1] != query.shape[-1]
        ):
            shape = None if priors is None else tuple(priors.shape)
            msg = f"lam > 0 needs priors of shape (B, K, C) = ({query.shape[0]}, K, {query.shape[-1]}), got {shape}."
            raise ValueError(msg)
        weight = lam * priors.shape[1]  # λK
        first = priors[:, :1]
        # μ̄ − a as small differences (μ_j − μ_1 and μ_1 − a), not as a difference of two large rounded vectors
        prior_offset = (priors - first).mean(dim=1, keepdim=True) + (first - anchor)  # Σ_j μ_j / K − a
        offset = ((query - anchor) + weight * prior_offset) / (1.0 + weight)  # t − a
    else:
        offset = query - anchor
    ridge = eps * (support * support).sum((-1, -2)) / k + torch.finfo(support.dtype).tiny  # ε̃ (B, N)
    tt, tt_diagonal, tt_first = _anchor_ridge(support.dtype, support.device)
    gram = basis @ basis.transpose(-1, -2)  # each entry a dot product of its own scale: nothing cancels
    eye = torch.eye(k, dtype=support.dtype, device=support.device)
    scale = ((gram * eye).sum(-1) + ridge.unsqueeze(-1) * tt_diagonal).rsqrt()  # Jacobi scaling (B, N, 8)
    system = (gram + ridge[..., None, None] * tt) * (scale.unsqueeze(-1) * scale.unsqueeze(-2))  # unit diagonal
    rhs = scale * ((basis @ offset.unsqueeze(-1)).squeeze(-1) - ridge.unsqueeze(-1) * tt_first)
    coefficients = spd_solve(system, rhs, min_pivot=pivot_floor(eps)) * scale
    residual = (query - anchor) - (coefficients.unsqueeze(-2) @ basis).squeeze(-2)
    return (residual * residual).sum(-1).sqrt()


def grnr_residual(
    pooled: torch.Tensor,
    num_priors: int,
    lam: float,
    eps: float = 1e-6,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Regression residual ``‖q − q̂‖`` at every position of a pooled map ``(B, C, h, w)`` → ``(B, 1, h, w)``.

    The priors come from self filtering (:func:`select_global_priors`) on the same map; ``λ = 0`` skips them.
    """
    b, _, h, w = pooled.shape
    query = pooled.flatten(2).transpose(1, 2)  # (B, N, C)
    priors = select_global_priors(query, num_priors, chunk_size) if lam > 0 else None
    residual = neighbourhood_regression(neighbourhood_support(pooled), query, priors, lam, eps)
    return residual.reshape(b, 1, h, w)


SHORTLIST_EXTRA = 8
"""Candidates per bank block beyond ``2K`` that :func:`nearest_bank_rows` re-ranks by direct differences."""


def nearest_bank_rows(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    centre: torch.Tensor | None = None,
    chunk_size: int = 16384,
    query_block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank (M, C)`` to each of ``queries (Q, C)`` (Euclidean), nearest first.

    Returns the rows themselves ``(Q, k, C)`` and their squared distances ``(Q, k)``. The bank is scanned in blocks
    of ``chunk_size`` rows, in eager mode and in exported graphs alike (the block loop unrolls at export), so no more
    than ``Q × chunk_size`` distances exist at once; in eager mode the queries also go in blocks of ``query_block``.
    In each block a shortlist of ``2k + 8`` candidates is ranked by the matrix-product form
    ``‖b − c‖² − 2 (q − c)·(b − c)`` on features centred on ``centre`` (the bank mean by default; ``‖q − c‖²`` is
    the same for every row and is left out), then re-ranked by the direct ``Σ (q − b)²``, which does not cancel:
    float32 cancellation in the matrix product can only reorder rows within its rounding error, and such rows stay
    in the shortlist. The running best ``k`` are merged across blocks by the direct distances, and each block's rows
    are read from that block only (no bank-wide gather in an exported graph).
    """
    rows, dim = bank.shape
    if queries.dim() != 2 or queries.shape[-1] != dim:
        msg = f"nearest_bank_rows expects queries (Q, {dim}) for a bank (M, {dim}), got {tuple(queries.shape)}."
        raise ValueError(msg)
    if not 1 <= k <= rows:
        msg = (
            f"the bank of normal features has {rows} vectors, fewer than the {k} nearest asked for (num_global_priors"
            "): use more normal images (normal_images, or a larger coreset_ratio) or fewer num_global_priors."
        )
        raise ValueError(msg)
    if chunk_size < 1 or query_block < 1:
        msg = f"chunk_size and query_block must be >= 1, got {chunk_size} and {query_block}."
        raise ValueError(msg)
    centre = bank.mean(dim=0) if centre is None else centre
    blocks = [queries] if is_tracing() else list(queries.split(query_block))
    centred_blocks = [block - centre for block in blocks]
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(blocks)  # (squared distances, rows)
    for start in range(0, rows, chunk_size):
        chunk = bank[start : start + chunk_size]
        centred = chunk - centre
        norms = (centred * centred).sum(-1)  # ‖b − c‖²
        width = min(2 * k + SHORTLIST_EXTRA, chunk.shape[0])
        for n, (block, centred_block) in enumerate(zip(blocks, centred_blocks, strict=True)):
            approx = norms.unsqueeze(0) - 2.0 * (centred_block @ centred.transpose(0, 1))  # (Qb, rows of block)
            index = approx.topk(width, dim=1, largest=False).indices
            found = chunk[index]  # (Qb, width, C)
            difference = block.unsqueeze(1) - found
            exact = (difference * difference).sum(-1)  # (Qb, width): no cancellation
            previous = best[n]
            if previous is not None:
                exact, found = torch.cat([previous[0], exact], dim=1), torch.cat([previous[1], found], dim=1)
            keep = exact.topk(min(k, exact.shape[1]), dim=1, largest=False).indices  # sorted, nearest first
            best[n] = (exact.gather(1, keep), found.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim)))
    distances = torch.cat([b[0] for b in best if b is not None])
    return torch.cat([b[1] for b in best if b is not None]), distances


def fill_border(residual: torch.Tensor, cut: tuple[int, int]) -> torch.Tensor:
    """Set a band of ``cut = (rows, cols)`` cells at the border of ``(B, 1, h, w)`` maps to the interior's minimum.

    The band's own values (neighbourhoods made of reflected copies) never enter the fill value.
    """
    ch, cw = int(cut[0]), int(cut[1])
    if not (ch or cw):
        return residual
    h, w = residual.shape[-2:]
    interior = residual[..., ch : h - ch, cw : w - cw]
    rows = torch.arange(h, device=residual.device)
    columns = torch.arange(w, device=residual.device)
    inside = ((rows >= ch) & (rows < h - ch))[:, None] & ((columns >= cw) & (columns < w - cw))[None, :]
    return torch.where(inside, residual, interior.amin(dim=(-2, -1), keepdim=True))


# ------------------------------------------------------------------------------------------------ the module
class GRNRModel(nn.Module):
    """Frozen feature extractor + GRNR on each selected layer; returns ``InferenceBatch(pred_score, anomaly_map)``.

    Args:
        backbone: timm CNN (``wide_resnet50_2.tv_in1k`` in the paper).
        layers: Layers (names or ``features_only`` indices); ``None`` = strides 8 and 16 (:func:`resolve_layers`).
        weights: ``"imagenet"``, a local weights file, or ``None``.
        image_size: Input size the default sizes are scaled for (the paper: 320×320).
        pool_kernel: Local aggregation (3×3 average pooling, ``count_include_pad=True``, as the authors' demo).
        num_global_priors: ``K``, features kept by self filtering (40).
        lam: ``λ``, weight of the global regularisation (5); 0 = plain neighbourhood regression.
        border_cut: Border band (in feature cells at 320 px, per layer) set to the interior's minimum: (3, 2).
            Scaled by ``input / 320`` and rounded (**INFERRED** for other sizes).
        blur_sigma: Gaussian σ in pixels at 320 px (3), scaled by ``min(input) / 320``; 0 = no blur.
        crop: Border band in pixels at 320 px (32) outside the evaluated centre; the map keeps the input size and
            the band repeats the centre's edge. 0 = no crop.
        eps: Relative ridge ``ε > 0`` on the 8×8 systems (1e-6, **INFERRED**).
        distance_chunk: Rows of the per-image ``N × N`` distance matrix computed at once (exact; bounds memory
            at large inputs). ``None`` = all rows at once.
        prior_source: Where each query's ``K`` global priors come from. ``"image"`` (the paper, zero-shot): self
            filtering on the test image itself. ``"normal"``: the ``K`` nearest vectors of a per-layer bank of
            pooled normal training features (:meth:`set_banks`), a set per position (**INFERRED** extension).
        regression: ``False`` (only with ``"normal"``) replaces the regression residual by the distance to the
            nearest bank vector (plain 1-NN on the same pooled features; the ablation).
        knn_chunk_size: Bank rows per block of the nearest-neighbour search, in eager mode and in exported graphs.
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
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
        prior_source: str = "image",
        regression: bool = True,
        knn_chunk_size: int = 16384,
    ) -> None:
        super().__init__()
        layers = resolve_layers(backbone, layers)
        self._check_args(layers, pool_kernel, num_global_priors, lam, border_cut, blur_sigma, crop, eps, distance_chunk)
        self._check_prior_args(prior_source, regression, knn_chunk_size)
        self.prior_source = str(prior_source)
        self.regression = bool(regression)
        self.knn_chunk_size = int(knn_chunk_size)
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
        check_blur_fits(self.sigma, None, self.image_size, "GRNR")
        self.blur = make_blur(self.sigma) if self.sigma > 0 else None
        if self.prior_source == "normal":  # per-layer banks of pooled normal features; filled by set_banks
            for layer, channels in enumerate(self.feature_extractor.out_dims):
                self.register_buffer(f"normal_bank_{layer}", torch.empty(0, int(channels)))
                self.register_buffer(f"bank_centre_{layer}", torch.zeros(int(channels)))
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
        if sigma < 0 or crop < 0:
            problems.append(f"blur_sigma and crop must be >= 0, got {sigma}, {crop}")
        if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
            problems.append(f"eps must be a finite number > 0 (the ridge of the 8x8 systems; 1e-6), got {eps!r}")
        elif eps < torch.finfo(torch.float32).eps:
            problems.append(
                f"eps must be at least the float32 machine epsilon {torch.finfo(torch.float32).eps:.3g} (the model "
                f"solves in float32, where a smaller ridge rounds away and repeated neighbours give NaN), got {eps!r}"
            )
        if chunk is not None and chunk < 1:
            problems.append(f"distance_chunk must be >= 1 or None, got {chunk}")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @staticmethod
    def _check_prior_args(prior_source: str, regression: bool, knn_chunk_size: int) -> None:
        problems = []
        if prior_source not in PRIOR_SOURCES:
            problems.append(
                f"prior_source must be one of {PRIOR_SOURCES} (the test image itself: zero-shot, the paper; a bank of "
                f"normal training features), got {prior_source!r}"
            )
        if not isinstance(regression, bool):
            problems.append(f"regression must be True or False, got {regression!r}")
        elif not regression and prior_source != "normal":
            problems.append(
                "regression=False (the distance to the nearest normal feature) needs a bank: prior_source='normal'"
            )
        if not (isinstance(knn_chunk_size, int) and knn_chunk_size >= 1):
            problems.append(f"knn_chunk_size must be an integer >= 1, got {knn_chunk_size!r}")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    # -------------------------------------------------------------------------------------------- banks
    def bank(self, layer: int) -> torch.Tensor:
        """The bank of pooled normal features of layer ``layer`` (its index), ``(M, C)``."""
        return getattr(self, f"normal_bank_{layer}")

    def bank_centre(self, layer: int) -> torch.Tensor:
        """The mean of the bank of layer ``layer``, ``(C,)``: the centre of the shortlist's matrix-product form."""
        return getattr(self, f"bank_centre_{layer}")

    @property
    def has_banks(self) -> bool:
        """Whether every layer has a non-empty bank (always ``True`` for ``prior_source="image"``, which needs none)."""
        if self.prior_source != "normal":
            return True
        return all(self.bank(layer).shape[0] > 0 for layer in range(len(self.feature_extractor.layers)))

    @property
    def bank_neighbours(self) -> int:
        """How many bank vectors each query needs: ``K`` for the regression (``λ > 0``), 1 otherwise."""
        return self.num_global_priors if self.regression and self.lam > 0 else 1

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's map of each layer, checked finite (a non-finite feature of finite images means non-finite
        backbone weights); the check is skipped while tracing."""
        features = self.feature_extractor(images)
        if not is_tracing():
            for layer, feature in zip(self.feature_extractor.layers, features, strict=True):
                check_finite(
                    "GRNR",
                    f"the backbone features of layer {layer!r}",
                    feature,
                    hint="The images are finite, so the backbone weights are not: check the weights file.",
                )
        return features

    def pooled_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 3×3-average-pooled feature map of each layer, ``(B, C, h, w)``, checked finite."""
        features = self.backbone_features(images)
        return [F.avg_pool2d(f, self.pool_kernel, stride=1, padding=self.pool_kernel // 2) for f in features]

    def bank_rows(self, images: torch.Tensor) -> torch.Tensor:
        """One row per (pre-processed) image: its pooled features of every layer, position by position (row-major),
        concatenated, ``(B, Σ_l h_l·w_l·C_l)``. :meth:`set_banks` cuts the rows of all normal images into the
        per-layer banks (``h_l·w_l`` bank vectors per image and layer)."""
        if tuple(images.shape[-2:]) != self.image_size:
            msg = (
                f"normal images are {images.shape[-2]}x{images.shape[-1]} after the pre-processor, but GRNR was built "
                f"for {self.image_size[0]}x{self.image_size[1]}: give the pre-processor a Resize to image_size."
            )
            raise ValueError(msg)
        b = images.shape[0]
        return torch.cat([p.flatten(2).transpose(1, 2).reshape(b, -1) for p in self.pooled_features(images)], dim=1)

    @torch.no_grad()
    def set_banks(self, rows: torch.Tensor, coreset_ratio: float | None = None) -> list[int]:
        """Cut :meth:`bank_rows` of the normal images ``(n, R)`` into the per-layer banks; returns the bank sizes.

        With ``coreset_ratio`` each bank is reduced by anomalib's greedy k-center coreset (``KCenterGreedy``, as
        Patchcore), from a fixed seed so that every process (DDP rank) and every rebuild selects the same rows.
        Each bank's mean is stored as the centre of the nearest-neighbour shortlist.
        """
        if self.prior_source != "normal":
            msg = "GRNR(prior_source='image') takes its priors from each test image and has no bank to set."
            raise ValueError(msg)
        grids = self.grid_sizes(self.image_size)
        sizes = [h * w * int(c) for (h, w), c in zip(grids, self.feature_extractor.out_dims, strict=True)]
        if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] != sum(sizes):
            msg = (
                f"bank rows must be (n >= 1 images, {sum(sizes)} values: the pooled features of every layer at "
                f"{self.image_size[0]}x{self.image_size[1]}), got {tuple(rows.shape)}."
            )
            raise ValueError(msg)
        check_finite("GRNR", "the pooled features of the normal images", rows, hint="Check the backbone weights.")
        needed = self.bank_neighbours
        banks = []
        parts = zip(rows.split(sizes, dim=1), self.feature_extractor.out_dims, strict=True)
        for layer, (part, channels) in enumerate(parts):
            bank = part.reshape(-1, int(channels)).float().contiguous()
            if coreset_ratio is not None and coreset_ratio < 1:
                from anomalib.models.components.sampling import KCenterGreedy

                sampler = KCenterGreedy(embedding=bank, sampling_ratio=coreset_ratio)
                # its random projection draws columns from numpy's global generator unless given one of its own
                sampler.model.random_state = np.random.RandomState(0)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    bank = sampler.sample_coreset().contiguous()
            if bank.shape[0] < needed:
                name = self.feature_extractor.layers[layer]
                msg = (
                    f"the bank of layer {name!r} holds {bank.shape[0]} normal feature vectors ({rows.shape[0]} images"
                    f"{f', coreset_ratio={coreset_ratio}' if coreset_ratio else ''}), fewer than the "
                    f"num_global_priors={needed} priors each query takes from it. Use more normal images "
                    "(normal_images), a larger coreset_ratio, or fewer num_global_priors."
                )
                raise ValueError(msg)
            banks.append(bank)
        for layer, bank in enumerate(banks):
            device = self.bank(layer).device
            setattr(self, f"normal_bank_{layer}", bank.to(device))
            self.bank_centre(layer).copy_(bank.double().mean(dim=0).float())
        return [int(b.shape[0]) for b in banks]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Resize the bank buffers to the stored banks before loading (their size depends on the training set), and
        refuse a non-finite bank (a corrupt checkpoint) naming it."""
        if self.prior_source == "normal":
            for layer in range(len(self.feature_extractor.layers)):
                key = f"{prefix}normal_bank_{layer}"
                stored = state_dict.get(key)
                if isinstance(stored, torch.Tensor) and stored.dim() == 2:
                    check_finite(
                        "GRNR",
                        f"the bank of normal features of layer {self.feature_extractor.layers[layer]!r} ({key})",
                        stored,
                        hint="The checkpoint is corrupt: fit the model again.",
                    )
                    setattr(self, f"normal_bank_{layer}", torch.empty_like(stored, device=self.bank(layer).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        self_priors = self.prior_source == "image"  # a bank's priors need no more cells than K per image
        cells = self.num_global_priors if self_priors else 0
        for layer, (h, w), (ch, cw) in zip(self.feature_extractor.layers, grids, self.cuts(image_size), strict=True):
            if min(h, w) < 2 or h <= 2 * ch or w <= 2 * cw or h * w <= cells:
                msg = (
                    f"Input {image_size[0]}x{image_size[1]} gives a {h}x{w} feature grid at layer {layer!r}: GRNR "
                    f"needs at least 2x2 cells, more than 2x the border cut ({ch}, {cw}) and more than "
                    f"num_global_priors={self.num_global_priors} cells. Use a larger image_size, fewer "
                    "num_global_priors, or earlier layers."
                    if self_priors
                    else f"Input {image_size[0]}x{image_size[1]} gives a {h}x{w} feature grid at layer {layer!r}: "
                    f"GRNR needs at least 2x2 cells and more than 2x the border cut ({ch}, {cw}). Use a larger "
                    "image_size or earlier layers."
                )
                raise ValueError(msg)
        band = self.crop_band(image_size)
        if image_size[0] <= 2 * band[0] or image_size[1] <= 2 * band[1]:
            msg = f"crop={self.crop} leaves nothing of a {image_size[0]}x{image_size[1]} input; lower crop."
            raise ValueError(msg)

    # -------------------------------------------------------------------------------------------- forward
    def scale_map(self, features: torch.Tensor, cut: tuple[int, int], layer: int = 0) -> torch.Tensor:
        """Residual map of one layer ``(B, C, h, w)`` → ``(B, 1, h, w)``: pooling, regression, border fill.

        ``layer`` (the layer's index) selects the bank of ``prior_source="normal"``.
        """
        pooled = F.avg_pool2d(features, self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        if self.prior_source == "image":
            residual = grnr_residual(pooled, self.num_global_priors, self.lam, self.eps, self.distance_chunk)
        else:
            residual = self.normal_residual(pooled, layer)
        return fill_border(residual, cut)

    def normal_residual(self, pooled: torch.Tensor, layer: int) -> torch.Tensor:
        """``prior_source="normal"``: per position, the regression with the ``K`` nearest bank vectors as its priors
        (``λ = 0``: no priors), or with ``regression=False`` the distance to the nearest bank vector;
        ``(B, C, h, w)`` → ``(B, 1, h, w)``."""
        b, c, h, w = pooled.shape
        query = pooled.flatten(2).transpose(1, 2)  # (B, N, C)
        if not self.regression:
            _, squared = nearest_bank_rows(
                query.reshape(-1, c), self.bank(layer), 1, self.bank_centre(layer), self.knn_chunk_size
            )
            return squared[:, 0].sqrt().reshape(b, 1, h, w)
        priors = None
        if self.lam > 0:
            found, _ = nearest_bank_rows(
                query.reshape(-1, c),
                self.bank(layer),
                self.num_global_priors,
                self.bank_centre(layer),
                self.knn_chunk_size,
            )
            priors = found.reshape(b, h * w, self.num_global_priors, c)
        residual = neighbourhood_regression(neighbourhood_support(pooled), query, priors, self.lam, self.eps)
        return residual.reshape(b, 1, h, w)

    def anomaly_map(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Upsampled, blurred per-layer maps, their product, the central crop with the band replicated."""
        fused = None
        for layer, (feature, cut) in enumerate(zip(features, self.cuts(image_size), strict=True)):
            layer_map = F.interpolate(
                self.scale_map(feature, cut, layer), size=image_size, mode="bilinear", align_corners=False
            )
            if self.blur is not None:
                layer_map = self.blur(layer_map)
            fused = layer_map if fused is None else fused * layer_map
        bh, bw = self.crop_band(image_size)
        if bh or bw:
            centre = fused[:, :, bh : image_size[0] - bh, bw : image_size[1] - bw]
            fused = F.pad(centre, (bw, bw, bh, bh), mode="replicate")
        return fused

    def _check_precision(self, images: torch.Tensor) -> None:
        """Refuse autocast and half-precision inputs: the residuals need float32 (module docstring)."""
        device_type = images.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            msg = (
                f"GRNR refuses to run under autocast ({device_type}, {dtype}): its regression residuals are small "
                "differences of large feature norms, which half precision loses. Run in float32: Engine/Trainer "
                "precision='32' (not 'bf16-mixed'/'16-mixed'), or call the model outside torch.autocast."
            )
            raise RuntimeError(msg)
        if images.dtype not in SOLVE_DTYPES:
            msg = f"GRNR runs in float32 (got {images.dtype} images); call model.float() and pass float32 images."
            raise TypeError(msg)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """``images (B, 3, H, W)`` (normalised) → anomaly map ``(B, 1, H, W)`` and image score = its max."""
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        if not is_tracing():
            self._check_precision(images)
            check_finite("GRNR", "the (normalised) images", images, hint="Check the input files.")
            if not self.has_banks:
                msg = (
                    "GRNR(prior_source='normal') has no bank of normal features yet: fit it first (Engine.fit / "
                    "anomalib train builds the banks from the normal training images in one pass, no gradient steps), "
                    "load a checkpoint of a fitted model, or call GRNR.build_banks(dataloader) with normal images."
                )
                raise ValueError(msg)
        features = self.backbone_features(images)
        if not is_tracing():
            self.check_image_size(image_size, [tuple(f.shape[-2:]) for f in features])
        anomaly_map = self.anomaly_map(features, image_size)
        return InferenceBatch(pred_score=reduce_max(anomaly_map), anomaly_map=anomaly_map)
