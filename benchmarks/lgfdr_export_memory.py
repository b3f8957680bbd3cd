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
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import stages  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, result_preamble  # noqa: E402


def run_path(args: argparse.Namespace) -> dict:
    """Build the model and run one path; returns its row."""
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
    row = {"build_rss_mb": round(stages.rss_mb(), 1)}
    return stages.measure_export_path(model, batch, args.stage, row, output_names=True)


def render(rows: list[dict], header: dict) -> str:
    """Markdown table of the three paths."""
    cols = ["path", "build_rss_mb", "peak_rss_mb", "export_s", "seconds", "max_score_diff", "max_map_diff"]
    lines = [
        *result_preamble(header),
        "",
        f"LGFDR, backbone {header['backbone']} (random weights), {header['image_size']} px, batch "
        f"{header['batch_size']}, {header['threads']} torch thread(s); each path in its own process. build_rss_mb: "
        "resident memory after building the model and fitting its statistics; " + stages.EXPORT_NOTE,
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
    p.add_argument("--paths", nargs="+", choices=stages.EXPORT_PATHS, default=list(stages.EXPORT_PATHS))
    p.add_argument("--name", default="lgfdr_export_memory")
    p.add_argument("--results-dir", default=str(RESULTS))
    stages.add_stage_argument(p, stages.EXPORT_PATHS)
    args = p.parse_args(argv)
    if args.stage:
        return stages.emit_result(run_path(args))
    raw = list(sys.argv[1:] if argv is None else argv)
    header = {
        "name": args.name,
        "command": stages.command(__file__, raw),
        "machine": machine_info(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    stages.record(__file__, raw, args.paths, header, Path(args.results_dir), render, label=lambda path: {"path": path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
