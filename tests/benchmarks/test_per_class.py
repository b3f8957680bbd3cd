"""benchmarks/per_class.py on a Padim checkpoint trained through the harness on a tiny generated folder dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from tests.benchmarks.conftest import load_script, write_folder_dataset


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


def test_pixel_auroc_by_size_splits_defects_by_area(per_class) -> None:
    import numpy as np

    masks = np.zeros((5, 16, 16), bool)  # the fifth image is defect-free
    masks[0, 0, 0] = True  # 1 px
    masks[1, 2:4, 2:4] = True  # 4 px
    masks[2, 0:3, 0:3] = True  # 9 px
    masks[3, 4:8, 4:8] = True  # 16 px
    masks[3, 12, 12] = masks[3, 13, 13] = True  # one 2-px defect (diagonal: 8-connected)
    maps = np.ones(masks.shape)
    maps[masks] = 2.0  # every defect found...
    maps[3, 4:8, 4:8] = 0.5  # ...but the largest, scored below every normal pixel
    maps[1, 8:, 8:] = 3.0  # and a bright region next to a defect: normal pixels of a defective image
    rows = per_class.pixel_auroc_by_size(maps, masks)
    assert [row["defects by area"] for row in rows] == ["Q1", "Q2", "Q3", "Q4", "all"]
    assert [row["n"] for row in rows] == [2, 1, 1, 1, 5]  # areas 1, 2 | 4 | 9 | 16 at the quartiles 2, 4, 9
    assert [row["area_px"] for row in rows] == ["1-2", "4-4", "9-9", "16-16", "1-16"]
    normal = ~masks
    n_normal, n_bright = normal.sum(), 64
    expected = 1 - n_bright / n_normal  # each defect pixel (2.0) is above every normal pixel but the 64 bright ones
    assert [row["pixel_AUROC"] for row in rows[:3]] == [round(expected, 4)] * 3
    assert rows[3]["pixel_AUROC"] == 0.0
    assert rows[4]["pixel_AUROC"] == round(expected / 2, 4)  # half the defect pixels (16 of 32) are the large one
    # against the defect-free image only, the bright normal region no longer counts
    assert [row["AUROC_vs_good_images"] for row in rows] == [1.0, 1.0, 1.0, 0.0, 0.5]
    ratio = 2.0 / maps[normal].mean()
    assert rows[0]["map_ratio"] == round(ratio, 3) and rows[3]["map_ratio"] == round(0.5 / maps[normal].mean(), 3)
    assert per_class.pixel_auroc_by_size(maps, np.zeros_like(masks)) == []


def mixed_size_dataset(root: Path) -> Path:
    """The tiny folder dataset with some test images (and their masks) at other sizes, as in Magnetic Tile."""
    write_folder_dataset(root)
    for rel, size in (("test/good/001.png", (72, 90)), ("test/defect/000.png", (100, 72))):
        Image.open(root / rel).resize(size, Image.BILINEAR).save(root / rel)
        mask = root / rel.replace("test/", "ground_truth/")
        if mask.exists():
            Image.open(mask).resize(size, Image.NEAREST).save(mask)
    return root


def test_per_class_sees_exactly_the_harness_inputs(
    per_class, harness: ModuleType, offline_hf_cache: Path, tmp_path: Path
) -> None:
    del offline_hf_cache
    from anomalib.engine import Engine

    root = mixed_size_dataset(tmp_path / "tiles")
    common = ["--dataset", "folder", "--data-root", str(root), "--image-size", "64", "--batch-size", "4"]
    common += ["--workers", "0"]
    padim_args = json.dumps({"Padim": {"layers": ["blocks.1", "blocks.2"], "n_features": 40}})
    ns = harness.parse([*common, "--model-args", padim_args])
    model = harness.build_model("Padim", ns)
    data = harness.build_datamodule(ns)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), logger=False)
    engine.fit(model=model, datamodule=data)
    fed: list[torch.Tensor] = []
    model.model.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0].detach().clone()))
    engine.test(model=model, datamodule=data)
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))

    argv = ["--model", "Padim", "--ckpt", str(ckpt), *common]
    loaded = per_class.load_model(per_class.parse(argv))
    data_args = argparse.Namespace(dataset="folder", data_root=str(root), cell_type="mono", batch_size=4)
    data_args.workers, data_args.seed = 0, 0
    ours = [images for images, _, _ in per_class.harness_test_batches(loaded, harness.build_datamodule(data_args))]
    assert len(ours) == 2 and len(fed) >= 2
    for mine, theirs in zip(ours, fed[-len(ours) :], strict=True):
        assert mine.shape == theirs.shape == (4, 3, 64, 64)
        assert torch.equal(mine, theirs)  # same collate, same pre-processor: bit-identical inputs

    out = tmp_path / "table"
    assert per_class.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {row["class"]: row for row in result["rows"]}
    assert set(rows) == {"all", "defect"} and rows["defect"]["n"] == 4
    assert rows["all"]["model"] >= 0.9  # saturated blue squares on a grey texture
    assert 0.5 < result["pixel_AUROC"] <= 1.0
    assert sum(row["n"] for row in result["by_size"]) >= 4  # each defect image holds at least one component
    assert result["dataset"] == "folder" and result["batch_size"] == 4
    assert "| defect | 4 |" in out.with_suffix(".md").read_text()
