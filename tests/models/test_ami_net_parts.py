"""AMI-Net's own parts: feature jitter, token masking and the centre distance of its auxiliary loss."""

import math

import pytest
import torch

from anomalib_recon.models.image.ami_net.loss import norm_cosine_distance, pairwise_center_diversity
from anomalib_recon.models.image.ami_net.perturbation import norm_scaled_jitter, random_token_mask, token_mask


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


def test_pairwise_center_diversity_known_value_and_finite_grad():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    # d(c0,c1)=sqrt2*1, d(c0,c2)=2*2, d(c1,c2)=sqrt2*1
    expected = (2 * math.sqrt(2) + 4) / 3
    val = pairwise_center_diversity(c)
    assert val.item() == pytest.approx(expected, rel=1e-6)
    val.backward()
    assert torch.isfinite(c.grad).all()
    batched = pairwise_center_diversity(torch.stack([c.detach(), c.detach()]))
    assert batched.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(norm_cosine_distance(c[0].detach(), c[2].detach()), torch.tensor(4.0))
    # identical centres: zero distance, gradient must stay finite
    same = torch.ones(3, 4, requires_grad=True)
    pairwise_center_diversity(same).backward()
    assert torch.isfinite(same.grad).all()


def test_pairwise_center_diversity_needs_two_centres():
    with pytest.raises(ValueError, match="K >= 2"):
        pairwise_center_diversity(torch.randn(1, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        pairwise_center_diversity(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
