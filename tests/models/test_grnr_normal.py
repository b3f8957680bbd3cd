"""GRNR with priors from normal images (``prior_source="normal"``): the nearest-bank-rows search against a float64
brute force, the per-position regression against stacked least squares, the banks against the pooled features of
the normal images (fit wiring, few-shot count, coreset; a one-class DDP fit refused), the inference wiring against
brute force, the mechanism (a large foreign region that self filtering takes for normal), learning types and the
refusal before the banks exist, checkpoints into a fresh model, errors, and the shared contract with the banks in
the exported graph. Tiny CPU settings (Lite0, 64 px) unless a test needs a texture at 128 px."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from anomalib import LearningType
from lightning.pytorch import Callback

from anomalib_recon.components.checkpoint import CheckpointMismatchError
from anomalib_recon.components.guards import NonFiniteError, UntrainedModelError
from anomalib_recon.models.image.grnr import GRNR
from anomalib_recon.models.image.grnr.torch_model import (
    SHORTLIST_EXTRA,
    nearest_bank_rows,
    neighbourhood_regression,
    neighbourhood_support,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"backbone": "tf_efficientnet_lite0", "weights": None, "image_size": 64, "num_global_priors": 8}
NORMAL = {**TINY, "prior_source": "normal"}


def tiny(**kwargs) -> GRNR:
    """Random-weight Lite0 at 64 px (8x8 and 4x4 grids, 40 and 112 channels), priors from normal images."""
    return GRNR(**{**NORMAL, "visualizer": False, **kwargs})


def _squared_f64(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """All squared distances ``(Q, M)`` from direct differences in float64 (no matrix-product cancellation)."""
    return ((queries.double()[:, None, :] - bank.double()[None]) ** 2).sum(-1)


def _row_indices(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index in ``bank`` of each returned row (rows are copies of bank rows), ``(Q, k)``."""
    flat = rows.reshape(-1, rows.shape[-1])
    matches = (flat[:, None, :] == bank[None]).all(-1)
    assert matches.any(-1).all(), "a returned row is not a bank row"
    return matches.float().argmax(-1).reshape(rows.shape[:2])


# ---------------------------------------------------------------------------------------------------- the search
@pytest.mark.parametrize(("channels", "offset"), [(40, 1.0), (112, 50.0), (1024, 10.0)])
@pytest.mark.parametrize(("chunk", "block"), [(7, 5), (100, 64), (5000, 1024)])
def test_nearest_bank_rows_are_the_float64_nearest_rows_in_every_chunking(channels, offset, chunk, block):
    # features far from 0 (ReLU features are; the textbook ‖q‖² + ‖b‖² − 2q·b cancels there) with a 1 % spread
    gen = torch.Generator().manual_seed(channels)
    base = offset * (1 + torch.rand(channels, generator=gen))
    bank = base + 0.01 * offset * torch.randn(300, channels, generator=gen)
    queries = base + 0.01 * offset * torch.randn(37, channels, generator=gen)
    k = 6
    rows, squared = nearest_bank_rows(queries, bank, k, chunk_size=chunk, query_block=block)
    assert rows.shape == (37, k, channels) and squared.shape == (37, k)
    reference = _squared_f64(queries, bank)
    expected = reference.topk(k, dim=1, largest=False)
    assert torch.equal(_row_indices(rows, bank), expected.indices)  # the same rows, nearest first
    # the returned distances are the direct ones of those rows, exact to float32 rounding
    torch.testing.assert_close(squared.double(), expected.values, rtol=2e-6, atol=0)
    assert (squared[:, 1:] >= squared[:, :-1]).all()


def test_the_shortlist_rerank_is_what_makes_ties_of_far_features_exact():
    # the textbook matrix-product form in float32 ranks these rows wrongly (features ~ 50-100, neighbours 0.5 apart):
    # the test data is hard enough to catch a search that ranks by it alone
    gen = torch.Generator().manual_seed(0)
    base = 50.0 * (1 + torch.rand(112, generator=gen))
    bank, queries = (
        base + 0.05 * torch.randn(500, 112, generator=gen),
        base + 0.05 * torch.randn(20, 112, generator=gen),
    )
    reference = _squared_f64(queries, bank).topk(5, dim=1, largest=False).indices
    textbook = queries.pow(2).sum(-1, keepdim=True) + bank.pow(2).sum(-1) - 2 * queries @ bank.T
    assert not torch.equal(textbook.topk(5, dim=1, largest=False).indices, reference)
    rows, _ = nearest_bank_rows(queries, bank, 5, chunk_size=128)
    assert torch.equal(_row_indices(rows, bank), reference)


def test_tight_clusters_far_from_the_bank_centre_stay_within_the_float32_bound():
    """Two far-apart clusters of near-duplicates: the float32 matrix product cannot rank rows inside a cluster
    (their squared distances differ by less than its rounding), so rows within that band may be exchanged. What
    stays guaranteed: only the query's own cluster is returned, the returned distances are those of the returned
    rows, and each exceeds the true one by at most the documented band ``4 C ε (R_b² + R_q R_b)``."""
    gen = torch.Generator().manual_seed(1)
    channels, k = 112, 10
    centres = 10.0 * torch.randn(2, channels, generator=gen)
    bank = torch.cat([c + 1e-3 * torch.randn(400, channels, generator=gen) for c in centres])
    queries = centres[0] + 1e-3 * torch.randn(30, channels, generator=gen)
    rows, squared = nearest_bank_rows(queries, bank, k, chunk_size=300)
    index = _row_indices(rows, bank)
    assert (index < 400).all()  # the query's cluster only
    reference = _squared_f64(queries, bank)
    torch.testing.assert_close(squared.double(), reference.gather(1, index), rtol=2e-6, atol=0)
    centre = bank.double().mean(0)
    r_b = (bank.double() - centre).norm(dim=1).max()
    r_q = (queries.double() - centre).norm(dim=1, keepdim=True)
    band = 4 * channels * torch.finfo(torch.float32).eps * (r_b**2 + r_q * r_b)
    truth = reference.topk(k, dim=1, largest=False).values
    assert (squared.double() <= truth + band).all()


def test_nearest_bank_rows_errors():
    bank = torch.rand(5, 4)
    with pytest.raises(ValueError, match=r"has 5 vectors, fewer than the 6 nearest.*normal_images"):
        nearest_bank_rows(torch.rand(3, 4), bank, 6)
    with pytest.raises(ValueError, match=r"expects queries \(Q, 4\)"):
        nearest_bank_rows(torch.rand(3, 5), bank, 2)
    with pytest.raises(ValueError, match="chunk_size and query_block must be >= 1"):
        nearest_bank_rows(torch.rand(3, 4), bank, 2, chunk_size=0)
    assert SHORTLIST_EXTRA >= 1


# ---------------------------------------------------------------------------------------------------- the solve
def _stacked_lstsq(support: torch.Tensor, query: torch.Tensor, priors: torch.Tensor, lam: float) -> torch.Tensor:
    """min_w ‖q − wS‖² + λ Σ_j ‖μ_j − wS‖² per position as one stacked least-squares problem (float64)."""
    s, q, mu = support.double(), query.double(), priors.double()
    out = torch.empty(q.shape[:2], dtype=torch.float64)
    for b in range(q.shape[0]):
        for n in range(q.shape[1]):
            blocks = [s[b, n].T] + [math.sqrt(lam) * s[b, n].T] * mu.shape[2]
            target = torch.cat([q[b, n], *(math.sqrt(lam) * mu[b, n])])
            w = torch.linalg.lstsq(torch.cat(blocks), target.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
            out[b, n] = (q[b, n] - w @ s[b, n]).norm()
    return out


@pytest.mark.parametrize("lam", [0.7, 5.0])
def test_per_position_priors_solve_the_stacked_least_squares_problem(lam):
    # float64 with a negligible ridge against the ridge-free brute force, as the per-image tests do: the borders of
    # a reflect-padded 5x4 grid repeat neighbours, so their systems are singular but for the ridge
    gen = torch.Generator().manual_seed(0)
    pooled = torch.rand(2, 12, 5, 4, generator=gen, dtype=torch.float64)
    support, query = neighbourhood_support(pooled), pooled.flatten(2).transpose(1, 2)
    priors = torch.rand(2, 20, 3, 12, generator=gen, dtype=torch.float64)  # every position its own K = 3 priors
    expected = _stacked_lstsq(support, query, priors, lam)
    got = neighbourhood_regression(support, query, priors, lam, eps=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # the model's float32 solve with its default ridge, on the same problem
    got32 = neighbourhood_regression(support.float(), query.float(), priors.float(), lam)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-6)
    # the same priors at every position is the per-image form
    shared = priors[:, :1].expand(-1, 20, -1, -1)
    torch.testing.assert_close(
        neighbourhood_regression(support, query, shared, lam, eps=1e-12),
        neighbourhood_regression(support, query, priors[:, 0], lam, eps=1e-12),
    )
    with pytest.raises(ValueError, match=r"per-position priors must have shape \(B, N, K, C\) = \(2, 20, K, 12\)"):
        neighbourhood_regression(support, query, torch.rand(2, 19, 3, 12), lam)


# ---------------------------------------------------------------------------------------------------- fit wiring
def _brute_bank(model: GRNR, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the 3x3-average-pooled features (count_include_pad) of every position of every image, image by
    image and row-major: what the bank must hold."""
    banks: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for image in images:
            features = model.model.feature_extractor(model.pre_processor.transform(image.unsqueeze(0)))
            for layer, feature in enumerate(features):
                pooled = F.avg_pool2d(feature, 3, stride=1, padding=1, count_include_pad=True)[0]
                banks[layer] += [pooled[:, y, x] for y in range(pooled.shape[1]) for x in range(pooled.shape[2])]
    return [torch.stack(b) for b in banks]


def _training_images(datamodule) -> list[torch.Tensor]:
    datamodule.setup()
    return [datamodule.train_data[i].image for i in range(len(datamodule.train_data))]


@pytest.mark.parametrize("normal_images", [None, 3])
def test_fit_builds_banks_of_exactly_the_pooled_features_of_the_normal_images(tiny_category, tmp_path, normal_images):
    from tests.conftest import cpu_engine, folder_datamodule

    torch.manual_seed(0)
    model = tiny(normal_images=normal_images, evaluator=False)
    assert model.configure_optimizers() is None
    assert not any(p.requires_grad for p in model.parameters())  # nothing receives a gradient: nothing is trained
    datamodule = folder_datamodule(tiny_category)
    engine = cpu_engine(tmp_path, max_steps=3, enable_model_summary=False)
    before = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    engine.fit(model, datamodule=datamodule)
    # one-class: one step-free batch (Lightning counts it); few-shot: no training batch at all
    assert engine.trainer.global_step == (1 if normal_images is None else 0)
    after = model.model.feature_extractor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone (and its batch norms) untouched
    images = _training_images(datamodule)[: normal_images or 8]
    expected = _brute_bank(model, images)
    assert [tuple(e.shape) for e in expected] == [(len(images) * 64, 40), (len(images) * 16, 112)]
    for layer, bank in enumerate(expected):
        torch.testing.assert_close(model.model.bank(layer), bank, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.model.bank_centre(layer), bank.double().mean(0).float())
    assert model.bank_stats["bank_images"] == len(images)
    assert model.bank_stats["bank_vectors_0"] == len(images) * 64
    assert model._recon_trained


def test_training_step_is_a_no_op_and_banks_come_from_the_shared_loop(monkeypatch):
    model = tiny()
    calls = []

    def fake_collect(module, fn, max_images=None, dataloader=None, dataset=None):
        calls.append((module, fn, max_images, dataloader))
        return fn(torch.rand(2, 3, 64, 64))

    monkeypatch.setattr("anomalib_recon.models.image.grnr.lightning_model.collect_normal_images", fake_collect)
    assert model.training_step(torch.rand(2, 3, 64, 64)) is None
    assert not model.model.has_banks
    model.normal_images = 5
    sizes = model.build_banks()
    ((module, fn, max_images, dataloader),) = calls
    assert module is model and fn == model.model.bank_rows and max_images == 5 and dataloader is None
    assert sizes == [2 * 64, 2 * 16]


def test_coreset_keeps_a_deterministic_subset_of_each_bank():
    model = tiny()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rows = model.model.bank_rows(images)
    model.model.set_banks(rows)
    full = [model.model.bank(i).clone() for i in range(2)]
    sizes = model.model.set_banks(rows, coreset_ratio=0.5)
    assert sizes == [128, 32]
    first = [model.model.bank(i).clone() for i in range(2)]
    model.model.set_banks(rows, coreset_ratio=0.5)
    for layer in range(2):
        assert torch.equal(model.model.bank(layer), first[layer])  # same rows every build (and on every rank)
        assert (first[layer][:, None, :] == full[layer][None]).all(-1).any(-1).all()  # a subset of the bank


def test_a_bank_smaller_than_k_is_one_clear_error():
    model = tiny(num_global_priors=40)  # 64 px: 16 vectors per image at stride 16
    rows = model.model.bank_rows(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"bank of layer 'blocks\.4' holds 32 normal feature vectors.*num_global_pri"):
        model.model.set_banks(rows)
    with pytest.raises(ValueError, match=r"coreset_ratio=0\.1"):
        tiny().model.set_banks(rows, coreset_ratio=0.1)  # 3 of 32 vectors left, K = 8
    plain = tiny(num_global_priors=40, regression=False)  # 1-NN needs a single vector
    assert plain.model.set_banks(rows) == [128, 32]
    with pytest.raises(ValueError, match=r"bank rows must be \(n >= 1 images, 4352 values"):  # 64*40 + 16*112
        model.model.set_banks(rows[:, :-1])
    bad = rows.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf in the pooled features of the normal images"):
        model.model.set_banks(bad)


# ---------------------------------------------------------------------------------------------------- inference
def _fitted(seed: int = 0, **kwargs) -> GRNR:
    model = tiny(**kwargs)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    model.model.set_banks(model.model.bank_rows(images))
    return model


@pytest.mark.parametrize(("k", "lam"), [(3, 0.7), (8, 5.0)])
def test_scale_map_regresses_on_the_k_nearest_bank_vectors_of_each_pooled_feature(k, lam):
    model = _fitted(num_global_priors=k, lam=lam, knn_chunk_size=50).model
    with torch.no_grad():
        features = model.feature_extractor(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9)))
    for layer, feature in enumerate(features):
        got = model.scale_map(feature, (0, 0), layer)[0, 0]
        pooled = F.avg_pool2d(feature, 3, stride=1, padding=1)
        query = pooled.flatten(2).transpose(1, 2)
        bank = model.bank(layer)
        nearest = _squared_f64(query[0], bank).topk(k, dim=1, largest=False).indices  # brute force, float64
        priors = bank[nearest].unsqueeze(0)  # (1, N, K, C)
        expected = _stacked_lstsq(neighbourhood_support(pooled), query, priors, lam)[0]
        torch.testing.assert_close(got.flatten().double(), expected, rtol=1e-3, atol=1e-4)


def test_regression_false_is_the_distance_to_the_nearest_bank_vector_and_lambda_zero_ignores_the_bank():
    model = _fitted(regression=False, knn_chunk_size=33).model
    with torch.no_grad():
        features = model.feature_extractor(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    for layer, feature in enumerate(features):
        query = F.avg_pool2d(feature, 3, stride=1, padding=1).flatten(2).transpose(1, 2).reshape(-1, feature.shape[1])
        expected = _squared_f64(query, model.bank(layer)).min(dim=1).values.sqrt()
        got = model.scale_map(feature, (0, 0), layer)
        torch.testing.assert_close(got.flatten().double(), expected, rtol=1e-5, atol=1e-6)
    # λ = 0: plain neighbourhood regression, the bank plays no part (same as the zero-shot model at λ = 0)
    normal = _fitted(lam=0.0).model
    image = GRNR(**{**TINY, "lam": 0.0, "visualizer": False}).model
    image.load_state_dict(normal.state_dict(), strict=False)
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(normal(x).anomaly_map, image(x).anomaly_map, rtol=0, atol=0)


def _texture(size: int, gen: torch.Generator, foreign: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A gray grating with noise (ImageNet-normalised); the left ``foreign`` fraction another grating."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    image = 0.5 + 0.25 * torch.sin(xx / 2.5 + yy / 6.0) + 0.03 * torch.randn(size, size, generator=gen)
    inside = torch.zeros(size, size, dtype=torch.bool)
    if foreign:
        width = int(size * foreign)
        other = 0.5 + 0.25 * torch.sin(yy / 1.7 - xx / 4.0) + 0.03 * torch.randn(size, size, generator=gen)
        image[:, :width], inside[:, :width] = other[:, :width], True
    image = image.clamp(0, 1).expand(3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((image - mean) / std).unsqueeze(0), inside


def test_normal_priors_flag_a_large_foreign_region_that_self_filtering_takes_for_normal():
    # 60 % of the image is another texture: self filtering's "most typical" features are the foreign ones, so the
    # zero-shot map is higher on the normal part; priors from normal images keep the foreign part anomalous
    ratios, scores = {}, {}
    for source in ("image", "normal"):
        gen = torch.Generator().manual_seed(0)
        model = GRNR(backbone="tf_efficientnet_lite0", weights="imagenet", image_size=128, prior_source=source).model
        if source == "normal":
            model.set_banks(model.bank_rows(torch.cat([_texture(128, gen)[0] for _ in range(3)])))
        defect, inside = _texture(128, gen, 0.6)
        clean, _ = _texture(128, gen)
        with torch.no_grad():
            out, ref = model(defect), model(clean)
        amap = out.anomaly_map[0, 0]
        ratios[source] = (amap[inside].mean() / amap[~inside].mean()).item()
        scores[source] = (out.pred_score / ref.pred_score).item()
    # measured: image 0.29 (inverted), normal 5.4; defect/clean scores 6.4 and 22.9
    assert ratios["image"] < 1.0 < 3.0 < ratios["normal"]
    assert scores["normal"] > 2 * scores["image"] > 2.0


# ---------------------------------------------------------------------------------------------------- lightning
def test_learning_types_trainer_arguments_and_buffers():
    zero = GRNR(**{**TINY, "visualizer": False})
    assert zero.learning_type == LearningType.ZERO_SHOT and not zero.requires_training
    assert zero.resizable_buffers == ()
    assert not any("bank" in key for key in zero.state_dict())  # the default model's state is unchanged
    one = tiny()
    assert one.learning_type == LearningType.ONE_CLASS and one.requires_training
    assert one.trainer_arguments == {"max_epochs": 1, "limit_train_batches": 1, "num_sanity_val_steps": 0}
    few = tiny(normal_images=4)
    assert few.learning_type == LearningType.FEW_SHOT and few.requires_training
    assert few.trainer_arguments == zero.trainer_arguments
    assert one.resizable_buffers == ("normal_bank_0", "normal_bank_1")
    assert {k: tuple(v.shape) for k, v in one.state_dict().items() if "bank" in k} == {
        "model.normal_bank_0": (0, 40),
        "model.normal_bank_1": (0, 112),
        "model.bank_centre_0": (40,),
        "model.bank_centre_1": (112,),
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prior_source": "train"}, r"prior_source must be one of \('image', 'normal'\)"),
        ({"prior_source": "image", "regression": False}, "regression=False .* needs a bank: prior_source='normal'"),
        ({"prior_source": "image", "normal_images": 4}, "prior_source='image' .* uses no training images"),
        ({"prior_source": "image", "coreset_ratio": 0.1}, "prior_source='image' .* uses no training images"),
        ({"normal_images": 0}, "normal_images must be an integer >= 1"),
        ({"coreset_ratio": 0.0}, r"coreset_ratio must be in \(0, 1\]"),
        ({"coreset_ratio": float("nan")}, r"coreset_ratio must be in \(0, 1\]"),
        ({"knn_chunk_size": 0}, "knn_chunk_size must be an integer >= 1"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_a_direct_call_without_banks_says_to_fit_and_the_grid_needs_no_k_cells():
    model = tiny(num_global_priors=40)  # 4x4 = 16 cells at stride 16 < K: fine, the priors come from the bank
    with pytest.raises(ValueError, match=r"no bank of normal features yet: fit it first"):
        model.model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"Input 16x16 gives a 1x1 feature grid at layer 'blocks\.4'.*at least 2x2"):
        tiny(image_size=16)


@pytest.mark.slow
def test_untrained_model_is_refused_and_few_shot_builds_its_banks_when_it_validates(tiny_category, tmp_path):
    from tests.conftest import cpu_engine, folder_datamodule

    datamodule = folder_datamodule(tiny_category)
    for kwargs in ({}, {"normal_images": 2}):
        model = tiny(**kwargs)
        with pytest.raises(UntrainedModelError, match="has not been trained: predict would score without its bank"):
            cpu_engine(tmp_path / "p").predict(model, data_path=tiny_category / "test" / "defect")
    with pytest.raises(UntrainedModelError, match="has not been trained: test would score without its bank"):
        cpu_engine(tmp_path / "t").test(tiny(), datamodule=datamodule)
    # few-shot: anomalib's Engine.test validates first, which builds the banks from the first 2 training images
    few = tiny(normal_images=2, weights="imagenet")
    results = cpu_engine(tmp_path / "f").test(few, datamodule=datamodule)[0]
    assert few.model.bank(0).shape == (2 * 64, 40)
    assert results["image_AUROC"] > 0.9


def test_checkpoint_state_loads_into_a_fresh_model_and_nan_banks_are_refused(tmp_path):
    fitted = _fitted()
    state = fitted.state_dict()
    fresh = tiny()
    fresh.load_state_dict(state)  # banks re-sized from the stored ones
    x = torch.rand(2, 3, 64, 64)
    fitted.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).anomaly_map, fitted(x).anomaly_map, rtol=0, atol=0)
    state["model.normal_bank_1"][5, 7] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"bank of normal features of layer 'blocks\.4' \(model\.normal_bank_1\).*corrupt"
    ):
        tiny().load_state_dict(state)
    # a normal-prior checkpoint does not fit a zero-shot model: one message naming the setting
    checkpoint = {"state_dict": fitted.state_dict(), "hyper_parameters": dict(fitted.hparams)}
    checkpoint["anomalib_recon"] = {"model": "GRNR", "input_size": [64, 64]}
    zero = GRNR(**{**TINY, "visualizer": False})
    with pytest.raises(CheckpointMismatchError, match="prior_source='normal' \\(this model: 'image'\\)"):
        zero.on_load_checkpoint(checkpoint)


# ---------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_a_one_class_fit_under_ddp_is_refused_with_what_to_do(tiny_category, tmp_path):
    """Lightning's DDP refuses a model with no trainable parameter in a deep traceback; GRNR says what to do."""
    from torch.multiprocessing.spawn import ProcessRaisedException

    from tests.conftest import folder_datamodule
    from tests.ddp import fit_ddp

    datamodule = folder_datamodule(tiny_category, batch_size=3)
    with pytest.raises(ProcessRaisedException, match=r"(?s)cannot wrap \(2 processes\).*devices=1.*normal_images"):
        fit_ddp(tiny(evaluator=False), datamodule, tmp_path, max_steps=1)


class _SaveBanks(Callback):
    """Each DDP rank saves its banks when validation ends (few-shot: anomalib's ``Engine.fit`` only validates)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_validation_end(self, trainer, pl_module) -> None:
        banks = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if "bank" in k}
        torch.save(banks, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_few_shot_banks_under_ddp_hold_every_ranks_images_and_equal_the_single_process_build(tiny_category, tmp_path):
    from torch.utils.data import DataLoader

    from tests.conftest import cpu_engine, folder_datamodule
    from tests.ddp import assert_same_state, spawn_strategy

    torch.manual_seed(0)
    model = tiny(normal_images=8, evaluator=False)  # every one of the 8 training images: 4 per rank
    datamodule = folder_datamodule(tiny_category, batch_size=3)
    callbacks = [_SaveBanks(tmp_path)]
    engine = cpu_engine(tmp_path / "run", max_steps=1, strategy=spawn_strategy(), devices=2, callbacks=callbacks)
    engine.fit(model, datamodule=datamodule)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_state(states)
    assert states[0]["model.normal_bank_0"].shape == (8 * 64, 40)  # every rank holds all 8 images' features
    single = tiny(normal_images=8, evaluator=False)
    single.load_state_dict({k: v for k, v in model.state_dict().items() if "bank" not in k}, strict=False)
    datamodule.setup()
    train = datamodule.train_data
    single.build_banks(DataLoader(train, batch_size=5, shuffle=False, collate_fn=train.collate_fn))
    for key, value in states[0].items():  # row by row in dataset order; batch composition moves float32 by ~5e-6
        expected = single.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


class _Fitted:
    """What ``tests/test_contract.py::test_model_contract`` reads: a GRNR with normal priors fitted by the Engine."""

    def __init__(self, kwargs: dict, root: Path, work: Path) -> None:
        from tests.conftest import cpu_engine, folder_datamodule

        self.name, self.size, self.root, self.work, self.steps = "GRNR", 64, root, work, 1
        torch.manual_seed(0)
        self.model = GRNR(**kwargs)
        self.datamodule = folder_datamodule(root)
        self.engine = cpu_engine(work / "run", max_steps=1)
        self.engine.fit(self.model, datamodule=self.datamodule)


@pytest.mark.slow
@pytest.mark.export
@pytest.mark.parametrize(
    "kwargs",
    [{"knn_chunk_size": 100}, {"normal_images": 3, "regression": False, "knn_chunk_size": 50}],
    ids=["one_class_regression", "few_shot_knn"],
)
def test_contract_with_the_banks_in_the_checkpoint_and_the_exported_graph(kwargs, tmp_path, monkeypatch):
    """The shared contract (Engine fit/validate/test/predict, safe checkpoint into a fresh model, torch/ONNX/OpenVINO
    fp32 parity <= 1e-4 with the banks and the chunked search in the graph), and bad raw images refused."""
    from tests.conftest import write_textured_category
    from tests.test_contract import test_bad_raw_images_are_refused_before_the_pre_processor as bad_images_body
    from tests.test_contract import test_model_contract as contract_body

    root = write_textured_category(tmp_path / "stripes", size=64, defect=12)
    fitted = _Fitted({**NORMAL, "weights": "imagenet", **kwargs}, root, tmp_path)
    assert fitted.model.model.has_banks and fitted.model.post_processor.calibrated
    (tmp_path / "contract").mkdir()
    contract_body(fitted, tmp_path / "contract", monkeypatch)
    bad_images_body(fitted)
