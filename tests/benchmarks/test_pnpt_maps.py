"""``benchmarks/pnpt_maps.py``: the model's map and every part of it scored on the same pixels."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.conftest import load_script, model_pixel_auroc, tiny_on_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(folder_dataset, **kwargs):
    return tiny_on_folder("PNPT", folder_dataset, **kwargs)


def test_every_part_is_scored_and_the_map_row_is_the_models_own(folder_dataset):
    maps = load_script("pnpt_maps")
    model, datamodule = _setup(folder_dataset, prompts="none")
    row = maps.score_parts(model, datamodule)
    assert set(row) == {"map_AUROC", "map_s12_AUROC", "map_s2_AUROC"} | {
        f"sample_s{s}_{what}" for s in range(3) for what in ("AUROC", "normal_mean", "defect_mean")
    }
    assert all(0.0 <= v <= 1.0 for k, v in row.items() if k.endswith("AUROC"))
    # the map column is the model's own anomaly map on the same batches
    assert row["map_AUROC"] == pytest.approx(model_pixel_auroc(model, datamodule), abs=1e-4)


def test_the_checkpoint_label_comes_from_the_study_layout():
    per_class = load_script("per_class")
    path = "/tmp/x/pnpt_mt/seed1/class/PNPT/PNPT/magnetic_tile/v0/weights/lightning/model.ckpt"
    assert per_class.study_label(path) == "seed1/class"
    assert per_class.study_label("/elsewhere/model.ckpt") == "/elsewhere/model.ckpt"


def test_the_coarse_map_is_the_models_rule_on_the_stride_16_residuals_alone(folder_dataset):
    """map_s2 = blur(bilinear(½[r^x_2 + r^p_2])) by hand, scored on the same pixels."""
    from sklearn.metrics import roc_auc_score
    from torch.nn import functional as F

    maps = load_script("pnpt_maps")
    per_class = load_script("per_class")
    model, datamodule = _setup(folder_dataset, prompts="class")
    row = maps.score_parts(model, datamodule)
    net = model.model
    pixels, truth = [], []
    with torch.no_grad():
        for images, masks, _ in per_class.harness_test_batches(model, datamodule):
            sample, prompt = net.stream_residuals(net.reconstruction_outputs(images))
            coarse = 0.5 * (sample[2] + prompt[2])
            up = F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=False)
            pixels.append(net.blur(up).flatten())
            truth.append(masks.flatten() > 0.5)
    expected = roc_auc_score(torch.cat(truth).numpy(), torch.cat(pixels).numpy())
    assert row["map_s2_AUROC"] == pytest.approx(expected, abs=1e-4)
    assert row["map_s2_AUROC"] != row["map_AUROC"]
