"""init_mae_weights: the MAE recipe (xavier-uniform Linear, zero bias, LayerNorm 1/0) against the formula, and its
use by AMI-Net, DADF and GLCF."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anomalib_recon.components.initialization import init_mae_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "a": nn.Linear(6, 10),
            "nested": nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 3, bias=False), nn.GELU()),
            "conv": nn.Conv2d(3, 4, 2),
            "ln_no_bias": nn.LayerNorm(5, bias=False),
            "ln_fixed": nn.LayerNorm(5, elementwise_affine=False),
        }
    )


def test_matches_the_xavier_uniform_formula_draw_for_draw():
    net = _net()
    conv = {k: v.clone() for k, v in net["conv"].state_dict().items()}
    with torch.no_grad():  # a LayerNorm not at 1/0 before, so that the reset is visible
        net["nested"][0].weight.fill_(3.0)
        net["nested"][0].bias.fill_(-1.0)
        net["ln_no_bias"].weight.fill_(2.0)
    torch.manual_seed(7)
    init_mae_weights(net)

    # the same draws by hand: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), in module order
    torch.manual_seed(7)
    expected_a = torch.empty(10, 6).uniform_(-math.sqrt(6 / 16), math.sqrt(6 / 16))
    expected_b = torch.empty(3, 10).uniform_(-math.sqrt(6 / 13), math.sqrt(6 / 13))
    torch.testing.assert_close(net["a"].weight, expected_a, rtol=0, atol=0)
    torch.testing.assert_close(net["nested"][1].weight, expected_b, rtol=0, atol=0)
    assert torch.count_nonzero(net["a"].bias) == 0
    assert torch.equal(net["nested"][0].weight, torch.ones(10))
    assert torch.equal(net["nested"][0].bias, torch.zeros(10))
    assert torch.equal(net["ln_no_bias"].weight, torch.ones(5))
    for key, value in net["conv"].state_dict().items():  # other modules untouched
        assert torch.equal(value, conv[key])


def test_modules_are_visited_in_the_order_given():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    torch.manual_seed(3)
    init_mae_weights(first, second)
    a, b = first.weight.clone(), second.weight.clone()
    torch.manual_seed(3)
    init_mae_weights(second, first)
    torch.testing.assert_close(second.weight, a, rtol=0, atol=0)
    torch.testing.assert_close(first.weight, b, rtol=0, atol=0)


def _is_mae_initialised(module: nn.Module) -> bool:
    """Every Linear has zero bias and weights inside the xavier bound; every LayerNorm is 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            if m.bias is not None and torch.count_nonzero(m.bias) > 0:
                return False
            if float(m.weight.detach().abs().max()) > bound:
                return False
        elif (
            isinstance(m, nn.LayerNorm)
            and m.weight is not None
            and not (torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0)
        ):
            return False
    return True


def test_the_three_mae_style_models_initialise_their_transformers_with_it():
    """A freshly built AMI-Net, DADF and GLCF hold MAE-initialised transformer parts (PyTorch's default Linear init
    has non-zero biases, so a dropped call fails here)."""
    from anomalib_recon.models.image.ami_net import AMINet
    from anomalib_recon.models.image.dadf import DADF
    from anomalib_recon.models.image.glcf import GLCF

    lite = {"backbone": "tf_efficientnet_lite0", "weights": None, "image_size": 64, "visualizer": False}
    ami = AMINet(**lite, embed_dim=32, depth=1, num_heads=2).model
    dadf = DADF(**lite, embed_dim_per_scale=16, depth=1, num_heads=2, flow_steps=2, reconstruction_steps=2).model
    glcf = GLCF(
        **lite, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
    ).model
    for part in (ami.auxiliary, ami.blocks, ami.norm_auxi, ami.norm, dadf.blocks, dadf.norm):
        assert _is_mae_initialised(part)
    bottleneck = glcf.bottleneck
    for part in (
        bottleneck.blocks,
        bottleneck.decoder_embed,
        bottleneck.global_decoder_blocks,
        bottleneck.decoder_pred,
    ):
        assert _is_mae_initialised(part)
    assert not _is_mae_initialised(nn.Linear(8, 8))  # the check can fail
