"""One child process per measured stage, for the memory benchmarks.

``ru_maxrss`` is a process's peak, so a script that compares the peaks of several stages (torch / ONNX / OpenVINO,
image sizes, chunk settings, ...) runs each stage in its own child: ``python <script> <argv> --stage <stage>``. The
child prints its row as one ``RESULT {json}`` line; the parent collects one row per stage (an error row where a
child printed none) and records them through ``harness.write_results`` after every stage.

Parent side::

    rows = stages.record(__file__, argv, ["torch", "onnx"], header, results_dir, render, label=lambda s: {"path": s})

Child side: ``stages.add_stage_argument(parser)``, then ``if args.stage: return stages.emit_result(row)``; an
export-memory child measures its path with ``measure_export_path``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

RESULT = "RESULT "
STAGE_FLAG = "--stage"


def rss_mb() -> float:
    """Current resident memory of this process (MB), from ``/proc/self/statm`` (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB): ``ru_maxrss`` (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_gb() -> float | None:
    """Total memory of the machine (GB) from ``/proc/meminfo``; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def command(script: str | Path, argv: Sequence[str]) -> str:
    """The command a results file records: ``python <script, relative to the repository> <argv>``."""
    path = Path(script).resolve()
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(script)
    return shlex.join(["python", shown, *argv])


def add_stage_argument(parser: argparse.ArgumentParser, choices: Iterable[str] | None = None) -> None:
    """The hidden ``--stage`` option through which ``run_stages`` starts a child."""
    parser.add_argument(
        STAGE_FLAG, default=None, choices=None if choices is None else list(choices), help=argparse.SUPPRESS
    )


def emit_result(row: dict) -> int:
    """Child side: print ``row`` as the ``RESULT`` line the parent reads; the child's exit status (0)."""
    print(RESULT + json.dumps(row), flush=True)
    return 0


def parse_result(stdout: str) -> dict | None:
    """The row of a child's last ``RESULT`` line, or None if it printed none."""
    found = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(found[-1][len(RESULT) :]) if found else None


def stage_error(proc: subprocess.CompletedProcess) -> str:
    """One line on why a child gave no row: how it ended (exit code, or the signal that killed it: SIGKILL is
    usually the out-of-memory killer) and the last line of its stderr."""
    code = proc.returncode
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1].strip()
    return f"{how}: {last[:300]}"


def run_stages(
    script: str | Path,
    argv: Sequence[str],
    stages: Iterable[str],
    label: Callable[[str], dict] | None = None,
    on_row: Callable[[list[dict]], object] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[dict]:
    """Run ``python <script> <argv> --stage <stage>`` for each stage in turn, each in its own process.

    A stage's row is its child's last ``RESULT`` line; where there is none, ``{**label(stage), "error": ...}``
    (``label`` defaults to ``{"stage": stage}``) and the child's stderr tail is echoed to this process's stderr.
    ``on_row(rows)`` runs after every stage (to rewrite the results files); ``env`` adds environment variables.
    """
    label = label or (lambda stage: {"stage": stage})
    child_env = None if env is None else {**os.environ, **env}
    rows: list[dict] = []
    for stage in stages:
        print(f"=== {stage} ===", flush=True)
        proc = subprocess.run(
            [sys.executable, str(script), *argv, STAGE_FLAG, stage],
            capture_output=True,
            text=True,
            check=False,
            env=child_env,
        )
        row = parse_result(proc.stdout)
        if row is None:
            sys.stderr.write(proc.stderr[-4000:])
            row = {**label(stage), "error": stage_error(proc)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def record(
    script: str | Path,
    argv: Sequence[str],
    stages: Iterable[str],
    header: dict,
    results: Path,
    render: Callable[[list[dict], dict], str],
    label: Callable[[str], dict] | None = None,
) -> list[dict]:
    """``run_stages``, rewriting ``<results>/<header['name']>.json`` / ``.md`` after every stage (a crash keeps the
    rows so far); prints the final markdown and returns the rows."""
    rows = run_stages(
        script, argv, stages, label, on_row=lambda rows: harness.write_results(results, header, rows, render=render)
    )
    print(render(rows, header))
    return rows


EXPORT_PATHS = ("torch", "onnx", "openvino")  # the paths ``measure_export_path`` runs
EXPORT_NOTE = (  # what its row's columns mean, for a results page
    "peak_rss_mb: the process's peak; seconds: one inference (torch: mean of 3); diffs: exported outputs vs torch on "
    "the same batch (raw score and map, no post-processor)."
)


def measure_export_path(
    model: Any,
    batch: Any,
    path: str,
    row: dict | None = None,
    opset_version: int | None = None,
    output_names: bool = False,
) -> dict:
    """One path of an export-memory benchmark in this (child) process; its row.

    ``model`` is an anomalib module without post-processor and ``batch`` a ``(B, 3, H, W)`` tensor. Torch's
    ``model(batch)`` under ``no_grad`` is the reference; then

    * ``torch``: two more ``model(batch)`` (``seconds``: the mean of the three);
    * ``onnx``: ``model.to_onnx`` (``export_s``) and one ONNX Runtime inference (``seconds``);
    * ``openvino``: ``model.to_openvino`` (``export_s``) and one inference compiled at fp32 (``seconds``).

    An exported path adds the largest difference of its raw ``pred_score`` / ``anomaly_map`` from torch's
    (``max_score_diff`` / ``max_map_diff``; with ``output_names``, ``outputs``: the exported output names first). The
    row is ``{"path": path, **row}`` followed by those keys, ``peak_rss_mb`` and torch's ``score_range``.
    ``opset_version`` goes to both exports (None: anomalib's default).
    """
    import numpy as np
    import torch

    size = tuple(batch.shape[-2:])
    onnx_kwargs = {} if opset_version is None else {"opset_version": opset_version}
    start = time.perf_counter()
    with torch.no_grad():
        expected = model(batch)
    row = {"path": path, **(row or {})}
    if path == "torch":
        with torch.no_grad():
            for _ in range(2):
                model(batch)
        row["seconds"] = round((time.perf_counter() - start) / 3, 2)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            if path == "onnx":
                import onnxruntime as ort

                exported = model.to_onnx(tmp, input_size=size, **onnx_kwargs)
                row["export_s"] = round(time.perf_counter() - start, 1)
                session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
                names = [o.name for o in session.get_outputs()]
                start = time.perf_counter()
                feed = {session.get_inputs()[0].name: batch.numpy()}
                outputs = dict(zip(names, session.run(None, feed), strict=True))
            else:
                import openvino as ov

                extra = {"onnx_kwargs": onnx_kwargs} if onnx_kwargs else {}
                exported = model.to_openvino(tmp, input_size=size, **extra)
                row["export_s"] = round(time.perf_counter() - start, 1)
                compiled = ov.Core().compile_model(str(exported), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                start = time.perf_counter()
                result = compiled(batch.numpy())
                outputs = {out.get_any_name(): result[out] for out in compiled.outputs}
            row["seconds"] = round(time.perf_counter() - start, 2)
            if output_names:
                row["outputs"] = sorted(outputs)
            score = next(v for k, v in outputs.items() if "score" in k)
            amap = next(v for k, v in outputs.items() if "map" in k)
            row["max_score_diff"] = float(np.abs(score.reshape(-1) - expected.pred_score.numpy().reshape(-1)).max())
            row["max_map_diff"] = float(np.abs(amap.reshape(-1) - expected.anomaly_map.numpy().reshape(-1)).max())
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    row["score_range"] = [float(expected.pred_score.min()), float(expected.pred_score.max())]
    return row
