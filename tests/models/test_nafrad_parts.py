"""NAFRAD's own part of the loss: L1 between the segmentation probabilities and the mask."""

import pytest
import torch

from anomalib_recon.models.image.nafrad.loss import l1_loss_on_probs


def test_l1_loss_on_probs_value_and_reductions():
    p = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    y = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert l1_loss_on_probs(p, y).item() == pytest.approx(0.25)
    assert l1_loss_on_probs(p, y, reduction="sum").item() == pytest.approx(1.0)
    torch.testing.assert_close(l1_loss_on_probs(p, y, reduction="none"), (p - y).abs())


def test_l1_loss_on_probs_rejects_logits_and_shape_mismatch():
    y = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="apply a sigmoid"):
        l1_loss_on_probs(torch.full_like(y, 3.0), y)
    with pytest.raises(ValueError, match="shapes differ"):
        l1_loss_on_probs(torch.ones(1, 1, 2, 3), y)
