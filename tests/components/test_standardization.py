"""components/standardization.py: per-channel statistics of many images, in any batching, against a brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalib_recon.components.standardization import STD_FLOOR, FeatureStandardization


class Toy(FeatureStandardization, nn.Module):
    """Raw features = a fixed 1x1 conv of the images (3 -> 4 channels), the last channel constant."""

    model_name = "Toy"

    def __init__(self, standardize_features: bool = True) -> None:
        super().__init__()
        self.in_channels, self.standardize_features = 4, standardize_features
        self.conv = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight[3].zero_()
            self.conv.bias[3] = 2.5
        self.register_feature_statistics()

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def _images(n: int, size: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 3 - 1


def test_statistics_equal_the_brute_force_over_all_pixels_in_any_batching() -> None:
    toy, images = Toy(), _images(5)
    assert not toy.feature_statistics_fitted
    assert toy.fit_feature_statistics([images[:2], images[2:3], images[3:]]) == 5
    pixels = toy.raw_features(images).double().permute(1, 0, 2, 3).reshape(4, -1)
    expected_std = pixels.std(dim=1, unbiased=False).clamp_min(STD_FLOOR)
    torch.testing.assert_close(toy.feature_mean.flatten().double(), pixels.mean(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(toy.feature_std.flatten().double(), expected_std, rtol=0, atol=1e-6)
    assert toy.feature_statistics_fitted and int(toy.feature_stats_count) == 5
    assert float(toy.feature_std.flatten()[3]) == pytest.approx(STD_FLOOR)  # a constant channel: centred, not divided
    standardized = toy.standardize(toy.raw_features(images))
    torch.testing.assert_close(standardized[:, :3].mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(standardized[:, :3].std(dim=(0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-4)
    assert set(toy.state_dict()) >= {"feature_mean", "feature_std", "feature_stats_count"}  # checkpoints carry them


def test_bad_statistics_are_refused_with_the_models_name() -> None:
    with pytest.raises(ValueError, match=r"^Toy: feature statistics got no images"):
        Toy().fit_feature_statistics([])
    broken = Toy()
    with torch.no_grad():
        broken.conv.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"^Toy: the feature statistics are NaN or inf"):
        broken.fit_feature_statistics([_images(2)])
    plain = Toy(standardize_features=False)
    assert plain.feature_statistics_fitted and "feature_mean" not in plain.state_dict()
    images = _images(1)
    assert torch.equal(plain.standardize(images), images)
    with pytest.raises(RuntimeError, match="standardize_features=True"):
        plain.set_feature_statistics(torch.ones(1, 9, dtype=torch.float64))
