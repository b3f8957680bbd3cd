"""benchmarks/scl_vi_export_memory.py and scl_vi_export_parity.py on tiny inputs: every stage reports, exported
outputs match the checkpoint, the kNN distances match float64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script, write_folder_dataset

pytestmark = [pytest.mark.slow, pytest.mark.export]


def test_memory_script_reports_export_openvino_and_torch_stages(tmp_path: Path) -> None:
    memory = load_script("scl_vi_export_memory")
    assert memory.windows(256) == {64: 13 * 13, 32: 57 * 57}  # the paper's geometry
    assert memory.windows(64) == {64: 1, 32: 33 * 33}
    argv = ["--image-size", "64", "--train-images", "2", "--width", "0.125", "--chunk", "1000", "--images", "1"]
    argv += ["--threads", "1", "--work-dir", str(tmp_path / "work"), "--name", "tiny", "--results-dir", str(tmp_path)]
    assert memory.main(argv) == 0
    result = json.loads((tmp_path / "scl_vi_tiny.json").read_text())
    assert (result["bank_rows_64"], result["bank_rows_32"]) == (2, 2 * 33 * 33)
    rows = {row["stage"]: row for row in result["rows"]}
    assert set(rows) == {"export", "openvino", "torch"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert "model.xml" in rows["export"]["files_mb"] and "model.bin" in rows["export"]["files_mb"]
    assert rows["openvino"]["pred_score"] == pytest.approx(rows["torch"]["pred_score"], rel=1e-4)
    assert "scl_vi_tiny" in (tmp_path / "scl_vi_tiny.md").read_text()


def test_parity_script_fits_exports_and_compares(tmp_path: Path) -> None:
    parity = load_script("scl_vi_export_parity")
    root = write_folder_dataset(tmp_path / "data", n_train=4, n_good=2, n_defect=2)
    argv = ["--dataset", "folder", "--data-root", str(root), "--max-steps", "1", "--images", "3", "--threads", "1"]
    argv += ["--work-dir", str(tmp_path / "work"), "--name", "tiny", "--results-dir", str(tmp_path)]
    assert parity.main(argv) == 0
    result = json.loads((tmp_path / "scl_vi_tiny.json").read_text())
    assert result["parity"]["images"] == 3
    assert result["parity"]["max_score_err"] <= 1e-4 and result["parity"]["max_map_err"] <= 1e-4
    assert [row["scale"] for row in result["distances"]] == [64, 32]
    assert [row["bank_rows"] for row in result["distances"]] == [4 * 9, 4 * 49]
    assert all(row["model_max_err"] < 1e-5 for row in result["distances"])
    # loading the saved state instead of fitting gives the same outputs
    argv += ["--state", str(tmp_path / "work" / "state.pt")]
    argv[argv.index("tiny")] = "tiny_state"
    assert parity.main(argv) == 0
    again = json.loads((tmp_path / "scl_vi_tiny_state.json").read_text())
    assert again["fit_s"] is None and again["distances"] == result["distances"]
