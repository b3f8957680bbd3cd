"""Tests for perturbations, masking and token partitions (C8, C9)."""

import pytest
import torch

from anomalib_recon.components.perturbation import (
    gather_tokens,
    gaussian_feature_noise,
    image_region_noise,
    min_max_normalize,
    norm_scaled_jitter,
    random_partition,
    random_token_mask,
    restore_order,
    scatter_tokens,
    token_mask,
    top_fraction_mask,
    weighted_noise,
)


def test_gaussian_feature_noise_std_and_determinism():
    f = torch.zeros(4, 8, 16, 16)
    out = gaussian_feature_noise(f, 0.5, generator=torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(0.5, rel=0.05)
    again = gaussian_feature_noise(f, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(gaussian_feature_noise(f, 0.0), f)


def test_norm_scaled_jitter_magnitude_scales_with_token_norm():
    d = 64
    tokens = torch.ones(2, 500, d)
    tokens[1] *= 10  # 10x the norm
    out = norm_scaled_jitter(tokens, scale=20.0, generator=torch.Generator().manual_seed(0))
    noise = out - tokens
    # expected std per element = ||tok|| / D * scale = sqrt(D) * c / D * 20
    expected0 = (d**0.5) / d * 20
    assert noise[0].std().item() == pytest.approx(expected0, rel=0.05)
    assert noise[1].std().item() == pytest.approx(10 * expected0, rel=0.05)
    unchanged = norm_scaled_jitter(tokens, prob=0.0)
    assert torch.equal(unchanged, tokens)


def test_norm_scaled_jitter_prob_is_per_sample():
    tokens = torch.ones(200, 3, 4)
    out = norm_scaled_jitter(tokens, prob=0.5, generator=torch.Generator().manual_seed(1))
    jittered = (out != tokens).flatten(1).any(dim=1)
    assert 60 < int(jittered.sum()) < 140
    assert torch.equal(out[~jittered], tokens[~jittered])


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


def test_token_mask_replaces_only_masked_and_passes_gradient():
    tokens = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, False, True, False], [False] * 5])
    mask_token = torch.zeros(3, requires_grad=True)
    out = token_mask(tokens, mask, mask_token)
    assert torch.equal(out[~mask], tokens[~mask])
    assert torch.equal(out[mask], torch.zeros(2, 3))
    out.sum().backward()
    torch.testing.assert_close(mask_token.grad, torch.full((3,), 2.0))  # two masked positions
    with pytest.raises(ValueError, match="mask_token"):
        token_mask(tokens, mask, torch.zeros(4))
    with pytest.raises(ValueError, match=r"mask \(B, L\)"):
        token_mask(tokens, mask[:, :4], mask_token)


def test_random_token_mask_exact_counts():
    g = torch.Generator().manual_seed(4)
    mask = random_token_mask(6, 256, 0.3, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (6, 256)
    assert mask.sum(dim=1).tolist() == [round(0.3 * 256)] * 6
    assert not torch.equal(mask[0], mask[1])  # positions differ per sample
    ratios = torch.tensor([0.0, 0.5, 0.999, 1.0])
    floor_mask = random_token_mask(4, 10, ratios, generator=g, rounding="floor")
    assert floor_mask.sum(dim=1).tolist() == [0, 5, 9, 10]
    assert random_token_mask(4, 10, ratios, generator=g).sum(dim=1).tolist() == [0, 5, 10, 10]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        random_token_mask(2, 10, 1.5)
    with pytest.raises(ValueError, match=r"\(3,\) tensor"):
        random_token_mask(3, 10, torch.rand(2))


def test_random_partition_is_permutation_and_round_trips():
    b, length, d = 3, 12, 5
    subsets, inverse = random_partition(b, length, n_subsets=3, generator=torch.Generator().manual_seed(5))
    assert len(subsets) == 3 and all(s.shape == (b, 4) for s in subsets)
    perm = torch.cat(subsets, dim=1)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(length).expand(b, -1))
    assert torch.equal(torch.gather(perm, 1, inverse), torch.arange(length).expand(b, -1))
    tokens = torch.randn(b, length, d)
    parts = [gather_tokens(tokens, s) for s in subsets]
    assert torch.equal(scatter_tokens(parts, subsets, length), tokens)
    assert torch.equal(restore_order(torch.cat(parts, dim=1), inverse), tokens)
    # one subset scattered alone: other positions filled
    partial = scatter_tokens(parts[:1], subsets[:1], length, fill=-7.0)
    assert int((partial == -7.0).all(dim=-1).sum()) == b * 8
    same = random_partition(b, length, 3, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(same[0], subsets, strict=True))
    with pytest.raises(ValueError, match="divisible"):
        random_partition(2, 10, 3)


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
