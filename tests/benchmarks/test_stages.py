"""benchmarks/stages.py: one child per stage, its ``RESULT`` row or an error row, results rewritten per stage."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.benchmarks.conftest import BENCHMARKS, load_script

CHILD = f"""
import argparse, os, signal, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import stages

p = argparse.ArgumentParser()
p.add_argument("--tag", default="")
stages.add_stage_argument(p)
args = p.parse_args()
if args.stage == "ok":
    print("RESULT " + '{{"stale": true}}')  # an earlier line: the last RESULT line is the row
    print("progress")
    sys.exit(stages.emit_result({{"stage": "ok", "tag": args.tag, "env": os.environ.get("STAGES_TEST")}}))
if args.stage == "alloc":
    block = bytearray(b"\\x01") * (64 * 2**20)  # 64 MB, every page written
    sys.exit(stages.emit_result({{"rss_mb": stages.rss_mb(), "peak_rss_mb": stages.peak_rss_mb()}}))
if args.stage == "fail":
    print("half a line of progress")
    raise ValueError("bad input for this stage")
if args.stage == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def stages():
    return load_script("stages")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def test_rows_from_result_lines_and_error_rows_for_failed_children(stages, script, capsys) -> None:
    seen: list[int] = []
    rows = stages.run_stages(
        script,
        ["--tag", "a b"],
        ["ok", "fail", "killed", "silent"],
        label=lambda stage: {"path": stage},
        on_row=lambda rows: seen.append(len(rows)),
        env={"STAGES_TEST": "1"},
    )
    assert rows[0] == {"stage": "ok", "tag": "a b", "env": "1"}  # argv and env reach the child; last RESULT wins
    assert rows[1] == {"path": "fail", "error": "exit code 1: ValueError: bad input for this stage"}
    assert rows[2] == {"path": "killed", "error": "killed by SIGKILL: no output"}
    assert rows[3] == {"path": "silent", "error": "exit code 0: no output"}
    assert seen == [1, 2, 3, 4]
    captured = capsys.readouterr()
    assert "Traceback" in captured.err  # a failed child's stderr is echoed, not only its last line recorded
    assert "=== killed ===" in captured.out


def test_memory_is_in_megabytes(stages, script) -> None:
    (row,) = stages.run_stages(script, [], ["alloc"])
    assert row["rss_mb"] >= 64  # the 64 MB block is resident: MB, not KiB or bytes
    # the kernel's RSS counters lag by a few pages, so the peak may read a fraction of a MB below the current RSS
    assert row["rss_mb"] - 1 <= row["peak_rss_mb"] < 4096
    total = stages.memory_gb()
    assert total is None or 0.5 < total < 100_000


def test_record_rewrites_the_results_after_every_stage(stages, script, tmp_path, capsys) -> None:
    header = {"name": "tiny", "command": stages.command(script, []), "machine": {"cpu": "x"}}
    written: list[list[str]] = []

    def render(rows: list[dict], header: dict) -> str:
        # the JSON on disk holds the rows before this stage's markdown is written
        on_disk = tmp_path / "results" / "tiny.json"
        written.append([r.get("stage", r.get("path")) for r in json.loads(on_disk.read_text())["rows"]])
        return f"# {header['name']}\n{len(rows)} rows\n"

    rows = stages.record(script, [], ["ok", "fail"], header, tmp_path / "results", render)
    assert [row.get("error") is None for row in rows] == [True, False]
    assert rows[1]["stage"] == "fail"  # default label
    assert written[:2] == [["ok"], ["ok", "fail"]]  # written after each stage, not only at the end
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert saved["rows"] == rows and saved["name"] == "tiny"
    assert (tmp_path / "results" / "tiny.md").read_text() == "# tiny\n2 rows\n"
    assert capsys.readouterr().out.endswith("# tiny\n2 rows\n\n")  # the final table is printed


def test_command_names_the_script_from_the_repository_root(stages) -> None:
    line = stages.command(BENCHMARKS / "grnr_memory.py", ["--name", "a b", "--sizes", "64"])
    assert line == "python benchmarks/grnr_memory.py --name 'a b' --sizes 64"
    assert shlex.split(line)[2:] == ["--name", "a b", "--sizes", "64"]
    assert stages.command("/elsewhere/x.py", []) == "python /elsewhere/x.py"


class TinyDetector:
    """A stand-in for an anomalib module: eager ``(pred_score, anomaly_map)`` from a 3x3 conv, and the two exports
    (legacy ONNX export of the same net; OpenVINO through that ONNX). ``shift`` moves the eager score only."""

    def __init__(self, shift: float = 0.0) -> None:
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                amap = torch.sigmoid(self.conv(x))
                return amap.flatten(1).amax(1), amap

        torch.manual_seed(0)
        self.net = Net().eval()
        self.shift = shift
        self.calls = 0
        self.export_kwargs: list[dict] = []

    def __call__(self, batch):
        from types import SimpleNamespace

        self.calls += 1
        score, amap = self.net(batch)
        return SimpleNamespace(pred_score=score + self.shift, anomaly_map=amap)

    def to_onnx(self, root: str, input_size: tuple[int, int], **kwargs) -> Path:
        import torch

        self.export_kwargs.append(kwargs)
        path = Path(root) / "model.onnx"
        torch.onnx.export(
            self.net,
            (torch.zeros(1, 3, *input_size),),
            str(path),
            input_names=["input"],
            output_names=["pred_score", "anomaly_map"],
            dynamic_axes={"input": {0: "batch"}, "pred_score": {0: "batch"}, "anomaly_map": {0: "batch"}},
            dynamo=False,
        )
        return path

    def to_openvino(self, root: str, input_size: tuple[int, int], **kwargs) -> Path:
        import openvino as ov

        self.export_kwargs.append(kwargs)
        onnx_path = self.to_onnx(root, input_size)
        self.export_kwargs.pop()
        xml = Path(root) / "model.xml"
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml))
        return xml


@pytest.mark.export
def test_measure_export_path_rows_per_path(stages) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import torch

    batch = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = TinyDetector()
    row = stages.measure_export_path(model, batch, "torch", {"build_rss_mb": 1.0})
    assert list(row) == ["path", "build_rss_mb", "seconds", "peak_rss_mb", "score_range"]
    assert model.calls == 3 and row["path"] == "torch" and row["peak_rss_mb"] > 0
    with torch.no_grad():
        scores = model.net(batch)[0]
    assert row["score_range"] == pytest.approx([float(scores.min()), float(scores.max())])

    row = stages.measure_export_path(model, batch, "onnx", {"build_rss_mb": 1.0}, opset_version=17, output_names=True)
    keys = ["path", "build_rss_mb", "export_s", "seconds", "outputs", "max_score_diff", "max_map_diff"]
    assert list(row) == [*keys, "peak_rss_mb", "score_range"]
    assert row["outputs"] == ["anomaly_map", "pred_score"]
    assert row["max_score_diff"] < 1e-5 and row["max_map_diff"] < 1e-5
    assert model.export_kwargs == [{"opset_version": 17}]

    shifted = TinyDetector(shift=0.25)  # the exported score is 0.25 below eager torch's: the diff is measured
    row = stages.measure_export_path(shifted, batch, "openvino")
    assert "outputs" not in row and "export_s" in row
    assert row["max_score_diff"] == pytest.approx(0.25, abs=1e-4) and row["max_map_diff"] < 1e-4  # CPU fp32
    assert shifted.export_kwargs == [{}]  # no opset given: anomalib's default (no onnx_kwargs passed)
