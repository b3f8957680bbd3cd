"""benchmarks/baselines.py: the MeanFeature baseline (per-position distance to the mean normal feature)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from tests.benchmarks.conftest import load_script
from tests.conftest import cpu_engine, folder_datamodule, write_textured_category

LITE = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def baselines() -> ModuleType:
    return load_script("baselines")


def tiny_model(baselines: ModuleType, layers=(1, 2)):
    """Random-init Lite0 (no weights needed), two layers at strides 4 and 8."""
    return baselines.MeanFeatureModel(LITE, layers=list(layers), weights=None).eval()


def test_mean_is_the_per_position_mean_of_all_training_embeddings(baselines: ModuleType) -> None:
    model = tiny_model(baselines)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, 3, 32, 32, generator=gen) for n in (3, 2, 4)]
    embeddings = [model.embed(b) for b in batches]
    for e in embeddings:
        model.accumulate(e)
    model.fit()
    brute = torch.cat(embeddings).mean(dim=0)
    assert model.mean.shape == brute.shape == (sum(model.feature_extractor.out_dims), 8, 8)  # stride-4 grid
    assert torch.allclose(model.mean, brute, atol=1e-5)
    # the stride-8 layer is resized (nearest) onto the stride-4 grid: its channels repeat over 2x2 cells
    deep = model.mean[model.feature_extractor.out_dims[0] :]
    assert torch.equal(deep[:, 0::2, 0::2], deep[:, 1::2, 1::2])


def test_map_is_zero_on_the_mean_image_and_grows_with_the_distance(baselines: ModuleType) -> None:
    model = tiny_model(baselines)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.accumulate(model.embed(image))
    model.fit()
    same = model(image)
    assert same.anomaly_map.shape == (1, 1, 32, 32) and same.pred_score.shape == (1,)
    assert same.anomaly_map.abs().max() < 1e-5
    out = model(torch.cat([image + 0.05, image + 0.5]))
    assert 0 < out.pred_score[0] < out.pred_score[1]
    # the score is the max of the (blurred) map
    assert torch.allclose(out.pred_score, out.anomaly_map.amax(dim=(1, 2, 3)))


def test_throughput_builds_and_fits_meanfeature_as_a_memory_bank_model(harness: ModuleType) -> None:
    """benchmarks/throughput.py (and so gpu_check.sh) fits memory-bank models by forwarding in training mode."""
    throughput = load_script("throughput")
    args = throughput.parse(["--models", "MeanFeature", "--image-size", "64", "--fit-images", "4"])
    module, info = throughput.build("MeanFeature", args, harness)
    assert info["fitted_on_random_images"] == 4 and module.model.mean.shape[-2:] == (16, 16)
    out = module.model(torch.rand(2, 3, 64, 64))
    assert out.anomaly_map.shape == (2, 1, 64, 64) and torch.all(out.pred_score > 0)


def test_fitted_buffers_round_trip_through_a_state_dict(baselines: ModuleType) -> None:
    model = tiny_model(baselines)
    model.accumulate(model.embed(torch.rand(2, 3, 32, 32)))
    model.fit()
    fresh = tiny_model(baselines)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(fresh(x).anomaly_map, model(x).anomaly_map)


def test_clear_errors_before_fit_and_on_another_grid(baselines: ModuleType) -> None:
    model = tiny_model(baselines)
    with pytest.raises(ValueError, match="not fitted"):
        model(torch.rand(1, 3, 32, 32))
    model.accumulate(model.embed(torch.rand(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="resize every image to one size"):
        model.accumulate(model.embed(torch.rand(1, 3, 64, 64)))
    model.fit()
    with pytest.raises(ValueError, match="test at the training image size"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no training images"):
        tiny_model(baselines).fit()


def test_harness_builds_meanfeature_from_baselines_with_padims_layers(harness: ModuleType) -> None:
    import anomalib.models as am
    from torchvision.transforms.v2 import Resize

    assert not hasattr(am, "MeanFeature")  # a benchmark baseline, not a registered model
    model = harness.build_model("MeanFeature", argparse.Namespace(backbone=LITE, image_size=64, model_args={}))
    assert type(model).__name__ == "MeanFeature" and type(model).__module__ == "benchmark_baselines"
    assert model.model.feature_extractor.layers == harness.LITE_LAYERS["Padim"]
    resize = next(t for t in model.pre_processor.transform.transforms if isinstance(t, Resize))
    assert list(resize.size) == [64, 64] and resize.antialias is False  # the protocol's one resize


def _raw_outputs(model, datamodule):
    """Raw (un-normalised) maps, scores, labels and masks over the test split, through the model's pre-processor."""
    datamodule.setup()
    maps, scores, labels, masks = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, gt_mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            out = model.model(images)
            maps.append(out.anomaly_map)
            scores.append(out.pred_score)
            labels.append(batch.gt_label)
            masks.append(gt_mask)
    return torch.cat(maps), torch.cat(scores), torch.cat(labels), torch.cat(masks)


@pytest.mark.slow
def test_meanfeature_finds_synthetic_defects_after_one_pass(baselines: ModuleType, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    root = write_textured_category(tmp_path / "stripes", size=64, n_train=8, n_good=6, n_defect=6)
    model = baselines.MeanFeature(backbone=LITE, layers=["blocks.1", "blocks.2", "blocks.4"], image_size=64)
    model.visualizer = None
    datamodule = folder_datamodule(root, val_split_mode="same_as_test")  # as the harness: all 12 in test
    cpu_engine(tmp_path / "run", max_steps=10).fit(model=model, datamodule=datamodule)
    assert int(model.model.count) == 0 and model.model.mean.shape[-2:] == (16, 16)  # fitted, 64 px / 4
    model.eval()
    maps, scores, labels, masks = _raw_outputs(model, datamodule)
    assert maps.shape == (12, 1, 64, 64)  # the input size
    assert roc_auc_score(labels.numpy(), scores.numpy()) >= 0.9  # well above chance (0.5)
    defective = labels.bool()
    inside = maps[defective][masks[defective].unsqueeze(1) > 0].mean()
    outside = maps[defective][masks[defective].unsqueeze(1) == 0].mean()
    assert inside > 1.5 * outside
    pixel = roc_auc_score(masks.flatten().numpy() > 0, maps.flatten().numpy())
    assert pixel >= 0.8


@pytest.mark.slow
def test_harness_runs_meanfeature_end_to_end(harness: ModuleType, offline_hf_cache: Path, tmp_path: Path) -> None:
    del offline_hf_cache
    root = write_textured_category(tmp_path / "stripes", size=64)
    argv = ["--dataset", "folder", "--data-root", str(root), "--models", "MeanFeature", "--image-size", "64"]
    argv += ["--max-steps", "4", "--batch-size", "4", "--workers", "0", "--threads", "1", "--name", "mf"]
    argv += ["--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")]
    assert harness.main(argv) == 0
    row = json.loads((tmp_path / "mf.json").read_text())["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["model"] == "MeanFeature" and row["steps"] == 2  # one pass: 8 training images at batch 4
    assert row["image_AUROC"] >= 0.9 and row["pixel_AUROC"] >= 0.8
    assert np.isfinite(row["pixel_AUPRO"]) and row["trainable_params_m"] == 0
