"""Tests for the multi-layer feature aggregator (C2)."""

import pytest
import torch
from torch.nn import functional as F

from anomalib_recon.components.aggregation import (
    FeatureAggregator,
    layer_norm_channels,
    map_to_tokens,
    smooth_map,
    tokens_to_map,
)


def _feats(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)]


def test_concat_of_same_size_maps_equals_torch_cat():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 7, 5, 5, generator=g)
    out = FeatureAggregator()([a, b])
    assert torch.equal(out, torch.cat([a, b], dim=1))


def test_concat_resizes_to_largest_map_and_counts_channels():
    feats = _feats()
    agg = FeatureAggregator(align_corners=True)
    out = agg(feats)
    assert out.shape == (2, 10, 8, 8)
    assert agg.output_channels([4, 6]) == 10
    expected_deep = F.interpolate(feats[1], size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out[:, 4:], expected_deep)
    torch.testing.assert_close(out[:, :4], feats[0])


def test_explicit_out_size_and_align_corners_matter():
    feats = _feats()
    a = FeatureAggregator(out_size=(16, 12), align_corners=True)(feats)
    b = FeatureAggregator(out_size=(16, 12), align_corners=False)(feats)
    assert a.shape == (2, 10, 16, 12)
    assert not torch.allclose(a, b)


def test_nafrad_layout_prepends_resized_image():
    feats = _feats()
    image = torch.rand(2, 3, 32, 32)
    agg = FeatureAggregator(out_size=8, align_corners=True, include_image=True)
    out = agg(feats, image=image)
    assert out.shape == (2, 3 + 4 + 6, 8, 8)
    assert agg.output_channels([4, 6]) == 13
    torch.testing.assert_close(out[:, :3], F.interpolate(image, size=(8, 8), mode="bilinear", align_corners=True))
    with pytest.raises(ValueError, match="pass the raw image"):
        agg(feats)


def test_smoothing_is_3x3_average_with_zero_padding_counted():
    x = torch.ones(1, 1, 4, 4)
    out = FeatureAggregator(smooth=True)([x])
    # interior pixels average nine ones, a corner sees four ones out of nine cells
    assert out[0, 0, 1, 1].item() == pytest.approx(1.0)
    assert out[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert out[0, 0, 0, 1].item() == pytest.approx(6 / 9)
    torch.testing.assert_close(smooth_map(x), out)


def test_layer_norm_is_per_position_without_affine():
    x = torch.randn(2, 5, 3, 3) * 4 + 2
    y = layer_norm_channels(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(2, 3, 3), atol=1e-3, rtol=0)
    out = FeatureAggregator(layer_norm=True)([x])
    torch.testing.assert_close(out, y)


def test_sum_and_mean_modes():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    b_up = F.interpolate(b, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(FeatureAggregator(mode="sum")([a, b]), a + b_up)
    torch.testing.assert_close(FeatureAggregator(mode="mean")([a, b]), (a + b_up) / 2)


def test_smallest_grid_with_area_pooling_averages_each_cell():
    g = torch.Generator().manual_seed(3)
    fine, coarse = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    out = FeatureAggregator(grid="smallest", resize_mode="area")([fine, coarse])
    assert out.shape == (2, 8, 4, 4)
    # brute force: each coarse cell is the mean of its 2x2 block of the fine map
    blocks = fine.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out[:, :3], blocks)
    torch.testing.assert_close(out[:, 3:], coarse)


def test_norm_after_resize_normalises_the_pooled_tokens():
    g = torch.Generator().manual_seed(4)
    fine, coarse = torch.randn(1, 6, 8, 8, generator=g) * 3 + 1, torch.randn(1, 6, 4, 4, generator=g) * 2
    after = FeatureAggregator(mode="sum", grid="smallest", resize_mode="area", layer_norm=True, norm_after_resize=True)
    before = FeatureAggregator(mode="sum", grid="smallest", resize_mode="area", layer_norm=True)
    pooled = F.adaptive_avg_pool2d(fine, (4, 4))
    torch.testing.assert_close(after([fine, coarse]), layer_norm_channels(pooled) + layer_norm_channels(coarse))
    # normalising at the fine resolution and then pooling is a different recipe: the pooled tokens lose variance
    before_pooled = before([fine, coarse]) - layer_norm_channels(coarse)
    assert float(before_pooled.var(dim=1, unbiased=False).mean()) < 0.9
    after_pooled = after([fine, coarse]) - layer_norm_channels(coarse)
    torch.testing.assert_close(after_pooled.var(dim=1, unbiased=False), torch.ones(1, 4, 4), atol=1e-3, rtol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="equal channel counts"):
        FeatureAggregator(mode="sum")(_feats())
    with pytest.raises(ValueError, match="mode must be one of"):
        FeatureAggregator(mode="max")
    with pytest.raises(ValueError, match="needs mode='concat'"):
        FeatureAggregator(mode="mean", include_image=True)
    with pytest.raises(ValueError, match="tokens_to_map"):
        FeatureAggregator()([torch.randn(2, 16, 8)])
    with pytest.raises(ValueError, match="batch size"):
        FeatureAggregator()([torch.randn(2, 4, 8, 8), torch.randn(3, 4, 8, 8)])
    with pytest.raises(ValueError, match="non-empty list"):
        FeatureAggregator()([])
    with pytest.raises(ValueError, match="grid must be"):
        FeatureAggregator(grid="middle")
    with pytest.raises(ValueError, match="resize_mode 'bilinear' or 'area'"):
        FeatureAggregator(resize_mode="nearest")


def test_tokens_map_round_trip():
    tokens = torch.randn(2, 12, 5)
    fmap = tokens_to_map(tokens, (3, 4))
    assert fmap.shape == (2, 5, 3, 4)
    # token index i = row * w + col
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[:, 1 * 4 + 2])
    assert torch.equal(map_to_tokens(fmap), tokens)
    assert tokens_to_map(torch.randn(1, 16, 2)).shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_map(torch.randn(1, 17, 2))
    with pytest.raises(ValueError, match="does not match"):
        tokens_to_map(tokens, (3, 3))
