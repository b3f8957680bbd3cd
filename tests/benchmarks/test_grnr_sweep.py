"""benchmarks/grnr_sweep.py and grnr_memory.py end to end on tiny inputs (subprocesses, ~1 min in all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script

pytestmark = pytest.mark.slow


def test_sweep_runs_every_variant_through_the_harness(folder_dataset: Path, offline_hf_cache: Path, tmp_path: Path):
    del offline_hf_cache  # Padim (the peer) reads the Lite0 weights from it in the harness subprocess
    sweep = load_script("grnr_sweep")
    argv = ["--dataset", "folder", "--data-root", str(folder_dataset), "--image-size", "64", "--lams", "0", "5"]
    argv += [
        "--ks",
        "8",
        "--peers",
        "Padim",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--threads",
        "1",
        "--name",
        "tiny",
    ]
    argv += ["--model-args", '{"weights": null}', "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    assert sweep.main(argv) == 0
    data = json.loads((tmp_path / "grnr_tiny.json").read_text())
    rows = {row["model"]: row for row in data["rows"]}
    assert list(rows) == ["Padim", "GRNR (lam=0, K=8)", "GRNR (lam=5, K=8)"]
    assert rows["Padim"]["steps"] >= 1 and 0.0 <= rows["Padim"]["image_AUROC"] <= 1.0
    assert data["model_args"]["GRNR (lam=5, K=8)"] == {"lam": 5.0, "num_global_priors": 8, "weights": None}
    for label, row in rows.items():
        assert "error" not in row, row.get("error")
        if label == "Padim":
            continue
        assert row["steps"] == 0  # zero-shot: nothing trained
        assert 0.0 <= row["image_AUROC"] <= 1.0 and 0.0 <= row["pixel_AUROC"] <= 1.0
    # λ changes the maps: the two variants must not report identical pixel metrics
    assert rows["GRNR (lam=0, K=8)"]["pixel_AUROC"] != rows["GRNR (lam=5, K=8)"]["pixel_AUROC"]
    assert data["command"] in (tmp_path / "grnr_tiny.md").read_text()


def test_memory_script_reports_chunked_and_unchunked(tmp_path: Path) -> None:
    memory = load_script("grnr_memory")
    argv = ["--backbones", "tf_efficientnet_lite0", "--sizes", "128", "--chunks", "16", "none", "--batch", "1"]
    argv += ["--reps", "1", "--threads", "1", "--name", "tiny", "--results-dir", str(tmp_path)]
    assert memory.main(argv) == 0
    rows = json.loads((tmp_path / "grnr_tiny.json").read_text())["rows"]
    assert [row["distance_chunk"] for row in rows] == [16, None]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["grids"] == ["16x16", "8x8"]
        assert row["full_nxn_mb_per_batch"] == pytest.approx(256 * 256 * 4 / 2**20, abs=0.1)
        assert row["ms_per_image"] > 0 and row["peak_rss_above_model_mb"] >= 0
