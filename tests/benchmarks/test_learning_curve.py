"""benchmarks/learning_curve.py on the tiny generated folder dataset: one run, one tested row per snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def curve():
    return load_script("learning_curve")


def _raw_score_range(engine, model) -> tuple[float, float]:
    """Min and max of the current weights' raw image scores on the validation split (what MinMax should hold)."""
    import torch

    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for batch in engine.trainer.datamodule.val_dataloader():
            scores.append(model.model(model.pre_processor(batch.image)).pred_score.flatten())
    model.train(was_training)
    scores = torch.cat(scores)
    return float(scores.min()), float(scores.max())


@pytest.mark.slow
def test_curve_tests_every_snapshot(
    curve, harness, folder_dataset: Path, offline_hf_cache: Path, tmp_path, monkeypatch
) -> None:
    """Each snapshot is tested with the post-processor statistics of its own weights, not of the final ones."""
    del offline_hf_cache
    from anomalib.engine import Engine

    seen: list[tuple[tuple[float, float], tuple[float, float]]] = []
    real_test = Engine.test

    def spy_test(self, model=None, *args, **kwargs):
        post = model.post_processor
        seen.append(((float(post.image_min), float(post.image_max)), _raw_score_range(self, model)))
        return real_test(self, model, *args, **kwargs)

    monkeypatch.setattr(Engine, "test", spy_test)
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
    # the normalisation range each row was tested with is the raw-score range of that row's own weights
    assert len(seen) == 2
    for (used_min, used_max), (own_min, own_max) in seen:
        assert used_min == pytest.approx(own_min, rel=1e-4, abs=1e-6)
        assert used_max == pytest.approx(own_max, rel=1e-4, abs=1e-6)
    assert seen[0][1] != pytest.approx(seen[1][1], rel=1e-4)  # the weights (and so the statistics) differ
    assert [row["norm_image_max"] for row in rows] == pytest.approx([used[1] for used, _ in seen])


def test_curve_needs_one_model_and_a_positive_interval(curve) -> None:
    with pytest.raises(SystemExit, match="exactly one --models entry"):
        curve.main(["--models", "AMINet", "Padim", "--max-steps", "4", "--eval-every", "2"])
    with pytest.raises(SystemExit, match="--eval-every K > 0"):
        curve.main(["--models", "AMINet", "--max-steps", "4"])
