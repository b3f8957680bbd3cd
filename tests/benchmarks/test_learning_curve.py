"""benchmarks/learning_curve.py on the tiny generated folder dataset: one run, one tested row per snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def curve():
    return load_script("learning_curve")


def test_curve_tests_every_snapshot(curve, harness, folder_dataset: Path, offline_hf_cache: Path, tmp_path) -> None:
    del offline_hf_cache
    argv = ["--dataset", "folder", "--data-root", str(folder_dataset), "--models", "AMINet", "--image-size", "64"]
    argv += ["--max-steps", "2", "--eval-every", "1", "--batch-size", "4", "--workers", "0", "--threads", "1"]
    argv += ["--model-args", json.dumps({"AMINet": {"embed_dim": 32, "depth": 1, "num_heads": 2, "lr": 0.01}})]
    argv += ["--name", "curve", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")]
    assert curve.main(argv) == 0
    data = json.loads((tmp_path / "curve.json").read_text())
    rows = data["rows"]
    assert [row["steps"] for row in rows] == [1, 2]
    assert data["eval_every"] == 1 and data["model_args"]["embed_dim"] == 32
    for row in rows:
        for metric in harness.METRICS:
            assert 0.0 <= row[metric] <= 1.0, (metric, row[metric])
    # Each row is tested with its own snapshot: the weights moved between steps 1 and 2 (lr 0.01), so the
    # pixel-level AP over every test pixel cannot be identical if the snapshots were really loaded.
    assert rows[0]["pixel_AUPR"] != rows[1]["pixel_AUPR"]
    assert "| AMINet @ 2 steps |" in (tmp_path / "curve.md").read_text()


def test_curve_needs_one_model_and_a_positive_interval(curve) -> None:
    with pytest.raises(SystemExit, match="exactly one --models entry"):
        curve.main(["--models", "AMINet", "Padim", "--max-steps", "4", "--eval-every", "2"])
    with pytest.raises(SystemExit, match="--eval-every K > 0"):
        curve.main(["--models", "AMINet", "--max-steps", "4"])
