"""benchmarks/nafrad_branches.py on snapshots written by ``learning_curve.py --save-snapshots`` (tiny folder data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script

TINY = {"layers": [1, 2], "base_channels": 32, "latent_channels": 32, "seg_base_width": 8, "lr": 0.01}


@pytest.mark.slow
def test_branches_of_saved_snapshots(harness, folder_dataset: Path, offline_hf_cache: Path, tmp_path: Path) -> None:
    """Each saved snapshot loads, its head score is NAFRAD's own image score, and both branches are scored."""
    del offline_hf_cache, harness
    curve, branches, per_class = (load_script(n) for n in ("learning_curve", "nafrad_branches", "per_class"))
    data = ["--dataset", "folder", "--data-root", str(folder_dataset), "--image-size", "256", "--batch-size", "4"]
    data += ["--workers", "0", "--threads", "1"]
    argv = [*data, "--models", "NAFRAD", "--max-steps", "2", "--eval-every", "1", "--save-snapshots"]
    argv += ["--model-args", json.dumps({"NAFRAD": TINY}), "--name", "curve", "--results-dir", str(tmp_path)]
    argv += ["--work-dir", str(tmp_path / "work")]
    assert curve.main(argv) == 0
    ckpts = sorted((tmp_path / "work" / "NAFRAD" / "snapshots").glob("step_*.ckpt"))
    assert [c.name for c in ckpts] == ["step_1.ckpt", "step_2.ckpt"]

    assert branches.main([*data, "--ckpts", *map(str, ckpts), "--name", "br", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "br.json").read_text())["rows"]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        for column in branches.COLUMNS[2:]:
            assert 0.0 <= row[column] <= 1.0, (column, row)
    assert rows[0]["rec_pixel_AUROC"] != rows[1]["rec_pixel_AUROC"]  # the two snapshots hold different weights
    # the head's image AUROC is the model's own: per_class.py's `model` column on the same checkpoint agrees
    per_class.main([*data, "--model", "NAFRAD", "--ckpt", str(ckpts[-1]), "--out", str(tmp_path / "pc")])
    own = json.loads((tmp_path / "pc.json").read_text())["rows"][0]["model"]
    assert rows[-1]["head_image_AUROC"] == pytest.approx(own, abs=1e-4)
    assert "head_image_AUROC" in (tmp_path / "br.md").read_text()
