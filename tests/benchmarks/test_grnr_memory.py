"""benchmarks/grnr_memory.py on a tiny input: chunked and unchunked distance steps, one row each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script


@pytest.mark.slow
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
