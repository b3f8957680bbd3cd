"""Fixed 2-D sin-cos position embedding (MAE form)."""

import numpy as np
import pytest
import torch
from timm.layers import build_sincos2d_pos_embed

from anomalib_recon.components.position import SinCosPositionEmbedding2D, get_2d_sincos_pos_embed


def _mae_numpy(embed_dim: int, h: int, w: int) -> np.ndarray:
    """Independent re-statement of MAE's numpy recipe (x-coordinate half first, float64)."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))  # (h, w) each

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, xs), one_d(embed_dim // 2, ys)], axis=1)


@pytest.mark.parametrize(("dim", "grid"), [(768, 16), (64, (3, 5))])
def test_matches_mae_formula(dim, grid):
    h, w = (grid, grid) if isinstance(grid, int) else grid
    ours = get_2d_sincos_pos_embed(dim, grid, dtype=torch.float64).numpy()
    assert ours.shape == (h * w, dim)
    np.testing.assert_allclose(ours, _mae_numpy(dim, h, w), rtol=0, atol=1e-12)


def test_row_major_layout_and_first_entries():
    emb = get_2d_sincos_pos_embed(8, (2, 3), dtype=torch.float64)
    # token index y*w + x; with D=8, omega = [1, 1e-2]; blocks [sin x, cos x, sin y, cos y]
    x, y = 2, 1
    row = emb[y * 3 + x]
    expected = [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02), np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)]
    np.testing.assert_allclose(row.numpy(), expected, atol=1e-12)


def test_timm_equivalent_up_to_half_swap_and_float32():
    """timm's interleaved variant holds the same values with the row half first, computed in float32."""
    ours = get_2d_sincos_pos_embed(768, 16)
    timm_emb = build_sincos2d_pos_embed([16, 16], 768, interleave_sin_cos=True)
    swapped = torch.cat([timm_emb[:, 384:], timm_emb[:, :384]], dim=1)
    torch.testing.assert_close(ours, swapped, atol=1e-5, rtol=0)
    assert not torch.equal(ours, timm_emb)


def test_prefix_tokens_and_errors():
    emb = get_2d_sincos_pos_embed(16, 2, num_prefix_tokens=3)
    assert emb.shape == (3 + 4, 16)
    assert torch.count_nonzero(emb[:3]) == 0
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(18, 4)
    with pytest.raises(ValueError, match="grid_size"):
        get_2d_sincos_pos_embed(16, (0, 4))


def test_module_adds_fixed_buffer():
    module = SinCosPositionEmbedding2D(32, (2, 4))
    assert "pos_embed" not in module.state_dict()
    assert not any(True for _ in module.parameters())
    tokens = torch.randn(2, 8, 32)
    torch.testing.assert_close(module(tokens) - tokens, get_2d_sincos_pos_embed(32, (2, 4)).expand(2, -1, -1))
    assert "pos_embed" in SinCosPositionEmbedding2D(32, 2, persistent=True).state_dict()
    with pytest.raises(ValueError, match=r"expects \(B, 8, 32\)"):
        module(torch.randn(2, 9, 32))
