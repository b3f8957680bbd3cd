"""benchmarks/per_class.py on a Padim checkpoint trained on the tiny generated folder dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def per_class():
    return load_script("per_class")


def test_image_scores_reduce_maps(per_class) -> None:
    maps = torch.zeros(2, 20, 20)
    maps[1, 3, 4] = 5.0
    scores = per_class.image_scores(maps, torch.tensor([0.1, 0.2]))
    assert scores["max"].tolist() == [0.0, 5.0]
    assert scores["top1%"].tolist() == [0.0, 5.0 / 4]  # 1 % of 400 pixels = 4
    assert scores["max_avgpool5"][1] == pytest.approx(5.0 / 25)
    assert scores["std"][0] == 0 and scores["std"][1] > 0
    assert scores["model"].tolist() == pytest.approx([0.1, 0.2])


def test_per_class_table_from_checkpoint(per_class, folder_dataset: Path, offline_hf_cache: Path, tmp_path) -> None:
    del offline_hf_cache
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim

    data = Folder(
        name="tiles",
        root=folder_dataset,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/defect",
        mask_dir="ground_truth/defect",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )
    model = Padim(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.1", "blocks.2"],
        n_features=40,
        pre_processor=Padim.configure_pre_processor(image_size=(64, 64)),
        visualizer=False,
    )
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False)
    engine.fit(model=model, datamodule=data)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    out = tmp_path / "table"
    argv = ["--model", "Padim", "--ckpt", str(ckpt), "--image-size", "64", "--data-root", str(folder_dataset)]
    assert per_class.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {row["class"]: row for row in result["rows"]}
    assert set(rows) == {"all", "defect"} and rows["defect"]["n"] == 4
    assert rows["all"]["model"] >= 0.9  # saturated blue squares on a grey texture
    assert 0.5 < result["pixel_AUROC"] <= 1.0
    assert "| defect | 4 |" in out.with_suffix(".md").read_text()
