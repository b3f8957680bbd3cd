"""benchmarks/throughput.py: timing helper, and one tiny end-to-end run (torch eager, ONNX Runtime, OpenVINO)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.conftest import BENCHMARKS, load_script


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return load_script("throughput")


def test_time_calls_counts_and_orders(throughput: ModuleType) -> None:
    calls = []
    stats = throughput.time_calls(lambda: calls.append(1), warmup=2, min_iters=7, min_time=0.0, max_iters=100)
    assert stats["iters"] == 7 and len(calls) == 9  # warm-up calls are not timed
    assert 0 <= stats["median_ms"] <= stats["p90_ms"]
    capped = throughput.time_calls(lambda: None, warmup=0, min_iters=1, min_time=60.0, max_iters=5)
    assert capped["iters"] == 5  # max_iters wins over min_time


def test_parse_rejects_non_positive_batch(throughput: ModuleType) -> None:
    with pytest.raises(SystemExit):
        throughput.parse(["--batch-sizes", "0"])


def test_throughput_end_to_end_tiny(throughput: ModuleType, tmp_path: Path) -> None:
    """Padim at 64 px, batch 1: every backend gives a positive images/s; an unknown model is an error row."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    backends = ["torch", "onnxruntime"]
    if importlib.util.find_spec("openvino") is not None:
        backends += ["openvino", "openvino-bf16"]
    argv = ["--models", "Padim", "NoSuchModel", "--image-size", "64", "--batch-sizes", "1", "--weights", "random"]
    argv += ["--backends", *backends, "--threads", "1", "--warmup", "1", "--min-iters", "2", "--min-time", "0"]
    argv += ["--fit-images", "4", "--name", "tiny", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    # a subprocess, like a user's run: ONNX Runtime and OpenVINO (bf16 included) stay out of the pytest process, whose
    # later subprocess tests crashed with SIGSEGV when these runtimes and an in-process Engine had both been loaded
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "throughput.py"), *argv], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    data = json.loads((tmp_path / "throughput_tiny.json").read_text())
    assert data["command"] == "python benchmarks/throughput.py " + " ".join(argv)
    assert data["trained"] is False and data["machine"]["cpu_count"] >= 1
    padim = [row for row in data["rows"] if row["model"] == "Padim"]
    assert {row["backend"] for row in padim} == {"torch-cpu", *backends[1:]}
    for row in padim:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and 0 < row["median_ms"] <= row["p90_ms"] and row["iters"] >= 2
        assert row["batch"] == 1
        assert row["precision"] == ("bf16" if row["backend"] == "openvino-bf16" else "fp32")
    for row in padim:  # the exported outputs are compared with torch eager (fp32 parity is the contract test's)
        if row["backend"] in {"onnxruntime", "openvino"}:
            assert row["max_score_err"] <= 1e-3 and row["max_map_err"] <= 1e-3, row
        elif row["backend"] == "openvino-bf16":
            assert row["max_score_err"] >= 0 and row["max_map_err"] >= 0, row
    assert {row["graph"] for row in padim if row["backend"] != "torch-cpu"} == {"dynamic batch"}
    assert data["models"]["Padim"]["fitted_on_random_images"] == 4  # a memory-bank model is fitted before timing
    assert data["models"]["Padim"]["fitted_mb"] > 0 and data["models"]["Padim"]["fit_s"] > 0

    (missing,) = [row for row in data["rows"] if row["model"] == "NoSuchModel"]
    assert missing["backend"] == "build" and "NoSuchModel" in missing["error"]

    table = (tmp_path / "throughput_tiny.md").read_text()
    assert data["command"] in table
    assert "CUDA is not available" in table or data["machine"]["cuda"]
    assert sum(line.startswith("| Padim |") for line in table.splitlines()) == len(backends)


def test_labelled_entry_fits_grnr_banks_and_reports_their_size(throughput: ModuleType) -> None:
    """``LABEL=MODEL`` takes the label's ``--model-args``; GRNR's bank priors are built from ``--fit-images``
    random images before timing, and ``fitted_mb`` is exactly the banks' size (the backbone's buffers excluded)."""
    model_args = {"GRNR-normal": {"prior_source": "normal"}, "GRNR": {"prior_source": "image", "num_global_priors": 4}}
    argv = ["--models", "GRNR-normal=GRNR", "--image-size", "64", "--weights", "random", "--fit-images", "5"]
    args = throughput.parse([*argv, "--model-args", json.dumps(model_args)])
    module, info = throughput.build(args.models[0], args, throughput.load_harness())
    assert module.model.prior_source == "normal" and module.bank_stats["bank_images"] == 5
    banks = [module.model.bank(i) for i in range(len(module.model.feature_extractor.layers))]
    assert info["fitted_on_random_images"] == 5 and info["fit_s"] > 0
    assert info["fitted_mb"] == round(sum(b.numel() * b.element_size() for b in banks) / 2**20, 2) > 0
    assert throughput.split_label("GRNR") == ("GRNR", "GRNR")

    zero_shot, info = throughput.build("GRNR", args, throughput.load_harness())  # the plain entry's own args
    assert zero_shot.model.prior_source == "image" and "fit_s" not in info
