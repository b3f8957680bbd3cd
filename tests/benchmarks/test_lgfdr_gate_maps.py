"""``benchmarks/lgfdr_gate_maps.py``: LGFDR's SRH gate and each tower's map on the harness's test inputs."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.benchmarks.conftest import load_script, tiny_on_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(folder_dataset):
    model, datamodule = tiny_on_folder("LGFDR", folder_dataset)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.model.fit_feature_statistics([(images - mean) / std])
    return model, datamodule


def test_gate_statistics_and_the_fused_row_are_the_models_own(setup):
    script = load_script("lgfdr_gate_maps")
    per_class = load_script("per_class")
    model, datamodule = setup
    stats, examples = script.collect(model, datamodule, max_pixels=10_000, seed=0)
    assert set(stats["mean_gate"]) == {"defect", "defect_image_background", "normal_image"}
    assert all(0.0 < v < 1.0 for v in stats["mean_gate"].values()), "a sigmoid gate, measured where it exists"
    scores, labels, pixels, truth = [], [], [], []
    with torch.no_grad():
        for images, masks, batch in per_class.harness_test_batches(model, datamodule):
            out = model.model(images)
            scores.append(out.pred_score)
            labels.append(batch.gt_label)
            pixels.append(out.anomaly_map.flatten())
            truth.append(masks.flatten() > 0.5)
    expected_image = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
    expected_pixel = roc_auc_score(torch.cat(truth).numpy(), torch.cat(pixels).numpy())
    assert stats["image_AUROC"]["fused"] == pytest.approx(expected_image, abs=1e-6)
    assert stats["pixel_AUROC"]["fused"] == pytest.approx(expected_pixel, abs=1e-6)
    # (max_pixels >= 64 x 64: every pixel counts.) One example per defect class, at the input size, in [0, 1]
    assert [e["class"] for e in examples] == ["defect"]
    example = examples[0]
    assert example["raw"] and example["image"].shape == (3, 64, 64) and float(example["image"].max()) <= 1.0
    assert example["gate"].shape == example["mask"].shape == (64, 64)


def test_the_figure_is_written(setup, tmp_path):
    script = load_script("lgfdr_gate_maps")
    model, datamodule = setup
    _, examples = script.collect(model, datamodule, max_pixels=64, seed=0)
    figure = tmp_path / "gate.png"
    script.draw(examples, figure, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
