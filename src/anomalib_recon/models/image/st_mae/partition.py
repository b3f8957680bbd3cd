"""ST-MAE's random disjoint token partition and the gathers that move tokens between subsets and positions.

A partition of ``L`` token positions is a permutation ``perm`` of ``0..L-1``: subset A is ``perm[:L/2]`` and subset
B is ``perm[L/2:]``; the ``i``-th position of A is paired with the ``i``-th position of B. Everything is a gather
with integer indices (no boolean indexing, no data-dependent shapes), so the fixed test-time partitions export to
ONNX/OpenVINO as constant ``Gather`` indices. Indices are either per sample ``(B, L)`` (training: a fresh partition
per image) or shared by the batch ``(L,)`` (inference).
"""

from __future__ import annotations

import torch

__all__ = [
    "fixed_partitions",
    "gather_tokens",
    "inverse_permutation",
    "random_partition",
    "restore_order",
    "subset_membership",
]


def random_partition(
    batch_size: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A uniformly random permutation of ``num_tokens`` positions per sample, ``(B, L)`` long.

    Its first half is subset A, its second half subset B (disjoint, equal sizes, together every position).
    """
    check_even(num_tokens)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    return noise.argsort(dim=1)


def fixed_partitions(count: int, num_tokens: int, seed: int) -> torch.Tensor:
    """``count`` permutations of ``num_tokens`` positions ``(count, L)`` drawn on the CPU from ``seed``.

    The same seed gives the same partitions on every machine and device (a CPU ``torch.Generator``), so test-time
    scores are reproducible and exportable (the permutations become constants of the graph).
    """
    check_even(num_tokens)
    if count < 1:
        msg = f"n_partitions must be >= 1, got {count}."
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(count)])


def check_even(num_tokens: int) -> None:
    """ST-MAE splits the tokens into two halves: their number must be even (and at least 2)."""
    if num_tokens < 2 or num_tokens % 2:
        msg = (
            f"ST-MAE splits the feature-patch tokens into two equal subsets, but there are {num_tokens}. Choose "
            "image_size, fusion_stride and patch_size so that the token grid has an even number of tokens, e.g. "
            "image_size 256, fusion_stride 4, patch_size 4 (16x16 tokens)."
        )
        raise ValueError(msg)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, L, D)`` at positions ``index``: ``(B, K)`` per sample or ``(K,)`` for all → ``(B, K, D)``."""
    if tokens.dim() != 3 or index.dim() not in (1, 2):
        msg = f"gather_tokens expects tokens (B, L, D) and index (B, K) or (K,), got {tuple(tokens.shape)}, " + str(
            tuple(index.shape)
        )
        raise ValueError(msg)
    if index.dim() == 1:
        return tokens.index_select(1, index)
    if index.shape[0] != tokens.shape[0]:
        msg = f"gather_tokens: index batch {index.shape[0]} differs from the tokens' batch {tokens.shape[0]}."
        raise ValueError(msg)
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[j]] = j`` along the last axis (``(L,)`` or ``(B, L)``)."""
    return perm.argsort(dim=-1)


def restore_order(tokens: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Tokens listed in the order of a permutation ``perm`` back at their positions: ``out[:, perm[j]] = tokens[:, j]``.

    ``inverse`` is :func:`inverse_permutation` of ``perm``.
    """
    return gather_tokens(tokens, inverse)


def subset_membership(perm: torch.Tensor) -> torch.Tensor:
    """Bool ``(…, L)``: True where a position belongs to subset A (the first half of ``perm``)."""
    return inverse_permutation(perm) < perm.shape[-1] // 2
