"""GRNR: the closed form against brute-force least squares, float32 exactness on near-flat neighbourhoods, self
filtering, the exportable solver, the inference wiring (pooling, priors, λ, border cuts, fusion), defect maps,
zero-shot Engine/CLI runs with and without calibration data, export parity and input errors (tiny CPU settings)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalib_recon.components.guards import NonFiniteError
from anomalib_recon.models.image.grnr import GRNR
from anomalib_recon.models.image.grnr.post_processor import GRNRPostProcessor, relative_map
from anomalib_recon.models.image.grnr.torch_model import (
    fill_border,
    grnr_residual,
    mean_distance_to_others,
    neighbourhood_regression,
    neighbourhood_support,
    resolve_layers,
    select_global_priors,
    spd_solve,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"backbone": "tf_efficientnet_lite0", "weights": None, "image_size": 64, "num_global_priors": 8}


def tiny(**kwargs) -> GRNR:
    """Lite0 at 64 px: 8x8 and 4x4 feature grids (strides 8, 16)."""
    return GRNR(**{**TINY, "visualizer": False, **kwargs})


# ---------------------------------------------------------------------------------------------------- brute force
def _brute_neighbours(pooled: torch.Tensor, b: int, y: int, x: int) -> torch.Tensor:
    """The 8 neighbours of (y, x) by explicit reflect indexing (``-1 -> 1``, ``h -> h-2``), (8, C)."""
    h, w = pooled.shape[-2:]

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    rows = [
        pooled[b, :, reflect(y + dy, h), reflect(x + dx, w)]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]
    return torch.stack(rows)


def _brute_prior_indices(q: torch.Tensor, k: int) -> set[int]:
    """The k features with the smallest mean distance to all others (diagonal excluded), by explicit loops."""
    n = q.shape[0]
    means = [sum(float((q[i] - q[j]).norm()) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return set(np.argsort(means, kind="stable")[:k].tolist())


def _brute_residual(pooled: torch.Tensor, b: int, y: int, x: int, k: int, lam: float) -> float:
    """min_w ‖q − wS‖² + λ Σ_j ‖μ_j − wS‖² as one stacked least-squares problem (torch.linalg.lstsq, float64)."""
    pooled = pooled.double()
    q_all = pooled[b].flatten(1).T  # (N, C)
    q = pooled[b, :, y, x]
    s = _brute_neighbours(pooled, b, y, x)  # (8, C)
    blocks, targets = [s.T], [q]
    if lam > 0:
        for j in sorted(_brute_prior_indices(q_all, k)):
            blocks.append(math.sqrt(lam) * s.T)
            targets.append(math.sqrt(lam) * q_all[j])
    w = torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets).unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    return float((q - w @ s).norm())


def _ridge_residual_f64(support: torch.Tensor, query: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """‖q − wS‖ with w = argmin ‖t − wS‖² + ε̃‖w‖², ε̃ = ε·trace(SSᵀ)/8 + tiny: the augmented least-squares problem
    ``[Sᵀ; √ε̃ I] w = [t; 0]`` solved by torch.linalg.lstsq in float64 (the brute-force reference)."""
    s, q, t = support.double(), query.double(), target.double()
    ridge = eps * (s * s).sum((-1, -2)) / 8 + torch.finfo(torch.float32).tiny
    eye = torch.eye(8, dtype=torch.float64)
    system = torch.cat([s.transpose(-1, -2), ridge.sqrt()[..., None, None] * eye], dim=-2)
    rhs = torch.cat([t, torch.zeros(*t.shape[:-1], 8, dtype=torch.float64)], dim=-1)
    w = torch.linalg.lstsq(system, rhs.unsqueeze(-1)).solution.squeeze(-1)
    return (q - (w.unsqueeze(-2) @ s).squeeze(-2)).norm(dim=-1)


# ---------------------------------------------------------------------------------------------------- algorithm
def test_spd_solve_matches_linalg_solve():
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        a = torch.randn(3, 50, 8, 16, generator=gen, dtype=torch.float64)
        gram = (a @ a.transpose(-1, -2) + 1e-3 * torch.eye(8, dtype=torch.float64)).to(dtype)
        rhs = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64).to(dtype)
        expected = torch.linalg.solve(gram.double(), rhs.double().unsqueeze(-1)).squeeze(-1)
        got = spd_solve(gram, rhs)
        assert got.dtype == dtype
        rel = (got.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
        assert rel.max() < tol
    # other sizes too (the unrolled loops are generic in n)
    a = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64)
    gram, rhs = a @ a.transpose(-1, -2), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(gram, rhs), torch.linalg.solve(gram, rhs))


def test_neighbourhood_support_is_reflect_padded_3x3_without_centre():
    pooled = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    support = neighbourhood_support(pooled)
    assert support.shape == (2, 24, 8, 5)
    for b, y, x in ((0, 0, 0), (1, 3, 5), (0, 2, 3), (1, 0, 4)):
        torch.testing.assert_close(support[b, y * 6 + x], _brute_neighbours(pooled, b, y, x))


def test_self_filtering_picks_smallest_mean_distance_to_the_others_and_chunks_are_exact():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 30, 6, generator=gen, dtype=torch.float64)
    q[:, :3] += 4.0  # three outliers: far from the rest, must never be picked
    full = mean_distance_to_others(q)
    brute = torch.cdist(q, q).sum(-1) / 29  # cdist's diagonal is 0, so the sum already excludes the self term
    torch.testing.assert_close(full, brute)
    for chunk in (1, 7, 29, 30, 1000):
        torch.testing.assert_close(mean_distance_to_others(q, chunk), full)
    k = 5
    for b in range(2):
        chosen = _brute_prior_indices(q[b], k)
        assert not chosen & {0, 1, 2}
        priors = select_global_priors(q[b : b + 1], k, chunk_size=7)[0]
        assert priors.shape == (k, 6)
        torch.testing.assert_close(priors.sum(0), q[b, sorted(chosen)].sum(0))


def test_self_filtering_is_accurate_in_float32_for_nearly_identical_features():
    # far from 0 and close together: the matmul form cancels badly unless centred, and self-distances (rounding
    # noise, not zero) must not enter the mean
    q = torch.full((1, 10, 64), 3.0) + torch.randn(1, 10, 64) * 1e-3
    brute = torch.cdist(q.double(), q.double()).sum(-1) / 9
    torch.testing.assert_close(mean_distance_to_others(q).double(), brute, atol=2e-3, rtol=0.05)


def test_closed_form_equals_the_demo_formula():
    gen = torch.Generator().manual_seed(2)
    pooled = torch.randn(2, 12, 6, 6, generator=gen, dtype=torch.float64)
    q = pooled.flatten(2).transpose(1, 2)
    s = neighbourhood_support(pooled)
    k, lam = 5, 5.0
    priors = select_global_priors(q, k)
    got = neighbourhood_regression(s, q, priors, lam, eps=1e-12)
    interior = torch.tensor([y * 6 + x for y in range(1, 5) for x in range(1, 5)])
    s, q, got = s[:, interior], q[:, interior], got[:, interior]
    # the demo's closed form: w = (q Sᵀ + λ Σ_j μ_j Sᵀ) [(1 + λK) S Sᵀ]⁻¹, q̂ = w S (torch.linalg.solve)
    rhs = ((q + lam * priors.sum(1)[:, None]).unsqueeze(-2) @ s.transpose(-1, -2)).squeeze(-2)
    gram = (1 + lam * k) * (s @ s.transpose(-1, -2))
    w = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)  # G symmetric: w G = r  <=>  G wᵀ = rᵀ
    expected = (q - (w.unsqueeze(-2) @ s).squeeze(-2)).norm(dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 5.0, 0.7])
def test_residual_equals_brute_force_least_squares(lam):
    gen = torch.Generator().manual_seed(3)
    pooled = torch.randn(2, 11, 5, 6, generator=gen, dtype=torch.float64)
    k = 4
    got = grnr_residual(pooled, k, lam, eps=1e-12, chunk_size=7)  # border Gram matrices are singular (duplicates)
    assert got.shape == (2, 1, 5, 6)
    for b, y, x in ((0, 0, 0), (0, 2, 3), (1, 4, 5), (1, 1, 0)):
        assert got[b, 0, y, x].item() == pytest.approx(_brute_residual(pooled, b, y, x, k, lam), rel=1e-6)


def test_lambda_zero_is_neighbourhood_least_squares_and_lambda_pulls_toward_the_priors():
    gen = torch.Generator().manual_seed(4)
    pooled = torch.randn(1, 10, 5, 5, generator=gen, dtype=torch.float64)
    q = pooled.flatten(2).transpose(1, 2)[0]
    s = neighbourhood_support(pooled)[0]
    plain = grnr_residual(pooled, 3, 0.0, eps=1e-12).flatten()
    lstsq = torch.stack(
        [(q[n] - torch.linalg.lstsq(s[n].T, q[n].unsqueeze(-1)).solution.squeeze(-1) @ s[n]).norm() for n in range(25)]
    )
    torch.testing.assert_close(plain, lstsq, rtol=1e-6, atol=1e-9)
    # a neighbourhood regression residual is a projection residual: λ > 0 (a different target) can only raise it
    assert (grnr_residual(pooled, 3, 5.0, eps=1e-12).flatten() >= plain - 1e-9).all()


# ---------------------------------------------------------------------------------------------------- float32 precision
def _near_flat(kind: str, n: int, c: int, rel: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbourhoods (1, n, 8, c) and queries (1, n, c) whose 8 neighbours are nearly equal (relative spread ``rel``):

    ``flat`` = one feature vector with values in 1e-4..1e-3 (a plain background or a black border) plus isotropic
    deviations; ``collinear`` = scaled copies of one vector (brightness changes); ``gradient`` = a linear ramp over
    the 3x3 window. Queries deviate from the neighbours by about ``rel`` too.
    """
    base = 1e-4 + 9e-4 * torch.rand(n, 1, c, generator=gen, dtype=torch.float64)
    size = base.norm(dim=-1, keepdim=True) / math.sqrt(c)
    if kind == "flat":
        support = base + rel * size * torch.randn(n, 8, c, generator=gen, dtype=torch.float64)
    elif kind == "collinear":
        support = base * (1 + rel * torch.randn(n, 8, 1, generator=gen, dtype=torch.float64))
    else:
        gy, gx = rel * size * torch.randn(2, n, 1, c, generator=gen, dtype=torch.float64)
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
        support = torch.cat([base + dy * gy + dx * gx for dy, dx in offsets], dim=1)
    query = base[:, 0] + rel * size[:, 0] * torch.randn(n, c, generator=gen, dtype=torch.float64)
    return support.float().unsqueeze(0), query.float().unsqueeze(0)


@pytest.mark.parametrize("channels", [112, 1024])
@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_float32_regression_matches_a_float64_brute_force_on_near_flat_neighbourhoods(channels, lam):
    # float32 on the raw Gram matrix S Sᵀ (before the fix) was off by up to 1e3x here, with NaN at C = 1024
    gen = torch.Generator().manual_seed(5)
    for kind in ("flat", "collinear", "gradient"):
        for rel in (1e-4, 1e-3, 1e-2):
            support, query = _near_flat(kind, 64, channels, rel, gen)
            priors = (query[:, :1] + 1e-4 * torch.rand(1, 10, channels, generator=gen)).float()  # K = 10
            got = neighbourhood_regression(support, query, priors, lam, eps=1e-6)
            k = priors.shape[1]
            target = (
                query if lam == 0 else (query.double() + lam * priors.double().sum(1, keepdim=True)) / (1 + lam * k)
            )
            expected = _ridge_residual_f64(support, query, target, eps=1e-6)
            assert torch.isfinite(got).all()
            rel_error = ((got.double() - expected).abs() / expected).max().item()
            assert rel_error < 2e-4, (kind, rel, rel_error)  # measured: <= 6e-5 (collinear), ~1e-7 (flat)


def test_regression_is_finite_and_exact_on_degenerate_neighbourhoods():
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(1, 3, 16, generator=gen)
    # all neighbours zero (a black border after ReLU): nothing to project on, the residual is the query itself
    zero = neighbourhood_regression(torch.zeros(1, 3, 8, 16), query)
    torch.testing.assert_close(zero, query.norm(dim=-1))
    # all neighbours identical, query = a multiple of them: the residual is (almost) zero, never NaN
    same = torch.rand(1, 3, 1, 16, generator=gen).expand(-1, -1, 8, -1).contiguous()
    out = neighbourhood_regression(same, 3.0 * same[:, :, 0], None, 0.0)
    assert torch.isfinite(out).all() and (out < 1e-4 * 3.0 * same[:, :, 0].norm(dim=-1)).all()
    # reflect-padded duplicates (three pairs of equal neighbours) and large features
    support = 1e3 * torch.rand(1, 3, 8, 16, generator=gen)
    support[:, :, :3] = support[:, :, 5:]
    expected = _ridge_residual_f64(support, 1e3 * query, 1e3 * query, 1e-6)
    torch.testing.assert_close(neighbourhood_regression(support, 1e3 * query).double(), expected, rtol=1e-5, atol=0)


def test_solve_errors_on_bad_arguments():
    support, query = torch.rand(1, 4, 8, 6), torch.rand(1, 4, 6)
    for eps in (0.0, -1e-6, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            neighbourhood_regression(support, query, eps=eps)
    with pytest.raises(ValueError, match=r"support .* and query .* disagree"):
        neighbourhood_regression(support, torch.rand(1, 4, 5))
    # a ridge below float32 resolution rounds away: reflect-padded borders (repeated neighbours) gave NaN before
    pooled = torch.rand(1, 12, 5, 4, generator=torch.Generator().manual_seed(0))
    border_support, border_query = neighbourhood_support(pooled), pooled.flatten(2).transpose(1, 2)
    with pytest.raises(ValueError, match=r"eps=1e-09 is below the torch.float32 machine epsilon.*float64"):
        neighbourhood_regression(border_support, border_query, eps=1e-9)
    assert torch.isfinite(neighbourhood_regression(border_support.double(), border_query.double(), eps=1e-9)).all()
    assert torch.isfinite(neighbourhood_regression(border_support, border_query, eps=torch.finfo().eps)).all()
    with pytest.raises(ValueError, match=r"lam > 0 needs priors of shape \(B, K, C\) = \(1, K, 6\)"):
        neighbourhood_regression(support, query, None, 5.0)
    with pytest.raises(ValueError, match="lam > 0 needs priors"):
        neighbourhood_regression(support, query, torch.rand(1, 3, 5), 5.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        neighbourhood_regression(support.half(), query.half())
    with pytest.raises(ValueError, match=r"num_global_priors=6 needs between 1 and N feature vectors.*N=5"):
        select_global_priors(torch.rand(1, 5, 3), 6)
    with pytest.raises(ValueError, match=r"num_global_priors=1 .* N=1"):
        select_global_priors(torch.rand(1, 1, 3), 1)


# ---------------------------------------------------------------------------------------------------- wiring
def _wiring_model(k: int = 5, lam: float = 0.7, **kwargs) -> torch.nn.Module:
    """Random-weight Lite0 at 64 px: an 8x8 (stride 8) and a 4x4 (stride 16) grid; border cuts (1, 1) and (0, 0)."""
    return GRNR(
        **{**TINY, "num_global_priors": k, "lam": lam, "visualizer": False, "distance_chunk": 16, **kwargs}
    ).model


def _features(model: torch.nn.Module, seed: int = 0) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.feature_extractor(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(("k", "lam"), [(3, 0.7), (9, 0.7), (5, 5.0), (5, 0.0)])
def test_scale_map_is_pooling_then_regression_with_the_models_k_and_lambda(k, lam):
    # each position: brute-force least squares on the 3x3-average-POOLED features with the model's K priors and λ;
    # a hard-coded K, a lost λ or pooling after the regression all change these numbers
    model = _wiring_model(k, lam)
    feature = _features(model)[0]  # (1, 40, 8, 8)
    got = model.scale_map(feature, (0, 0))[0, 0]
    pooled = F.avg_pool2d(feature, 3, stride=1, padding=1)  # count_include_pad=True, as the authors' demo
    for y, x in ((0, 0), (3, 4), (7, 2), (5, 7), (2, 2)):
        expected = _brute_residual(pooled, 0, y, x, k, lam)
        assert got[y, x].item() == pytest.approx(expected, rel=1e-4), (y, x)


def test_each_layer_gets_its_own_border_cut_and_the_band_takes_the_interiors_minimum():
    model = _wiring_model()
    assert model.cuts((64, 64)) == [(1, 1), (0, 0)]  # (3, 2) cells at 320 px, scaled to 64 px
    calls = []
    original = model.scale_map

    def spy(feature: torch.Tensor, cut: tuple[int, int], layer: int = 0) -> torch.Tensor:
        out = original(feature, cut, layer)
        calls.append((tuple(feature.shape[-2:]), tuple(cut), out))
        return out

    model.scale_map = spy
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert [(grid, cut) for grid, cut, _ in calls] == [((8, 8), (1, 1)), ((4, 4), (0, 0))]
    fine = calls[0][2][0, 0]
    ring = torch.ones(8, 8, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert (fine[ring] == fine[1:-1, 1:-1].min()).all()


def test_fill_border_uses_the_interior_only():
    residual = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6) + 10.0
    residual[0, 0, 0, 0] = 1.0  # a band value below every interior value (reflected neighbourhoods can do that)
    residual[0, 0, 5, 3] = float("nan")  # and one that is not finite: neither may leak into the fill
    filled = fill_border(residual, (1, 2))
    interior = residual[0, 0, 1:5, 2:4]
    assert (filled[0, 0, 1:5, 2:4] == interior).all()
    band = torch.ones(6, 6, dtype=torch.bool)
    band[1:5, 2:4] = False
    assert (filled[0, 0][band] == interior.min()).all()
    assert fill_border(residual, (0, 0)) is residual


def test_scales_are_fused_by_their_product():
    model = _wiring_model(crop=0)
    rng = torch.Generator().manual_seed(3)
    fake = {8: 1.0 + torch.rand(1, 1, 8, 8, generator=rng), 4: 1.0 + torch.rand(1, 1, 4, 4, generator=rng)}
    model.scale_map = lambda feature, cut, layer=0: fake[feature.shape[-1]]
    fused = model.anomaly_map(_features(model), (64, 64))
    layers = [model.blur(F.interpolate(fake[g], size=(64, 64), mode="bilinear", align_corners=False)) for g in (8, 4)]
    torch.testing.assert_close(fused, layers[0] * layers[1])
    model.scale_map = lambda feature, cut, layer=0: torch.full(
        (1, 1, feature.shape[-2], feature.shape[-1]), 2.0 + (feature.shape[-1] == 4)
    )
    torch.testing.assert_close(model.anomaly_map(_features(model), (64, 64)), torch.full((1, 1, 64, 64), 6.0))


# ---------------------------------------------------------------------------------------------------- maps
def _texture(size: int, gen: torch.Generator, patch: bool) -> torch.Tensor:
    """A gray sinusoid grating with noise (ImageNet-normalised, 3 channels); optionally a pasted random-noise patch."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    image = 0.5 + 0.25 * torch.sin(xx / 2.5 + yy / 6.0) + 0.03 * torch.randn(size, size, generator=gen)
    if patch:
        image[48:72, 40:64] = torch.rand(24, 24, generator=gen)
    image = image.clamp(0, 1).expand(3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((image - mean) / std).unsqueeze(0)


def test_pasted_foreign_patch_scores_higher_and_global_regularisation_sharpens_it():
    ratios = {}
    for lam in (5.0, 0.0):
        gen = torch.Generator().manual_seed(0)
        model = GRNR(backbone="tf_efficientnet_lite0", weights="imagenet", image_size=128, lam=lam, visualizer=False)
        clean, defect = _texture(128, gen, False), _texture(128, gen, True)
        with torch.no_grad():
            out_clean, out_defect = model.model(clean), model.model(defect)
        amap = out_defect.anomaly_map[0, 0]
        inside = torch.zeros_like(amap, dtype=torch.bool)
        inside[48:72, 40:64] = True
        ratios[lam] = (amap[inside].mean() / amap[~inside].mean()).item()
        assert ratios[lam] > 1.3
        assert out_defect.pred_score.item() > 1.3 * out_clean.pred_score.item()
        if lam:
            assert inside.flatten()[amap.argmax()]  # the image score (max) sits in the patch
    # measured: 8.7 (λ = 5) vs 1.8 (λ = 0): neighbours inside the patch rebuild it; the global prior does not
    assert ratios[5.0] > 3 * ratios[0.0]


def test_map_size_border_and_crop_follow_the_input_size():
    model = tiny().model
    assert model.cuts((320, 320)) == [(3, 3), (2, 2)]
    assert model.crop_band((320, 320)) == (32, 32)
    assert model.cuts((640, 320)) == [(6, 3), (4, 2)]
    assert model.crop_band((96, 64)) == (10, 6)
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out = model(images)
    amap = out.anomaly_map
    assert amap.shape == (2, 1, 96, 64)
    torch.testing.assert_close(out.pred_score, amap.amax(dim=(1, 2, 3)))
    # the outer band replicates the edge of the central region
    torch.testing.assert_close(amap[:, :, :10, 6:58], amap[:, :, 10:11, 6:58].expand(-1, -1, 10, -1))
    torch.testing.assert_close(amap[:, :, 20:70, -6:], amap[:, :, 20:70, -7:-6].expand(-1, -1, -1, 6))
    # border cut: the stride-8 map's outer cell ring sits at the minimum of the interior
    feature = model.feature_extractor(images)[0]
    layer_map = model.scale_map(feature, (1, 1))
    interior_min = layer_map[:, :, 1:-1, 1:-1].amin(dim=(-2, -1), keepdim=True)
    assert (layer_map[:, :, :1] == interior_min).all()
    assert (layer_map[:, :, 1:-1, 1:-1] > interior_min).any()


# ---------------------------------------------------------------------------------------------------- engine
@pytest.mark.slow
def test_zero_shot_engine_test_without_fit_then_fit_and_safe_checkpoint(tiny_category, tmp_path):
    from tests.conftest import cpu_engine, folder_datamodule

    model = GRNR(backbone="tf_efficientnet_lite0", weights="imagenet", image_size=64, num_global_priors=8)
    engine = cpu_engine(tmp_path / "test", enable_model_summary=False)
    results = engine.test(model, datamodule=folder_datamodule(tiny_category))[0]
    assert results["image_AUROC"] > 0.9
    assert results["pixel_AUROC"] > 0.9
    assert float(model.post_processor.image_max) > float(model.post_processor.image_min)  # calibrated by validation
    assert model.post_processor.calibrated
    # predict on a plain folder after that calibration: anomalib's normalised scores, labels and masks
    predictions = engine.predict(model, data_path=tiny_category / "test" / "defect")
    for batch in predictions:
        assert batch.pred_label is not None and batch.pred_mask is not None
        assert ((batch.pred_score >= 0) & (batch.pred_score <= 1)).all()

    fitted = tiny()
    engine = cpu_engine(tmp_path / "fit", enable_model_summary=False)
    engine.fit(fitted, datamodule=folder_datamodule(tiny_category))  # zero-shot: validation only, no step
    assert engine.trainer.global_step == 0
    ckpt = tmp_path / "grnr.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = GRNR.load_from_checkpoint(ckpt, weights_only=True, visualizer=False)
    assert loaded.hparams["num_global_priors"] == 8
    images = torch.rand(2, 3, 80, 72)
    fitted.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = fitted(images), loaded(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.pred_score, b.pred_score)
    assert b.anomaly_map.shape == (2, 1, 64, 64)


def _plain_folder(root: Path, category: Path) -> tuple[Path, list[str]]:
    """A flat folder of images (2 defective, 2 good, no labels or masks): what a user points `predict` at."""
    root.mkdir(parents=True)
    names = []
    for sub, prefix in (("defect", "d"), ("good", "g")):
        for path in sorted((category / "test" / sub).glob("*.png"))[:2]:
            shutil.copy(path, root / f"{prefix}_{path.name}")
            names.append(f"{prefix}_{path.name}")
    return root, names


@pytest.mark.slow
def test_zero_shot_predict_on_a_plain_folder_gives_raw_scores_relative_maps_and_says_so(
    tiny_category, tmp_path, caplog
):
    from tests.conftest import cpu_engine

    folder, _ = _plain_folder(tmp_path / "images", tiny_category)
    model = GRNR(backbone="tf_efficientnet_lite0", weights="imagenet", image_size=64, num_global_priors=8)
    engine = cpu_engine(tmp_path / "run", enable_model_summary=False)
    with caplog.at_level(logging.WARNING):
        predictions = engine.predict(model, data_path=folder)  # was: "`val_dataloader` must be implemented"
    assert "GRNR: predicting without calibration data" in caplog.text
    assert not model.post_processor.calibrated
    scores = {}
    for batch in predictions:
        assert batch.pred_label is None and batch.pred_mask is None  # no threshold without calibration data
        maps = batch.anomaly_map
        assert torch.isfinite(maps).all() and maps.shape[-2:] == (64, 64)
        torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(len(maps)))  # each map / its own maximum
        assert (maps >= 0).all()
        for path, score in zip(batch.image_path, batch.pred_score, strict=True):
            scores[Path(path).name] = float(score)
    # raw scores: the model's own maxima, far above 1, and the defective images rank first
    with torch.no_grad():
        raw = model.model(model.pre_processor(torch.stack([predictions[0].image[0]]))).pred_score
    assert float(raw) > 1.0
    defect = [v for n, v in scores.items() if n.startswith("d_")]
    good = [v for n, v in scores.items() if n.startswith("g_")]
    assert len(defect) == 2 and len(good) == 2
    assert min(defect) > max(good)
    # visualisations were written and are images of the [0, 1] maps
    assert list((tmp_path / "run").rglob("*.png"))


@pytest.mark.slow
def test_cli_predict_on_a_plain_folder(tiny_category, tmp_path):
    folder, names = _plain_folder(tmp_path / "images", tiny_category)
    cli = Path(sys.executable).parent / "anomalib"
    command = [
        str(cli),
        "predict",
        "--model",
        "GRNR",
        "--model.backbone",
        "tf_efficientnet_lite0",
        "--model.image_size",
        "64",
        "--model.num_global_priors",
        "8",
        "--data",
        str(folder),
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path / "results"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "val_dataloader" not in log
    assert "GRNR: predicting without calibration data" in log
    written = sorted(p.name for p in (tmp_path / "results").rglob("*.png"))
    assert sorted(names) == written


def test_uncalibrated_direct_call_and_calibrated_post_processing():
    model = tiny()
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.model(model.pre_processor(images))
        out = model(images)
    assert not model.post_processor.calibrated
    torch.testing.assert_close(out.pred_score, raw.pred_score)  # raw scores
    torch.testing.assert_close(out.anomaly_map, relative_map(raw.anomaly_map))
    torch.testing.assert_close(out.anomaly_map * out.pred_score.view(-1, 1, 1, 1), raw.anomaly_map)
    assert out.pred_label is None and out.pred_mask is None
    # once calibrated it is anomalib's PostProcessor: min-max normalisation around the threshold, labels
    post = model.post_processor
    post.image_min.fill_(0.0), post.image_max.fill_(2.0 * float(raw.pred_score.max()))
    post._image_threshold.fill_(float(raw.pred_score.max()))
    post.pixel_min.fill_(0.0), post.pixel_max.fill_(float(raw.anomaly_map.max()))
    post._pixel_threshold.fill_(0.5 * float(raw.anomaly_map.max()))
    assert post.calibrated
    with torch.no_grad():
        out = model(images)
    assert out.pred_label is not None and ((out.pred_score >= 0) & (out.pred_score <= 1)).all()
    # an all-zero map stays zero (no NaN from dividing by its maximum)
    assert torch.equal(relative_map(torch.zeros(2, 1, 4, 4)), torch.zeros(2, 1, 4, 4))
    assert isinstance(GRNR.configure_post_processor(), GRNRPostProcessor)


@pytest.mark.export
def test_uncalibrated_export_computes_and_names_what_a_direct_call_returns(caplog, tmp_path):
    """anomalib names the graph's outputs from an eager forward: an uncalibrated graph with anomalib's four outputs
    under two names would call pred_label "anomaly_map". The graph holds the raw score and the relative map."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny().eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    assert expected.pred_label is None and float(expected.anomaly_map.amax()) == 1.0  # uncalibrated: relative map
    with caplog.at_level(logging.WARNING):
        path = model.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    assert "exporting an uncalibrated model" in caplog.text and "not a probability" in caplog.text
    assert model.post_processor.calibrated_for_export is None  # reset after the export
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    assert names == ["pred_score", "anomaly_map"]
    out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    assert out["anomaly_map"].shape == (2, 1, 64, 64)
    np.testing.assert_allclose(out["anomaly_map"], expected.anomaly_map.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["pred_score"], expected.pred_score.numpy(), rtol=1e-5, atol=1e-4)

    # anomalib's OpenVINO inferencer reads outputs by name: it used to fail on the unnamed extras
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import OpenVINOInferencer

    result = OpenVINOInferencer(path=path, device="CPU").predict(images[:1].numpy()[0])
    assert result.pred_label is None
    np.testing.assert_allclose(np.asarray(result.anomaly_map).reshape(64, 64), out["anomaly_map"][0, 0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.export
def test_onnx_and_openvino_parity_with_the_whole_algorithm_in_the_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    model = GRNR(backbone="tf_efficientnet_lite0", weights="imagenet", image_size=64, num_global_priors=8)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        raw = model.model(model.pre_processor(images))
    # calibrate the post-processor as a validation pass would, so that parity is checked on normalised outputs
    post = model.post_processor
    scores, maps = raw.pred_score, raw.anomaly_map
    post.image_min.fill_(0.8 * scores.min().item())
    post.image_max.fill_(1.2 * scores.max().item())
    post._image_threshold.fill_(scores.mean().item())
    post.pixel_min.fill_(maps.min().item())
    post.pixel_max.fill_(maps.max().item())
    post._pixel_threshold.fill_(maps.mean().item())
    with torch.no_grad():
        expected = model(images)
    assert expected.anomaly_map.min() >= 0.0 and expected.anomaly_map.max() <= 1.0
    assert expected.anomaly_map.std() > 0.05 and expected.pred_score.max() - expected.pred_score.min() > 0.05
    path = model.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"TopK", "Sqrt", "MatMul"} <= ops
    assert not any("Inverse" in op or "Solve" in op for op in ops)

    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    compiled = compile_openvino(path)
    ov_result = compiled(images.numpy())
    ov_out = {o.get_any_name(): ov_result[o] for o in compiled.outputs}
    for outputs in (onnx_out, ov_out):
        for name in ("pred_score", "anomaly_map"):
            np.testing.assert_allclose(outputs[name], getattr(expected, name).numpy(), rtol=0, atol=1e-4)
        assert outputs["anomaly_map"].shape == (2, 1, 64, 64)
        np.testing.assert_array_equal(outputs["pred_label"], expected.pred_label.numpy())


# ---------------------------------------------------------------------------------------------------- API & errors
def test_lightning_contract():
    from anomalib import LearningType

    model = tiny()
    assert model.learning_type == LearningType.ZERO_SHOT
    assert model.trainer_arguments == {"max_epochs": 1, "limit_train_batches": 0, "num_sanity_val_steps": 0}
    assert model.configure_optimizers() is None
    assert model.training_step(None) is None
    assert model.model.feature_extractor.layers == ["blocks.2", "blocks.4"]
    assert model.model.feature_extractor.reductions == [8, 16]
    assert sum(p.requires_grad for p in model.parameters()) == 0
    assert model.post_processor is not None
    for value in model.hparams.values():
        assert value is None or isinstance(value, (str, int, float, bool, list, tuple))


def test_resolve_layers_and_paper_defaults():
    assert resolve_layers("wide_resnet50_2.tv_in1k", None) == ["layer2", "layer3"]
    assert resolve_layers("tf_efficientnet_lite0", None) == ["blocks.2", "blocks.4"]
    assert resolve_layers("resnet18", (2, 3)) == [2, 3]
    with pytest.raises(ValueError, match="no feature layer at stride 8"):
        resolve_layers("vit_tiny_patch16_224", None)
    model = GRNR(backbone="resnet18", weights=None, visualizer=False)  # paper defaults otherwise
    assert model.input_size == (320, 320)
    assert (model.model.num_global_priors, model.model.lam, model.model.sigma) == (40, 5.0, 3.0)
    assert model.model.grid_sizes((320, 320)) == [(40, 40), (20, 20)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1.0}, "lam must be a finite number >= 0"),
        ({"lam": float("nan")}, "lam must be a finite number >= 0"),
        ({"num_global_priors": 0}, "num_global_priors must be an integer >= 1"),
        ({"num_global_priors": 16}, "more than num_global_priors=16 cells"),  # 4x4 grid at stride 16
        ({"image_size": 16}, "Input 16x16 gives a 2x2 feature grid"),
        ({"border_cut": (3,)}, "border_cut needs one non-negative value per layer"),
        ({"distance_chunk": 0}, "distance_chunk must be >= 1"),
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": -1e-6}, "eps must be a finite number > 0"),
        ({"eps": 1e-9}, "eps must be at least the float32 machine epsilon"),
        ({"backbone": "not_a_backbone"}, "Unknown timm backbone"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_errors():
    model = tiny().model
    images = torch.randn(1, 3, 64, 64)
    images[0, 1, 3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN or inf in the .*images"):
        model(images)
    with pytest.raises(ValueError, match=r"Input 32x32 gives a 2x2 feature grid at layer 'blocks\.4'"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="RGB batch"):
        model(torch.randn(1, 1, 64, 64))


def test_autocast_half_precision_and_nan_features_are_refused(monkeypatch):
    model = tiny().model
    images = torch.randn(1, 3, 64, 64)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(RuntimeError, match="refuses to run under autocast"),
    ):
        model(images)
    with pytest.raises(TypeError, match="GRNR runs in float32"):
        model(images.half())
    nan_features = [torch.zeros(1, 40, 8, 8), torch.full((1, 112, 4, 4), float("nan"))]
    monkeypatch.setattr(model.feature_extractor, "forward", lambda images: nan_features)
    with pytest.raises(NonFiniteError, match=r"NaN or inf in the backbone features of layer 'blocks\.4'.*weights file"):
        model(images)
