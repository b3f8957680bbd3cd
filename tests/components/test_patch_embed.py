"""Patch embeddings, patchify/unpatchify and the token → feature-map head."""

import math

import pytest
import torch

from anomalib_recon.components.patch_embed import (
    MultiScalePatchEmbed,
    PatchEmbed,
    TokenToFeatureHead,
    one_grid_patch_sizes,
    patchify,
    unpatchify,
)


@pytest.mark.parametrize("layout", ["pqc", "cpq"])
def test_patchify_round_trip(layout):
    x = torch.randn(2, 5, 8, 12)
    tokens = patchify(x, 4, layout)
    assert tokens.shape == (2, 2 * 3, 4 * 4 * 5)
    torch.testing.assert_close(unpatchify(tokens, 4, 5, (2, 3), layout), x, rtol=0, atol=0)


def test_pqc_layout_is_mae_einsum():
    x = torch.randn(2, 3, 8, 8)
    p, h = 4, 2
    mae = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, h, p, h, p)).reshape(2, h * h, p * p * 3)
    torch.testing.assert_close(patchify(x, p), mae, rtol=0, atol=0)
    # the token at grid (row 1, col 0), element (row 2, col 3, channel 1) of its patch
    assert patchify(x, p)[0, 1 * h + 0, (2 * p + 3) * 3 + 1] == x[0, 1, 1 * p + 2, 0 * p + 3]


def test_patchify_errors():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 2, 6, 8), 4)
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(torch.randn(1, 6, 16 * 2), 4, 2)


def test_patch_embed_is_linear_on_patches_with_xavier_init():
    torch.manual_seed(0)
    embed = PatchEmbed(in_channels=6, embed_dim=10, patch_size=4)
    x = torch.randn(2, 6, 8, 8)
    tokens = embed(x)
    assert tokens.shape == (2, 4, 10)
    manual = patchify(x, 4, layout="cpq") @ embed.proj.weight.reshape(10, -1).T + embed.proj.bias
    torch.testing.assert_close(tokens, manual, atol=1e-5, rtol=1e-5)
    bound = math.sqrt(6.0 / (6 * 16 + 10))  # xavier-uniform of a (10, 96) linear
    weight = embed.proj.weight
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound


def test_patch_embed_errors():
    embed = PatchEmbed(in_channels=6, embed_dim=10, patch_size=4)
    with pytest.raises(ValueError, match=r"expects a \(B, 6, H, W\)"):
        embed(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        embed(torch.randn(1, 6, 10, 8))
    with pytest.raises(ValueError, match="positive"):
        PatchEmbed(0, 10, 4)


@pytest.mark.parametrize(("fuse", "width"), [("sum", 8), ("concat", 24)])
def test_multi_scale_patch_embed(fuse, width):
    embed = MultiScalePatchEmbed([3, 5, 7], [4, 2, 1], embed_dim=8, fuse=fuse)
    features = [torch.randn(2, 3, 16, 16), torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)]
    tokens = embed(features)
    assert embed.out_dim == width
    assert tokens.shape == (2, 16, width)
    per_scale = [e(f) for e, f in zip(embed.embeds, features, strict=True)]
    expected = sum(per_scale) if fuse == "sum" else torch.cat(per_scale, dim=-1)
    torch.testing.assert_close(tokens, expected)


def test_multi_scale_patch_embed_errors():
    embed = MultiScalePatchEmbed([3, 5], [4, 4], embed_dim=8)
    with pytest.raises(ValueError, match="different token grids"):
        embed([torch.randn(1, 3, 16, 16), torch.randn(1, 5, 8, 8)])
    with pytest.raises(ValueError, match="list of 2"):
        embed([torch.randn(1, 3, 16, 16)])
    with pytest.raises(ValueError, match="one patch size per scale"):
        MultiScalePatchEmbed([3, 5], [4], embed_dim=8)
    with pytest.raises(ValueError, match="fuse"):
        MultiScalePatchEmbed([3], [4], embed_dim=8, fuse="mean")


def test_token_to_feature_head():
    head = TokenToFeatureHead(embed_dim=12, out_channels=5, patch_size=2)
    assert torch.count_nonzero(head.linear.bias) == 0
    tokens = torch.randn(3, 6, 12)
    fmap = head(tokens, grid_size=(2, 3))
    assert fmap.shape == (3, 5, 4, 6)
    torch.testing.assert_close(patchify(fmap, 2), head.project(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        head(tokens, grid_size=(2, 2))


def test_one_grid_patch_sizes_puts_every_scale_on_the_deepest_grid() -> None:
    sizes = [(32, 24), (16, 12), (8, 6)]
    assert one_grid_patch_sizes(sizes, (128, 96)) == ([4, 2, 1], (8, 6))
    assert one_grid_patch_sizes(sizes, (128, 96), (8, 4, 2)) == ([8, 4, 2], (4, 3))  # the user's, checked
    with pytest.raises(ValueError, match=r"image_size 120x96 gives feature maps 30x24, 15x12, 8x6, which patch"):
        one_grid_patch_sizes([(30, 24), (15, 12), (8, 6)], (120, 96))
    with pytest.raises(ValueError, match=r"patch sizes \[4, 4, 1\] do not cut into one token grid"):
        one_grid_patch_sizes(sizes, (128, 96), (4, 4, 1))
    with pytest.raises(ValueError, match=r"patch_sizes must be 3 positive ints \(one per scale\), got \[4, 2\]"):
        one_grid_patch_sizes(sizes, (128, 96), (4, 2))
