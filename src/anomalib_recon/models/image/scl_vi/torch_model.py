"""SCL-VI torch model: from-scratch patch encoders, jigsaw/SVDD pair sampling, memory banks and affinity-kNN maps.

Paper: *SCL-VI: Self-supervised Context Learning for Visual Inspection*, arXiv 2311.06504; the hyperparameters and
details come from the authors' code (GitHub wangpeng000/VisualInspection, commit a593340, itself a modification of
Patch SVDD). Everything here works on images that are already standardised by the mean training image
(``x - mean_image`` in [0, 1] units, which equals the authors' ``(x_uint8 - mean_uint8) / 255``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_recon.components.anomaly_map import reduce_max
from anomalib_recon.components.tracing import is_tracing

PAPER_SCALES = (64, 32)
PAPER_STRIDES_256 = {64: 16, 32: 4}  # memory-bank / test grid strides at 256 px
NUM_CLASSES = 12

# The 12 relative-position classes of a pair (cell i, cell j) of the 3x3 grid, i above or left of j:
# (row_j - row_i, col_j - col_i) per class, in the order of the authors' pair table.
CLASS_OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 1),
    (1, 0),
    (0, 2),
    (2, 0),
    (1, 1),
    (1, -1),
    (1, 2),
    (1, -2),
    (2, 1),
    (2, -1),
    (2, 2),
    (2, -2),
)


# ------------------------------------------------------------------------------------------------ the pair table
def pair_table(rows_per_class: int = 12) -> torch.Tensor:
    """The balanced jigsaw pair table ``(12 * rows_per_class, 3)``: rows ``(cell i, cell j, class)``.

    All ordered pairs of the 3x3 grid (cells 0..8 row-major) with ``i`` before ``j``, grouped by their offset
    (:data:`CLASS_OFFSETS`), each class resampled cyclically to ``rows_per_class`` rows. With 12 rows every pair of
    a class appears equally often (its 6, 4, 3, 2 or 1 pairs divide 12). Replaces the authors' ``data.npy``.
    """
    rows: list[tuple[int, int, int]] = []
    for label, offset in enumerate(CLASS_OFFSETS):
        pairs = [(i, j) for i in range(9) for j in range(9) if i < j and (j // 3 - i // 3, j % 3 - i % 3) == offset]
        rows += [(*pairs[r % len(pairs)], label) for r in range(rows_per_class)]
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ sampling
def _uniform_int(low: int, high: int, shape: Sequence[int], device: torch.device, generator: torch.Generator | None):
    """Uniform integers in ``[low, high]`` (inclusive)."""
    return torch.randint(low, high + 1, tuple(shape), device=device, generator=generator)


def _nonzero_jitter(n: int, limit: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``(n, 2)`` integer jitters in ``[-limit, limit]^2``, never ``(0, 0)`` (redrawn until non-zero, as the code)."""
    if limit < 1:
        return torch.zeros(n, 2, dtype=torch.long, device=device)
    jitter = _uniform_int(-limit, limit, (n, 2), device, generator)
    zero = (jitter == 0).all(dim=1)
    while bool(zero.any()):
        jitter[zero] = _uniform_int(-limit, limit, (int(zero.sum()), 2), device, generator)
        zero = (jitter == 0).all(dim=1)
    return jitter


def jigsaw_grid(
    n: int, size: tuple[int, int], patch: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Top-left corners ``(n, 9, 2)`` (y, x) of the 3x3 jigsaw grid per sample, as the authors' pair sampler.

    Anchor uniform in ``[0, H-K] x [0, W-K]``; neighbour ``(dy, dx)`` at ``dir * (U{0..K/4-1} + 3K/4)`` per axis,
    clipped; cell 4 is the anchor moved by a non-zero jitter in ``[-K/32, K/32]^2``. The x and y jitters are drawn
    independently and the x coordinate uses the x jitter (the released code adds the *y* jitter to the *y*
    coordinate for both axes — that bug is fixed here).
    """
    height, width = size
    limit = torch.tensor([height - patch, width - patch], device=device)
    anchor = torch.stack(
        [
            _uniform_int(0, height - patch, (n,), device, generator),
            _uniform_int(0, width - patch, (n,), device, generator),
        ],
        dim=1,
    )
    directions = torch.tensor([(r - 1, c - 1) for r in range(3) for c in range(3)], device=device)  # (9, 2)
    spread = _uniform_int(0, patch // 4 - 1, (n, 9, 2), device, generator) + 3 * patch // 4
    cells = anchor[:, None, :] + directions[None] * spread
    cells[:, 4] = anchor + _nonzero_jitter(n, patch // 32, device, generator)
    return torch.minimum(cells.clamp_min(0), limit)


def svdd_positions(
    n: int, size: tuple[int, int], patch: int, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVDD pairs: ``p1`` uniform, ``p2 = p1 +`` a non-zero jitter in ``[-K/32, K/32]^2``, clipped (``(n, 2)`` each)."""
    height, width = size
    limit = torch.tensor([height - patch, width - patch], device=device)
    p1 = torch.stack(
        [
            _uniform_int(0, height - patch, (n,), device, generator),
            _uniform_int(0, width - patch, (n,), device, generator),
        ],
        dim=1,
    )
    p2 = torch.minimum((p1 + _nonzero_jitter(n, patch // 32, device, generator)).clamp_min(0), limit)
    return p1, p2


def crop(images: torch.Tensor, index: torch.Tensor, corners: torch.Tensor, patch: int) -> torch.Tensor:
    """Patches ``(n, C, K, K)``: ``images[index[m]]`` cropped at ``corners[m] = (y, x)``, by one gather.

    The gather reads the batch in place (no per-pair copy of the images).
    """
    batch, channels, height, width = images.shape
    offsets = torch.arange(patch, device=images.device)
    rows = corners[:, 0, None] + offsets  # (n, K)
    cols = corners[:, 1, None] + offsets
    flat = index[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]  # (n, K, K)
    source = images.transpose(0, 1).reshape(channels, batch * height * width)
    return source[:, flat.reshape(-1)].view(channels, len(index), patch, patch).transpose(0, 1)


def photometric_noise(
    patches: torch.Tensor, std: float = 0.02, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-channel shift N(0, std) plus per-pixel noise N(0, std), in standardised units (the authors' code)."""
    n, c, h, w = patches.shape
    shift = torch.randn(n, c, 1, 1, device=patches.device, generator=generator, dtype=patches.dtype)
    noise = torch.randn(n, c, h, w, device=patches.device, generator=generator, dtype=patches.dtype)
    return patches + std * shift + std * noise


# ------------------------------------------------------------------------------------------------ networks
def _channels(base: int, width: float) -> int:
    """``base * width`` rounded to a multiple of 8 (GroupNorm keeps 8 channels per group, as in the paper)."""
    return max(8, round(base * width / 8) * 8)


class DeepEncoder(nn.Module):
    """AlexNet-like 32x32-patch encoder with GroupNorm and cross-channel LRN: ``(N, 3, 32, 32) -> (N, D, 1, 1)``.

    ``width`` scales every hidden width (96, 256, 384, 384, 256, 128); 1.0 is the paper. **INFERRED**: the multiplier
    exists only to make CPU benchmarks affordable. GroupNorm keeps 8 channels per group at every width, as in the
    paper (12/96, 32/256, 48/384, 16/128, D/8).
    """

    def __init__(self, feature_dim: int = 64, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4, c5, c6 = (_channels(b, width) for b in (96, 256, 384, 384, 256, 128))
        lrn = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}  # x / (1 + alpha * avg5(x^2))^beta
        self.conv = nn.Sequential(
            nn.Conv2d(3, c1, 5),
            nn.GroupNorm(c1 // 8, c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.LocalResponseNorm(**lrn),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.GroupNorm(c2 // 8, c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 0),
            nn.LocalResponseNorm(**lrn),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.GroupNorm(c3 // 8, c3),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1),
            nn.GroupNorm(c4 // 8, c4),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1),
            nn.GroupNorm(c5 // 8, c5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(c5, c6, 2),
            nn.GroupNorm(c6 // 8, c6),
            nn.Conv2d(c6, feature_dim, 2),
            nn.GroupNorm(feature_dim // 8, feature_dim),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """32x32 patches -> tanh embeddings ``(N, D, 1, 1)``."""
        return torch.tanh(self.conv(x))


class HierEncoder(nn.Module):
    """64x64-patch encoder: the shared :class:`DeepEncoder` on the four 32x32 quadrants, then a 2x2 head."""

    def __init__(self, enc: DeepEncoder, feature_dim: int = 64) -> None:
        super().__init__()
        self.enc = enc
        self.conv1 = nn.Conv2d(feature_dim, 128, 2)
        self.conv2 = nn.Conv2d(128, feature_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """64x64 patches -> ``(N, D, 1, 1)``: quadrants -> D x 2 x 2 map -> Conv(2) -> LReLU(0.1) -> Conv(1) -> tanh."""
        n, half = x.shape[0], x.shape[-1] // 2
        quads = torch.cat([x[..., :half, :half], x[..., :half, half:], x[..., half:, :half], x[..., half:, half:]])
        h = self.enc(quads)
        top = torch.cat([h[:n], h[n : 2 * n]], dim=3)
        bottom = torch.cat([h[2 * n : 3 * n], h[3 * n :]], dim=3)
        h = self.conv1(torch.cat([top, bottom], dim=2))
        return torch.tanh(self.conv2(F.leaky_relu(h, 0.1)))


class SmallPatchEncoder(nn.Module):
    """The :class:`DeepEncoder` alone, for models built with ``scales=(32,)``.

    Holds it under the same name as :class:`HierEncoder` does (``enc``), so the shared encoder's state-dict keys do
    not depend on the scales, and no 64-px head is built that would never receive a gradient (DDP refuses those).
    """

    def __init__(self, enc: DeepEncoder) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """32x32 patches -> ``(N, D, 1, 1)``."""
        return self.enc(x)


class NormalizedLinear(nn.Module):
    """Linear layer whose weight is divided by its column norms *under* ``no_grad``, as in the authors' code.

    Because the normalised weight is computed without autograd, the weight never receives a gradient: it stays a
    fixed random (Kaiming-uniform) projection and only the bias trains. This is the authors' (inherited from Patch
    SVDD) behaviour, replicated deliberately for fidelity — a faithful-but-odd choice, flagged in the README. The
    weight is a parameter with ``requires_grad=False``, so optimisers and DDP (which refuses parameters that never
    receive a gradient) see what it is: a fixed projection.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (W / ||W||_col)^T + b`` with the normalised weight detached from the graph."""
        with torch.no_grad():
            weight = self.weight / self.weight.norm(dim=0, keepdim=True)
        return F.linear(x, weight, self.bias)


class PositionClassifier(nn.Module):
    """Position classifier on ``h1 - h2``: Linear(D,128) LReLU Linear(128,128) LReLU NormalizedLinear(128,12)."""

    def __init__(self, feature_dim: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = NormalizedLinear(128, num_classes)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 12)`` from two embeddings ``(N, D, 1, 1)``."""
        h = (h1 - h2).flatten(1)
        h = F.leaky_relu(self.fc1(h), 0.1)
        h = F.leaky_relu(self.fc2(h), 0.1)
        return self.fc3(h)


# ------------------------------------------------------------------------------------------------ scoring
def affinity_score(distances: torch.Tensor) -> torch.Tensor:
    """Affinity-weighted kNN score over the last axis (the authors' evaluation code); ``k = 1``: nearest distance.

    ``alpha_i = l_i / sum(l)`` (a zero sum counts as 1, ``alpha = 0`` is replaced by 1), ``beta_i = 1 / alpha_i``
    (``beta > 20`` replaced by 15), ``w = softmax(beta)``, score ``sum(w_i * l_i)``.
    """
    total = distances.sum(dim=-1, keepdim=True)
    total = torch.where(total == 0, torch.ones_like(total), total)
    alpha = distances / total
    alpha = torch.where(alpha == 0, torch.ones_like(alpha), alpha)
    beta = 1.0 / alpha
    beta = torch.where(beta > 20, torch.full_like(beta, 15.0), beta)
    return (torch.softmax(beta, dim=-1) * distances).sum(dim=-1)


def split_bits(feature_dim: int) -> int:
    """Bits of the coarse part in :func:`split_embeddings` for ``D``-dim embeddings in [-1, 1].

    The coarse parts are integers times ``2^-bits``; their squared distance needs sums of up to ``4 D 4^bits``
    such units, which fp32 holds exactly while ``4 D 4^bits <= 2^24`` (8 bits for D = 64).
    """
    return max(1, int((22 - math.log2(feature_dim)) // 2))


def split_embeddings(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = hi + lo`` exactly: ``hi`` rounded to the ``2^-bits`` grid, ``lo = x - hi`` (``|lo| <= 2^-bits-1``)."""
    scale = float(2**bits)
    hi = torch.round(x * scale) / scale
    return hi, x - hi


def bank_terms(bank: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bank-side factors of :func:`squared_distances`: ``[b_hi, b_lo]`` ``(M, 2D)``, ``||b_hi||^2`` and
    ``||b_lo||^2 + 2 b_hi.b_lo`` ``(M,)``. ``b = b_hi + b_lo`` exactly, so the rows are recovered from the first."""
    hi, lo = split_embeddings(bank, bits)
    return torch.cat([hi, lo], dim=1), hi.pow(2).sum(-1), lo.pow(2).sum(-1) + 2 * (hi * lo).sum(-1)


def query_terms(queries: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query-side factors of :func:`squared_distances`: ``[q_hi, 0]``, ``[q_lo, q]`` ``(Q, 2D)``, ``||q_hi||^2`` and
    ``||q_lo||^2 + 2 q_hi.q_lo`` ``(Q, 1)``."""
    hi, lo = split_embeddings(queries, bits)
    return (
        torch.cat([hi, torch.zeros_like(hi)], dim=1),
        torch.cat([lo, queries], dim=1),
        hi.pow(2).sum(-1, keepdim=True),
        lo.pow(2).sum(-1, keepdim=True) + 2 * (hi * lo).sum(-1, keepdim=True),
    )


def squared_distances(queries: tuple[torch.Tensor, ...], bank: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``||q - b||^2`` ``(Q, M)`` by matrix products, without the cancellation of ``||q||^2 + ||b||^2 - 2 q.b``.

    The textbook form subtracts numbers of size ``||q||^2 ~ 40`` (tanh embeddings, D = 64) to get squared
    distances of ``1e-4`` and below: in fp32 it is off by up to ~5e-5, enough to rank the wrong rows as nearest
    neighbours, and differently in torch, ONNX Runtime and OpenVINO (their matrix products sum in different
    orders). Here each embedding is split into ``hi + lo`` (:func:`split_embeddings`) and

        ||q - b||^2 = ||q_hi - b_hi||^2 + 2 (q_hi - b_hi).(q_lo - b_lo) + ||q_lo - b_lo||^2.

    The first term, ``||q_hi||^2 + ||b_hi||^2 - 2 [q_hi, 0].[b_hi, b_lo]``, is computed exactly (integers on the
    ``4^-bits`` grid below fp32's 2^24, so every summation order gives the same bits); the rest, ``a(q) + c(b) -
    2 [q_lo, q].[b_hi, b_lo]``, is small (``|lo| <= 2^-bits-1``) and rounds to ~1e-8. Both products read the same
    bank matrix ``[b_hi, b_lo]``, the only bank-sized tensor an exported graph holds (OpenVINO folds it into a
    constant of twice the bank). The result is within ~1e-7 of float64 for near neighbours in every backend, for
    four times the multiply-adds of the textbook form.

    Args:
        queries: :func:`query_terms` of ``(Q, D)`` embeddings in [-1, 1].
        bank: :func:`bank_terms` of the bank ``(M, D)``.
    """
    coarse_q, fine_q, q_hi_sq, q_a = queries
    hilo, b_hi_sq, b_c = bank
    coarse = torch.addmm(b_hi_sq[None], coarse_q, hilo.T, alpha=-2).add_(q_hi_sq)  # exact
    fine = torch.addmm(b_c[None], fine_q, hilo.T, alpha=-2).add_(q_a)
    return coarse.add_(fine).clamp_min_(0)


def knn_distances(
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = 65536, query_block: int = 1024
) -> torch.Tensor:
    """The ``k`` nearest L2 distances ``(Q, k)``, ascending, of ``queries (Q, D)`` in ``bank (M, D)``.

    The bank is scanned in blocks of ``chunk_size`` rows with a running top-k of the nearest rows themselves, in
    eager mode and in exported graphs alike: the block loop is unrolled at export, so an exported model holds at
    most ``Q x chunk_size`` distances per image, and each block's rows are read from that block only (no
    bank-wide gather that would keep a second copy of the bank in the graph). In eager mode the queries also go in
    blocks of ``query_block``. Rows are ranked by the accurate matrix-product form (:func:`squared_distances`) and
    the returned distances are recomputed as ``||q - b||`` from the rows found.
    """
    rows, dim = bank.shape
    k = min(k, rows)
    bits = split_bits(dim)
    blocks = [queries] if is_tracing() else list(queries.split(query_block))
    terms = [query_terms(block, bits) for block in blocks]
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(blocks)  # (squared distances, rows)
    for start in range(0, rows, chunk_size):
        chunk = bank_terms(bank[start : start + chunk_size], bits)
        width = min(k, chunk[0].shape[0])
        for n, block_terms in enumerate(terms):
            values, index = squared_distances(block_terms, chunk).topk(width, dim=1, largest=False)
            found = chunk[0][index]  # (Qb, width, 2D): the rows [hi, lo]
            previous = best[n]
            if previous is not None:
                values, found = torch.cat([previous[0], values], dim=1), torch.cat([previous[1], found], dim=1)
                keep = values.topk(k, dim=1, largest=False).indices
                values = values.gather(1, keep)
                found = found.gather(1, keep[..., None].expand(-1, -1, found.shape[-1]))
            best[n] = (values, found)
    found = torch.cat([b[1] for b in best if b is not None])
    neighbours = found[..., :dim] + found[..., dim:]  # hi + lo = the bank rows, exactly
    distances = (queries[:, None, :] - neighbours).pow(2).sum(-1).sqrt()
    return distances.sort(dim=1).values


def distribute_scores(scores: torch.Tensor, patch: int, stride: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch scores ``(B, gh, gw)`` -> map ``(B, 1, H, W)``: each score added to its K x K footprint, divided by count.

    A transposed convolution with a ones kernel (ONNX/OpenVINO friendly). Pixels no patch covers get 0.
    """
    ones = torch.ones(1, 1, patch, patch, dtype=scores.dtype, device=scores.device)
    grid = scores[:, None]
    total = F.conv_transpose2d(grid, ones, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(grid[:1]), ones, stride=stride)
    pad = (0, size[1] - total.shape[-1], 0, size[0] - total.shape[-2])
    return F.pad(total, pad) / F.pad(count, pad).clamp_min(1)


def patch_grid(images: torch.Tensor, patch: int, stride: tuple[int, int]) -> torch.Tensor:
    """All ``patch x patch`` windows at ``stride``: ``(B, 3, H, W) -> (B * gh * gw, 3, K, K)`` (row-major grid)."""
    windows = images.unfold(2, patch, stride[0]).unfold(3, patch, stride[1])  # (B, C, gh, gw, K, K)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], patch, patch)


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class TrainOutputs:
    """What the loss needs, per scale ``K``: position logits and labels, and the two SVDD embeddings."""

    logits: dict[int, torch.Tensor]
    labels: dict[int, torch.Tensor]
    svdd: dict[int, tuple[torch.Tensor, torch.Tensor]]


class SCLVIModel(nn.Module):
    """SCL-VI: encoders + classifiers (training) and mean image + memory banks + affinity-kNN maps (inference).

    Args:
        image_size: Model input size (H, W) after the pre-processor's Resize; the mean image and grids use it.
        feature_dim: Embedding size D (64).
        width: Hidden-width multiplier of the DeepEncoder (1.0 = paper; **INFERRED**, for CPU budgets).
        scales: Patch sizes used in training and scoring, a subset of ``(64, 32)`` (both = paper). Only the
            encoders and classifiers of these scales are built.
        strides: Grid stride per scale for the memory bank and the test grid, ``{K: s}``. ``None`` = the paper's
            16 (K=64) and 4 (K=32) at 256 px, scaled with the input size (``H/16`` and ``H/64``).
        k: Nearest neighbours of the affinity score (5; 1 = plain Patch SVDD).
        pair_batch_size: Pairs per sub-task and scale per training step (64 in the paper).
        knn_chunk_size: Bank rows per block of the exact kNN search, in eager mode and in exported graphs.
        patch_batch_size: Patches per encoder call when embedding a grid (eager only; bounds memory).
        noise_std: Photometric noise std on jigsaw patches (0.02).
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        image_size: tuple[int, int] = (256, 256),
        feature_dim: int = 64,
        width: float = 1.0,
        scales: Sequence[int] = PAPER_SCALES,
        strides: dict[int, int | Sequence[int]] | None = None,
        k: int = 5,
        pair_batch_size: int = 64,
        knn_chunk_size: int = 65536,
        patch_batch_size: int = 2048,
        noise_std: float = 0.02,
    ) -> None:
        super().__init__()
        scales = tuple(int(s) for s in scales)
        if not scales or len(set(scales)) != len(scales) or not set(scales) <= set(PAPER_SCALES):
            msg = f"scales must be a non-empty subset of {PAPER_SCALES} (the encoders' patch sizes), got {scales}."
            raise ValueError(msg)
        if feature_dim < 8 or feature_dim % 8:
            msg = f"feature_dim must be a positive multiple of 8 (GroupNorm(D/8, D)), got {feature_dim}."
            raise ValueError(msg)
        if k < 1 or pair_batch_size < 1 or width <= 0 or knn_chunk_size < 1 or patch_batch_size < 1:
            msg = (
                "need k >= 1, pair_batch_size >= 1, width > 0, knn_chunk_size >= 1 and patch_batch_size >= 1; got "
                f"{k}, {pair_batch_size}, {width}, {knn_chunk_size}, {patch_batch_size}."
            )
            raise ValueError(msg)
        self.scales = scales
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.strides = resolve_strides(self.image_size, scales, strides)
        self.feature_dim = int(feature_dim)
        self.k = int(k)
        self.pair_batch_size = int(pair_batch_size)
        self.knn_chunk_size = int(knn_chunk_size)
        self.patch_batch_size = int(patch_batch_size)
        self.noise_std = float(noise_std)
        self.use_svdd = True  # False skips the SVDD pairs (jigsaw-only ablation, svdd_weight = 0)

        deep = DeepEncoder(feature_dim, width)
        # enc.enc = the DeepEncoder (K = 32); the 64-px head exists only when K = 64 is a scale
        self.enc = HierEncoder(deep, feature_dim) if 64 in scales else SmallPatchEncoder(deep)
        self.classifiers = nn.ModuleDict({str(s): PositionClassifier(feature_dim) for s in scales})
        self.register_buffer("pair_table", pair_table(), persistent=False)
        self.register_buffer("mean_image", torch.zeros(1, 3, *self.image_size))
        self.register_buffer("mean_ready", torch.tensor(False))
        # training steps taken, and the step count the banks were built at (stale banks are rebuilt)
        self.register_buffer("trained_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("bank_steps", torch.tensor(-1, dtype=torch.long))
        for s in scales:
            self.register_buffer(f"memory_bank_{s}", torch.empty(0, feature_dim))

    # -------------------------------------------------------------------------------------------- helpers
    def encoder(self, patch: int) -> nn.Module:
        """The encoder of a scale: the hierarchical one for 64, its DeepEncoder for 32."""
        return self.enc if patch == 64 else self.enc.enc

    def memory_bank(self, patch: int) -> torch.Tensor:
        """The memory bank ``(M, D)`` of a scale."""
        return getattr(self, f"memory_bank_{patch}")

    @property
    def has_memory_bank(self) -> bool:
        """Whether every scale has a non-empty memory bank."""
        return all(self.memory_bank(s).shape[0] > 0 for s in self.scales)

    @property
    def bank_is_current(self) -> bool:
        """Whether the banks exist and were built after the last training step (buffers, so snapshots know too)."""
        return self.has_memory_bank and int(self.bank_steps) == int(self.trained_steps)

    def grid_shape(self, patch: int) -> tuple[int, int]:
        """Windows ``(gh, gw)`` of a scale's grid on an input-size image."""
        stride = self.strides[patch]
        return (self.image_size[0] - patch) // stride[0] + 1, (self.image_size[1] - patch) // stride[1] + 1

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        """``x - mean_image`` (the authors' ``(x - mean) / 255`` in uint8 units)."""
        return images - self.mean_image

    def set_mean_image(self, mean: torch.Tensor) -> None:
        """Store the per-pixel mean training image ``(1, 3, H, W)`` (or ``(3, H, W)``) at the input size."""
        mean = mean.reshape(-1, *mean.shape[-3:])
        if tuple(mean.shape) != tuple(self.mean_image.shape):
            msg = f"the mean image must be {tuple(self.mean_image.shape)}, got {tuple(mean.shape)}."
            raise ValueError(msg)
        self.mean_image.copy_(mean)
        self.mean_ready.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Resize the memory-bank buffers to the stored banks before loading them (their size is data-dependent)."""
        for s in self.scales:
            key = f"{prefix}memory_bank_{s}"
            if key in state_dict:
                setattr(self, f"memory_bank_{s}", torch.empty_like(state_dict[key], device=self.mean_image.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -------------------------------------------------------------------------------------------- training
    def sample_pairs(
        self, images: torch.Tensor, patch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Jigsaw pairs of one scale from standardised images (no noise yet).

        Returns ``(image_index, corner_i, corner_j, label, cells)``: pair ``m`` crops ``images[image_index[m]]`` at
        ``corner_i[m]`` and ``corner_j[m]`` (y, x); ``label`` is the row's class; ``cells`` the full 3x3 grids.
        Pairs cycle over the batch's images (``pair_batch_size`` pairs, image ``m % B``).
        """
        n, device = self.pair_batch_size, images.device
        index = torch.arange(n, device=device) % images.shape[0]
        cells = jigsaw_grid(n, tuple(images.shape[-2:]), patch, device, generator)
        rows = self.pair_table[_uniform_int(0, len(self.pair_table) - 1, (n,), device, generator)]
        arange = torch.arange(n, device=device)
        return index, cells[arange, rows[:, 0]], cells[arange, rows[:, 1]], rows[:, 2], cells

    def training_outputs(self, images: torch.Tensor, generator: torch.Generator | None = None) -> TrainOutputs:
        """Sample jigsaw and SVDD pairs at every scale from standardised images and run encoders and classifiers."""
        logits, labels, svdd = {}, {}, {}
        size = tuple(images.shape[-2:])
        for patch in self.scales:
            enc = self.encoder(patch)
            index, c1, c2, label, _ = self.sample_pairs(images, patch, generator)
            p1 = photometric_noise(crop(images, index, c1, patch), self.noise_std, generator)
            p2 = photometric_noise(crop(images, index, c2, patch), self.noise_std, generator)
            h = enc(torch.cat([p1, p2]))
            logits[patch] = self.classifiers[str(patch)](h[: len(index)], h[len(index) :])
            labels[patch] = label
            if not self.use_svdd:
                continue
            s1, s2 = svdd_positions(len(index), size, patch, images.device, generator)
            h = enc(torch.cat([crop(images, index, s1, patch), crop(images, index, s2, patch)]))
            svdd[patch] = (h[: len(index)].flatten(1), h[len(index) :].flatten(1))
        return TrainOutputs(logits=logits, labels=labels, svdd=svdd)

    # -------------------------------------------------------------------------------------------- memory banks
    def embed_grid(self, images: torch.Tensor, patch: int) -> torch.Tensor:
        """Embeddings ``(B, gh, gw, D)`` of every ``patch`` window of standardised images at the scale's stride."""
        stride = self.strides[patch]
        gh = (images.shape[-2] - patch) // stride[0] + 1
        gw = (images.shape[-1] - patch) // stride[1] + 1
        windows = patch_grid(images, patch, stride)
        enc = self.encoder(patch)
        if is_tracing() or windows.shape[0] <= self.patch_batch_size:
            h = enc(windows)
        else:
            h = torch.cat([enc(w) for w in windows.split(self.patch_batch_size)])
        return h.reshape(images.shape[0], gh, gw, self.feature_dim)

    @torch.no_grad()
    def bank_rows(self, images: torch.Tensor) -> torch.Tensor:
        """One row per (un-standardised, input-size) image: its window embeddings of every scale, flattened.

        The row of an image is ``[grid_64 (gh*gw*D), grid_32 (...)]`` in the order of :attr:`scales`;
        :meth:`set_memory_banks` cuts the rows of all training images into the per-scale banks. Each image's
        windows are embedded in calls of their own, so a row does not depend on which images share its batch
        (batch size, DDP sharding): convolution kernels may choose another algorithm, and round differently, for
        another batch shape, and the encoder amplifies such float noise (~30x measured).
        """
        x = self.standardize(images)
        return torch.stack([torch.cat([self.embed_grid(image[None], s).flatten() for s in self.scales]) for image in x])

    @torch.no_grad()
    def set_memory_banks(self, rows: torch.Tensor, coreset_ratio: float | None = None) -> dict[int, int]:
        """Cut :meth:`bank_rows` of the training images ``(N, R)`` into the per-scale banks; returns the bank sizes.

        With ``coreset_ratio`` each bank is reduced by anomalib's greedy k-center coreset, started from a fixed
        seed so every process (DDP rank) and every rebuild selects the same rows.
        """
        if rows.ndim != 2 or rows.shape[0] == 0:
            msg = f"expected bank rows (N >= 1, R), got {tuple(rows.shape)}."
            raise ValueError(msg)
        sizes = [math.prod(self.grid_shape(s)) * self.feature_dim for s in self.scales]
        if rows.shape[1] != sum(sizes):
            msg = (
                f"bank rows have {rows.shape[1]} values per image; the grids of scales {self.scales} need {sum(sizes)}."
            )
            raise ValueError(msg)
        for s, part in zip(self.scales, rows.split(sizes, dim=1), strict=True):
            bank = part.reshape(-1, self.feature_dim)
            if coreset_ratio is not None and coreset_ratio < 1:
                from anomalib.models.components.sampling import KCenterGreedy

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    bank = KCenterGreedy(embedding=bank, sampling_ratio=coreset_ratio).sample_coreset()
            setattr(self, f"memory_bank_{s}", bank.contiguous())
        self.bank_steps.copy_(self.trained_steps)
        return {s: int(self.memory_bank(s).shape[0]) for s in self.scales}

    # -------------------------------------------------------------------------------------------- inference
    def scale_map(self, images: torch.Tensor, patch: int) -> torch.Tensor:
        """Anomaly map ``(B, 1, H, W)`` of one scale from standardised images: affinity-kNN, then distributed."""
        grid = self.embed_grid(images, patch)
        b, gh, gw, d = grid.shape
        distances = knn_distances(grid.reshape(-1, d), self.memory_bank(patch), self.k, self.knn_chunk_size)
        scores = affinity_score(distances).reshape(b, gh, gw)
        return distribute_scores(scores, patch, self.strides[patch], tuple(images.shape[-2:]))

    def scale_maps(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-scale maps of raw (un-standardised) input images, after the model-specific input checks."""
        self.check_input(images)
        x = self.standardize(images)
        return {s: self.scale_map(x, s) for s in self.scales}

    def check_input(self, images: torch.Tensor) -> None:
        """The input size the model was built for, and a memory bank to score against (one clear error each).

        Raw-image checks (dtype, channels, value range, NaN) are the shared ones of every model, applied before the
        pre-processor.
        """
        expected = (3, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            msg = (
                f"SCLVI was built for (B, 3, {self.image_size[0]}, {self.image_size[1]}) inputs (its mean image and "
                f"memory-bank grids), got {tuple(images.shape)}: resize to image_size first (the default "
                "pre-processor does)."
            )
            raise ValueError(msg)
        if not self.has_memory_bank:
            msg = (
                "SCLVI has no memory bank yet: fit the model first (Engine.fit builds the banks from the training "
                "images after training), or load a checkpoint of a fitted model."
            )
            raise ValueError(msg)

    def forward(self, images: torch.Tensor) -> TrainOutputs | InferenceBatch:
        """Train mode: jigsaw/SVDD outputs of standardised images; eval mode: product map and max image score."""
        if self.training:
            return self.training_outputs(self.standardize(images))
        maps = self.scale_maps(images)
        anomaly_map = maps[self.scales[0]]
        for s in self.scales[1:]:
            anomaly_map = anomaly_map * maps[s]
        return InferenceBatch(pred_score=reduce_max(anomaly_map), anomaly_map=anomaly_map)


def resolve_strides(
    size: tuple[int, int], scales: Sequence[int], strides: dict[int, int | Sequence[int]] | None
) -> dict[int, tuple[int, int]]:
    """Per-scale (sy, sx) strides; ``None`` = the paper's 16 / 4 at 256 px scaled with the size (needs H, W % 64 == 0).

    Raises one ``ValueError`` naming ``image_size`` when a patch does not fit or the grid does not tile the image.
    """
    height, width = size
    if min(size) < max(scales):
        msg = f"image_size {height}x{width} is smaller than the {max(scales)}-px patches of scales {tuple(scales)}."
        raise ValueError(msg)
    out: dict[int, tuple[int, int]] = {}
    for s in scales:
        if strides is not None and (s in strides or str(s) in strides):
            value = strides[s] if s in strides else strides[str(s)]  # type: ignore[index]
            pair = (int(value), int(value)) if isinstance(value, int | float) else tuple(int(v) for v in value)
        else:
            if height % 64 or width % 64:
                msg = (
                    f"image_size {height}x{width} is not supported with the default strides: use multiples of 64 "
                    "(strides 16/4 at 256 px scale with the size), or pass strides={64: s64, 32: s32}."
                )
                raise ValueError(msg)
            base = PAPER_STRIDES_256[s]
            pair = (max(1, base * height // 256), max(1, base * width // 256))
        if min(pair) < 1 or (height - s) % pair[0] or (width - s) % pair[1]:
            msg = (
                f"image_size {height}x{width} with stride {pair} for {s}-px patches does not tile the image: "
                f"(size - {s}) must be a multiple of the stride."
            )
            raise ValueError(msg)
        out[s] = pair  # type: ignore[assignment]
    return out
