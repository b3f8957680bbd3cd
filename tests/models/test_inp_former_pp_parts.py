"""INP-Former++'s own parts: the soft-mining losses and the top-k image score."""

import pytest
import torch
from torch.nn import functional as F

from anomalib_recon.components.losses import cosine_distance
from anomalib_recon.models.image.inp_former_pp.loss import soft_mining_cosine, soft_mining_mse
from anomalib_recon.models.image.inp_former_pp.torch_model import reduce_topk_mean


def test_soft_mining_mse_scales_gradient_per_position():
    g = torch.Generator().manual_seed(3)
    en = torch.randn(2, 3, 4, 4, generator=g)
    de = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = soft_mining_mse(en, de, power=3)
    torch.testing.assert_close(loss, F.mse_loss(de, en))
    loss.backward()
    plain = torch.autograd.grad(F.mse_loss(de, en), de)[0]
    e = ((en - de.detach()) ** 2).mean(dim=1, keepdim=True)
    w = (e / e.mean()) ** 3
    torch.testing.assert_close(de.grad, plain * w)
    assert not torch.allclose(de.grad, plain)


def test_soft_mining_cosine_matches_anomalib_convention():
    g = torch.Generator().manual_seed(4)
    en = [torch.randn(2, 3, 4, 4, generator=g)]
    de_leaf = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = soft_mining_cosine(en, [de_leaf], power=3)
    torch.testing.assert_close(loss, cosine_distance(en[0], de_leaf.detach(), per_token=False))
    loss.backward()
    plain = torch.autograd.grad(cosine_distance(en[0], de_leaf, per_token=False), de_leaf)[0]
    d = (1 - F.cosine_similarity(en[0], de_leaf.detach(), dim=1)).unsqueeze(1)
    torch.testing.assert_close(de_leaf.grad, plain * (d / d.mean()) ** 3)


def test_soft_mining_hooks_do_not_leak_into_other_terms():
    """The cosine and MSE re-weightings each act on their own term only (INP-Former++ sums both)."""
    g = torch.Generator().manual_seed(5)
    en = torch.randn(2, 3, 4, 4, generator=g)
    base = torch.randn(2, 3, 4, 4, generator=g)

    def grad_of(fn):
        de = base.clone().requires_grad_(True)
        fn(de).backward()
        return de.grad

    both = grad_of(lambda de: soft_mining_cosine([en], [de]) + soft_mining_mse(en, de) + F.l1_loss(de, en))
    parts = grad_of(lambda de: soft_mining_cosine([en], [de])) + grad_of(lambda de: soft_mining_mse(en, de))
    parts = parts + grad_of(lambda de: F.l1_loss(de, en))
    torch.testing.assert_close(both, parts)


def test_soft_mining_without_grad_returns_value():
    en, de = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(soft_mining_cosine(en, de), cosine_distance(en, de, per_token=False))
    torch.testing.assert_close(soft_mining_mse([en], [de]), F.mse_loss(de, en))


def test_soft_mining_errors():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="equally long"):
        soft_mining_mse([a, a], [a])
    with pytest.raises(ValueError, match="shapes differ"):
        soft_mining_cosine([a], [a[:, :2]])
    with pytest.raises(ValueError, match="NaN or inf"):
        soft_mining_mse(a, torch.full_like(a, float("nan")))


def test_reduce_topk_mean_on_known_map():
    amap = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    amap = torch.cat([amap, -amap])
    # top 5 % of 100 pixels = 5 pixels: 95..99 -> mean 97 ; second sample: 0,-1,..,-4 -> -2
    torch.testing.assert_close(reduce_topk_mean(amap, ratio=0.05), torch.tensor([97.0, -2.0]))
    torch.testing.assert_close(reduce_topk_mean(amap, ratio=0.001), torch.tensor([99.0, 0.0]))  # at least one pixel
    torch.testing.assert_close(reduce_topk_mean(amap[:, 0], ratio=0.05), torch.tensor([97.0, -2.0]))  # (B, H, W)
    with pytest.raises(ValueError, match="ratio"):
        reduce_topk_mean(amap, ratio=0.0)
    with pytest.raises(ValueError, match="anomaly map"):
        reduce_topk_mean(torch.rand(4), ratio=0.5)
