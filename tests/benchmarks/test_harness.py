"""benchmarks/harness.py end to end on a tiny generated folder dataset (one subprocess per model, ~20 s each)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.conftest import write_folder_dataset

MODELS = ["Padim", "AGPNet", "ReverseDistillation"]  # anomalib built-in, ours, and one that is n/a with Lite0


@pytest.fixture(scope="module")
def harness_run(harness: ModuleType, folder_dataset: Path, offline_hf_cache: Path, tmp_path_factory) -> dict:
    """One harness run over MODELS at 64 px, 2 steps; returns the JSON it wrote plus the paths."""
    del offline_hf_cache  # only needed in the environment the model subprocesses inherit
    out = tmp_path_factory.mktemp("harness")
    argv = ["--dataset", "folder", "--data-root", str(folder_dataset), "--models", *MODELS, "--image-size", "64"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--workers", "0", "--threads", "1", "--name", "tiny"]
    argv += ["--results-dir", str(out), "--work-dir", str(out / "work")]
    assert harness.main(argv) == 0
    return {"json": out / "tiny.json", "md": out / "tiny.md", "argv": argv}


def rows_by_model(run: dict) -> dict:
    return {row["model"]: row for row in json.loads(run["json"].read_text())["rows"]}


def test_harness_writes_json_and_markdown_with_command(harness_run: dict) -> None:
    data = json.loads(harness_run["json"].read_text())
    assert [row["model"] for row in data["rows"]] == MODELS
    assert data["command"].startswith("python benchmarks/harness.py ")
    assert "--models Padim AGPNet ReverseDistillation" in data["command"]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["cpu"] and data["image_size"] == 64
    table = harness_run["md"].read_text()
    assert data["command"] in table
    assert sum(line.startswith(f"| {m} |") for m in MODELS for line in table.splitlines()) == len(MODELS)


@pytest.mark.parametrize("model", ["Padim", "AGPNet"])
def test_harness_metrics_in_unit_range_and_budget_respected(harness_run: dict, harness: ModuleType, model: str) -> None:
    row = rows_by_model(harness_run)[model]
    assert "error" not in row, row.get("error")
    for metric in harness.METRICS:
        assert 0.0 <= row[metric] <= 1.0, (metric, row[metric])
    # Padim "trains" one pass over the 8 images (2 batches of 4); AGPNet stops at --max-steps 2.
    assert 1 <= row["steps"] <= 2
    assert 0 < row["trainable_params_m"] <= row["params_m"] < 100 or model == "Padim"
    assert row["params_m"] > 0 and row["infer_img_per_s"] > 0 and row["peak_rss_mb"] > 0


def test_harness_obvious_defects_are_found(harness_run: dict) -> None:
    """The synthetic defect is a saturated blue square on a gray texture: Padim must separate it."""
    assert rows_by_model(harness_run)["Padim"]["image_AUROC"] >= 0.9


def test_reverse_distillation_with_lite_backbone_is_an_error_row(harness_run: dict) -> None:
    row = rows_by_model(harness_run)["ReverseDistillation"]
    assert "n/a" in row["error"] and "ResNet" in row["error"]
    assert "image_AUROC" not in row
    assert row["error"] in harness_run["md"].read_text()


def test_markdown_shows_error_text(harness: ModuleType) -> None:
    header = {"name": "x", "command": "c", "machine": {}, "dataset": "folder", "backbone": "b", "image_size": 64}
    header |= {"max_steps": 2, "max_epochs": None, "max_time": None, "seed": 0, "batch_size": 4}
    table = harness.to_markdown([{"model": "ReverseDistillation", "error": "ValueError: n/a: needs ResNet"}], header)
    assert "n/a: needs ResNet" in table


def test_folder_dataset_needs_data_root(harness: ModuleType) -> None:
    with pytest.raises(SystemExit, match="--dataset folder needs --data-root"):
        harness.build_datamodule(harness.parse(["--dataset", "folder"]))


def test_folder_dataset_rejects_non_mvtec_folder(harness: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not an MVTec-style category folder"):
        harness.build_datamodule(harness.parse(["--dataset", "folder", "--data-root", str(tmp_path / "missing")]))
    write_folder_dataset(tmp_path / "flat", size=40, n_train=1, n_good=1, n_defect=1)
    (tmp_path / "flat" / "train" / "good").rename(tmp_path / "flat" / "train" / "ok")
    with pytest.raises(SystemExit, match="train/good"):
        harness.build_datamodule(harness.parse(["--dataset", "folder", "--data-root", str(tmp_path / "flat")]))


def test_bad_data_root_fails_before_any_model_runs(harness: ModuleType, tmp_path: Path) -> None:
    """One clear error from the parent, not one failing subprocess per model."""
    argv = ["--dataset", "folder", "--data-root", str(tmp_path / "missing"), "--models", "Padim", "AGPNet"]
    argv += ["--results-dir", str(tmp_path / "results")]
    with pytest.raises(SystemExit, match="not an MVTec-style category folder"):
        harness.main(argv)
    assert not (tmp_path / "results").exists()
