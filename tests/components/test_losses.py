"""Tests for the loss library (C13)."""

import math

import pytest
import torch
from torch.nn import functional as F

from anomalib_recon.components.losses import cosine_distance, dice_loss, focal_loss_on_probs, mse_loss


def test_cosine_distance_identical_zero_opposite_two():
    a = torch.randn(2, 8, 4, 4)
    assert cosine_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_distance(a, -a, per_token=False).item() == pytest.approx(2.0, abs=1e-6)
    # orthogonal channel vectors -> 1
    x = torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1)
    y = torch.tensor([[0.0, 3.0]]).view(1, 2, 1, 1)
    assert cosine_distance(x, y).item() == pytest.approx(1.0, abs=1e-6)


def test_cosine_distance_per_token_vs_global_differ_and_match_manual():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    manual_local = (1 - F.cosine_similarity(a, b, dim=1)).mean()
    manual_global = (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
    torch.testing.assert_close(cosine_distance(a, b), manual_local)
    torch.testing.assert_close(cosine_distance(a, b, per_token=False), manual_global)
    assert not torch.allclose(manual_local, manual_global)
    # tokens layout (B, L, C) with dim=-1 equals the map layout
    tokens_a, tokens_b = a.flatten(2).transpose(1, 2), b.flatten(2).transpose(1, 2)
    torch.testing.assert_close(cosine_distance(tokens_a, tokens_b, dim=-1), manual_local)
    assert cosine_distance(a, b, reduction="none").shape == (2, 2, 2)


def test_mse_loss_matches_torch():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(mse_loss(a, b), F.mse_loss(a, b))
    torch.testing.assert_close(mse_loss(a, b, reduction="sum"), F.mse_loss(a, b, reduction="sum"))


def test_focal_reduces_to_bce_with_gamma_zero():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(2, 1, 5, 5, generator=g) * 0.98 + 0.01
    y = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    torch.testing.assert_close(focal_loss_on_probs(p, y, gamma=0), F.binary_cross_entropy(p, y))


def test_focal_down_weights_easy_examples():
    y = torch.ones(2)
    p = torch.tensor([0.9, 0.3])  # easy, hard
    bce = F.binary_cross_entropy(p, y, reduction="none")
    focal = focal_loss_on_probs(p, y, gamma=4, reduction="none")
    torch.testing.assert_close(focal, bce * (1 - p) ** 4)
    ratio = focal / bce
    assert ratio[0] < 1e-3 < ratio[1]
    # clamp keeps it finite at p in {0, 1}
    edge = focal_loss_on_probs(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), gamma=2)
    assert torch.isfinite(edge)
    assert edge.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


def test_dice():
    p = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    y = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # dice: inter 1.5, sums 2 + 2, smooth 1 -> 1 - 4/5
    assert dice_loss(p, y).item() == pytest.approx(1 - 4 / 5)
    assert dice_loss(y, y, smooth=0.0).item() == pytest.approx(0.0)
    assert dice_loss(torch.zeros_like(y), torch.zeros_like(y)).item() == pytest.approx(0.0)


def test_clear_errors_on_bad_input():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_distance(a, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        mse_loss(a, a.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    with pytest.raises(ValueError, match="NaN or inf"):
        cosine_distance(a, torch.full_like(a, float("inf")))
    with pytest.raises(ValueError, match="apply a sigmoid"):
        focal_loss_on_probs(torch.randn(4) * 5, torch.ones(4))
    with pytest.raises(ValueError, match="apply a sigmoid"):
        dice_loss(torch.tensor([float("nan")]), torch.ones(1))
    with pytest.raises(ValueError, match="reduction"):
        cosine_distance(a, a, reduction="avg")
