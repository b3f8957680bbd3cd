"""AGPNet's own parts: attention-guided noise, the image-region noise and mask, and the epoch ramps."""

import pytest
import torch

from anomalib_recon.models.image.agpnet.perturbation import (
    image_region_noise,
    min_max_normalize,
    top_fraction_mask,
    weighted_noise,
)
from anomalib_recon.models.image.agpnet.schedule import linear_ramp


def test_weighted_noise_follows_weight_map():
    tokens = torch.zeros(2, 4, 2000)
    weight = torch.tensor([[0.0, 1.0, 2.0, 0.1], [0.5, 0.0, 0.0, 3.0]])  # (B, L)
    out = weighted_noise(tokens, weight, generator=torch.Generator().manual_seed(2))
    std = out.std(dim=-1)
    torch.testing.assert_close(std, weight, rtol=0.08, atol=1e-6)
    fmap = torch.zeros(1, 3000, 2, 2)
    out_map = weighted_noise(fmap, torch.tensor([[[0.0, 1.0], [2.0, 0.0]]]), std=0.5)  # (B, H, W)
    torch.testing.assert_close(out_map.std(dim=1), torch.tensor([[[0.0, 0.5], [1.0, 0.0]]]), rtol=0.08, atol=1e-6)
    with pytest.raises(ValueError, match="does not broadcast"):
        weighted_noise(tokens, torch.ones(2, 5))


def test_image_region_noise_only_inside_mask():
    image = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:8, 4:8] = 1
    out = image_region_noise(image, mask, std=0.3, generator=torch.Generator().manual_seed(3))
    inside = mask.bool().expand_as(image)
    assert torch.equal(out[~inside], image[~inside])
    assert (out[inside] - image[inside]).std().item() == pytest.approx(0.3, rel=0.15)
    out2 = image_region_noise(image, mask[:, 0], std=0.3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, out2)  # (B, H, W) mask broadcast the same way


def test_min_max_normalize_per_sample():
    x = torch.stack([torch.arange(4.0).view(1, 2, 2), 10 + 5 * torch.arange(4.0).view(1, 2, 2)])
    out = min_max_normalize(x)
    expected = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 2, 2)
    torch.testing.assert_close(out, torch.stack([expected, expected]))
    assert torch.equal(min_max_normalize(torch.full((1, 3, 3), 5.0)), torch.zeros(1, 3, 3))


def test_top_fraction_mask_selects_highest():
    scores = torch.arange(10.0).view(1, 1, 2, 5).repeat(2, 1, 1, 1)
    mask = top_fraction_mask(scores, torch.tensor([0.3, 0.6]))
    assert mask.shape == scores.shape
    assert scores[0][mask[0]].tolist() == [7.0, 8.0, 9.0]
    assert sorted(scores[1][mask[1]].tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_linear_ramp_first_middle_last_epoch():
    assert linear_ramp(0.0, 1.0, 0, 11) == 0.0
    assert linear_ramp(0.0, 1.0, 5, 11) == 0.5
    assert linear_ramp(0.0, 1.0, 10, 11) == 1.0
    assert linear_ramp(0.6, 1.0, 99, 100) == 1.0  # exact at the last epoch, no rounding error
    assert linear_ramp(0.0, 1.0, 50, 11) == 1.0  # clamped past the end
    assert linear_ramp(2.0, 0.0, 1, 5) == pytest.approx(1.5)  # decreasing ramps work too


def test_linear_ramp_window_like_agpnet_mask_ratio():
    # 0.6 -> 1.0 between epochs 100 and 400 of 500
    assert linear_ramp(0.6, 1.0, 0, 500, begin_epoch=100, end_epoch=400) == 0.6
    assert linear_ramp(0.6, 1.0, 100, 500, begin_epoch=100, end_epoch=400) == 0.6
    assert linear_ramp(0.6, 1.0, 250, 500, begin_epoch=100, end_epoch=400) == pytest.approx(0.8)
    assert linear_ramp(0.6, 1.0, 450, 500, begin_epoch=100, end_epoch=400) == 1.0
    assert linear_ramp(0.0, 1.0, 3, None, end_epoch=4) == 0.75  # max_epochs not needed with end_epoch


def test_single_epoch_and_errors():
    assert linear_ramp(0.0, 1.0, 0, 1) == 1.0
    with pytest.raises(ValueError, match="max_epochs"):
        linear_ramp(0.0, 1.0, 0, None)
    with pytest.raises(ValueError, match="max_epochs"):
        linear_ramp(0.0, 1.0, 0, -1)  # Lightning's value when only max_steps is set
    with pytest.raises(ValueError, match="epoch must be"):
        linear_ramp(0.0, 1.0, -1, 10)
