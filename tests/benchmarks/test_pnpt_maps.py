"""``benchmarks/pnpt_maps.py``: the model's map and every part of it scored on the same pixels."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.benchmarks.conftest import load_script, model_pixel_auroc
from tests.test_registration import TINY_KWARGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(folder_dataset, **kwargs):
    from anomalib_recon.models import PNPT

    harness = load_script("harness")
    torch.manual_seed(0)
    model = PNPT(**TINY_KWARGS["PNPT"], evaluator=False, visualizer=False, **kwargs).eval()
    args = argparse.Namespace(dataset="folder", data_root=str(folder_dataset), batch_size=4, workers=0, seed=0)
    return model, harness.build_datamodule(args)


def test_every_part_is_scored_and_the_map_row_is_the_models_own(folder_dataset):
    maps = load_script("pnpt_maps")
    model, datamodule = _setup(folder_dataset, prompts="none")
    row = maps.score_parts(model, datamodule)
    assert set(row) == {"map_AUROC"} | {
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
