"""LGFDR at the paper's backbone and size: peak memory of torch inference vs ONNX / OpenVINO export + inference.

Each path runs in its own subprocess (so ``ru_maxrss`` is that path's own peak): the model is built with random
weights (``weights=None``: the paper's Swin-L weights are not available offline; memory does not depend on the
values), its feature statistics are set from two random images, and then

* ``torch``: ``model(batch)`` (pre-processor + torch model) three times under ``no_grad``;
* ``onnx``: ``model.to_onnx`` (anomalib's dynamo export; the neighbourhood attention takes its exportable
  index-gather path) and one ONNX Runtime inference;
* ``openvino``: ``model.to_openvino`` and one inference compiled at fp32.

Each row records the resident memory after building the model, the peak, and the largest difference of the exported
``pred_score`` / ``anomaly_map`` from torch on the same batch. No post-processor is attached, so the outputs are
the raw score and map. Results go to ``benchmarks/results/<name>.json`` / ``.md`` through the harness's writer.

    python benchmarks/lgfdr_export_memory.py --backbone swin_l --image-size 256 --name lgfdr_export_memory_swinl_256
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from harness import RESULTS, machine_info, markdown_table, result_preamble, write_results  # noqa: E402

PATHS = ("torch", "onnx", "openvino")


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_path(args: argparse.Namespace) -> dict:
    """Build the model and run one path; returns its row."""
    import numpy as np
    import torch

    from anomalib_recon.models import LGFDR

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = LGFDR(
        backbone=args.backbone,
        weights=None,
        image_size=args.image_size,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    ).eval()
    size = args.image_size
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.fit_feature_statistics([model.pre_processor.transform(torch.rand(2, 3, size, size, generator=gen))])
    batch = torch.rand(args.batch_size, 3, size, size, generator=gen)
    build_rss = rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        expected = model(batch)
    row = {"path": args.single, "build_rss_mb": round(build_rss, 1)}
    if args.single == "torch":
        with torch.no_grad():
            for _ in range(2):
                model(batch)
        row["seconds"] = round((time.perf_counter() - start) / 3, 2)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            if args.single == "onnx":
                import onnxruntime as ort

                path = model.to_onnx(tmp, input_size=(size, size))
                row["export_s"] = round(time.perf_counter() - start, 1)
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                names = [o.name for o in session.get_outputs()]
                start = time.perf_counter()
                feed = {session.get_inputs()[0].name: batch.numpy()}
                outputs = dict(zip(names, session.run(None, feed), strict=True))
            else:
                import openvino as ov

                path = model.to_openvino(tmp, input_size=(size, size))
                row["export_s"] = round(time.perf_counter() - start, 1)
                compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                start = time.perf_counter()
                result = compiled(batch.numpy())
                outputs = {out.get_any_name(): result[out] for out in compiled.outputs}
            row["seconds"] = round(time.perf_counter() - start, 2)
            row["outputs"] = sorted(outputs)
            score = next(v for k, v in outputs.items() if "score" in k)
            amap = next(v for k, v in outputs.items() if "map" in k)
            row["max_score_diff"] = float(np.abs(score.reshape(-1) - expected.pred_score.numpy().reshape(-1)).max())
            row["max_map_diff"] = float(np.abs(amap.reshape(-1) - expected.anomaly_map.numpy().reshape(-1)).max())
    row["peak_rss_mb"] = round(peak_mb(), 1)
    row["score_range"] = [float(expected.pred_score.min()), float(expected.pred_score.max())]
    return row


def render(rows: list[dict], header: dict) -> str:
    """Markdown table of the three paths."""
    cols = ["path", "build_rss_mb", "peak_rss_mb", "export_s", "seconds", "max_score_diff", "max_map_diff"]
    lines = [
        *result_preamble(header),
        "",
        f"LGFDR, backbone {header['backbone']} (random weights), {header['image_size']} px, batch "
        f"{header['batch_size']}, {header['threads']} torch thread(s); each path in its own process. build_rss_mb: "
        "resident memory after building the model and fitting its statistics; peak_rss_mb: the process's peak; "
        "seconds: one inference (torch: mean of 3); diffs: exported outputs vs torch on the same batch (raw score and "
        "map, no post-processor).",
        "",
        *markdown_table(cols, rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """One subprocess per path; write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="swin_l")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--name", default="lgfdr_export_memory")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(run_path(args)), flush=True)
        return 0
    raw = list(sys.argv[1:] if argv is None else argv)
    header = {
        "name": args.name,
        "command": "python benchmarks/lgfdr_export_memory.py " + " ".join(shlex.quote(a) for a in raw),
        "machine": machine_info(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    rows = []
    for path in args.paths:
        proc = subprocess.run(
            [sys.executable, __file__, *raw, "--single", path], capture_output=True, text=True, check=False
        )
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            rows.append(json.loads(found[-1][len("RESULT ") :]))
        else:
            rows.append({"path": path, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]})
        print(rows[-1], flush=True)
        write_results(Path(args.results_dir), header, rows, render=render)
    print(render(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
