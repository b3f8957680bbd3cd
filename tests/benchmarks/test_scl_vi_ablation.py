"""benchmarks/scl_vi_ablation.py on the tiny generated folder dataset: two trainings, four fusions each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script


@pytest.mark.slow
def test_ablation_rows_per_variant_and_fusion(folder_dataset: Path, tmp_path) -> None:
    ablation = load_script("scl_vi_ablation")
    model_args = {"feature_dim": 16, "width": 0.125, "pair_batch_size": 8, "strides": {"64": 4, "32": 16}}
    argv = ["--dataset", "folder", "--data-root", str(folder_dataset), "--image-size", "64", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--threads", "1", "--workers", "0", "--results-dir", str(tmp_path / "results")]
    argv += ["--work-dir", str(tmp_path / "work"), "--name", "tiny", "--model-args", json.dumps(model_args)]
    assert ablation.main(argv) == 0
    result = json.loads((tmp_path / "results" / "scl_vi_ablation_tiny.json").read_text())
    rows = {row["model"]: row for row in result["rows"]}
    expected = {f"SCLVI ({v}, {f})" for v in ("svdd", "jigsaw") for f in ablation.FUSIONS}
    assert set(rows) == expected
    for row in rows.values():
        assert 0.0 <= row["image_AUROC"] <= 1.0
        assert 0.0 <= row["pixel_AUROC"] <= 1.0
        assert (row["bank_size_64"], row["bank_size_32"]) == (8, 8 * 9)  # 8 training images, 1 and 3x3 windows
        assert row["steps"] == 2
        assert row["epoch_s"] > 0
    for variant in ("svdd", "jigsaw"):  # the fusions of a variant score the same banks differently
        aurocs = {rows[f"SCLVI ({variant}, {f})"]["pixel_AUROC"] for f in ablation.FUSIONS}
        assert len(aurocs) > 1
    assert "jigsaw" in (tmp_path / "results" / "scl_vi_ablation_tiny.md").read_text()
