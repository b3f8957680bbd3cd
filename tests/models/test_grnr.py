"""GRNR: the closed form against brute-force least squares, self filtering, the exportable solver, defect maps,
zero-shot Engine runs, export parity and input errors (tiny CPU settings)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalib_recon.models.image.grnr import GRNR
from anomalib_recon.models.image.grnr.torch_model import (
    global_prior_sum,
    grnr_residual,
    mean_distance_to_others,
    neighbourhood_support,
    regularised_projection,
    resolve_layers,
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
    """min_w ‖q − wS‖² + λ Σ_j ‖μ_j − wS‖² as one stacked least-squares problem (torch.linalg.lstsq)."""
    q_all = pooled[b].flatten(1).T  # (N, C)
    q = pooled[b, :, y, x]
    s = _brute_neighbours(pooled, b, y, x)  # (8, C)
    blocks, targets = [s.T], [q]
    if lam > 0:
        for j in sorted(_brute_prior_indices(q_all, k)):
            blocks.append(math.sqrt(lam) * s.T)
            targets.append(math.sqrt(lam) * q_all[j])
    w = torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets).unsqueeze(-1)).solution.squeeze(-1)
    return float((q - w @ s).norm())


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
        torch.testing.assert_close(global_prior_sum(q[b : b + 1], k, chunk_size=7)[0], q[b, sorted(chosen)].sum(0))


def test_self_filtering_is_accurate_in_float32_for_nearly_identical_features():
    # far from 0 and close together: the matmul form cancels badly unless centred, and self-distances (rounding
    # noise, not zero) must not enter the mean
    q = torch.full((1, 10, 64), 3.0) + torch.randn(1, 10, 64) * 1e-3
    brute = torch.cdist(q.double(), q.double()).sum(-1) / 9
    torch.testing.assert_close(mean_distance_to_others(q).double(), brute, atol=2e-3, rtol=0.05)


def test_closed_form_equals_projection_and_demo_formula():
    gen = torch.Generator().manual_seed(2)
    pooled = torch.randn(2, 12, 6, 6, generator=gen, dtype=torch.float64)
    q = pooled.flatten(2).transpose(1, 2)
    s = neighbourhood_support(pooled)
    k, lam = 5, 5.0
    mu_sum = global_prior_sum(q, k)
    target = (q + lam * mu_sum[:, None]) / (1 + lam * k)
    projected = regularised_projection(s, target, eps=0.0)
    interior = torch.tensor([y * 6 + x for y in range(1, 5) for x in range(1, 5)])
    s, q, projected = s[:, interior], q[:, interior], projected[:, interior]
    # the demo's closed form: w = (q Sᵀ + λ Σ_j μ_j Sᵀ) [(1 + λK) S Sᵀ]⁻¹, q̂ = w S (torch.linalg.solve)
    rhs = ((q + lam * mu_sum[:, None]).unsqueeze(-2) @ s.transpose(-1, -2)).squeeze(-2)
    gram = (1 + lam * k) * (s @ s.transpose(-1, -2))
    w = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)  # G symmetric: w G = r  <=>  G wᵀ = rᵀ
    torch.testing.assert_close(projected, (w.unsqueeze(-2) @ s).squeeze(-2), rtol=1e-8, atol=1e-8)


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
    # border cut: the stride-8 map's outer cell ring sits at the map minimum
    feature = model.feature_extractor(images)[0]
    layer_map = model.scale_map(feature, (1, 1))
    assert (layer_map[:, :, :1] == layer_map.amin(dim=(-2, -1), keepdim=True)).all()
    assert (layer_map[:, :, 1:-1, 1:-1] > layer_map.amin(dim=(-2, -1), keepdim=True)).any()


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
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(images)
    with pytest.raises(ValueError, match=r"Input 32x32 gives a 2x2 feature grid at layer 'blocks\.4'"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="RGB batch"):
        model(torch.randn(1, 1, 64, 64))
