"""PNPT at the paper's backbone and size: peak memory of torch inference vs ONNX / OpenVINO export + inference.

Each path runs in its own subprocess (so ``ru_maxrss`` is that path's own peak). The model is the inferred paper
configuration (wide_resnet50_2 layer1-3, 256 px, 768-d tokens, 6 SACE + 4 CSCD blocks) with random weights
(``weights=None``: no WideResNet-50 weights offline; memory does not depend on the values) and a prompt pool of
``--classes`` classes (MVTec AD's 15 by default) whose priors and keys are filled from random images, so the
exported graph infers the class (nearest key) and gathers its prompt as in use. Then

* ``torch``: ``model(batch)`` (pre-processor + torch model) three times under ``no_grad``;
* ``onnx``: ``model.to_onnx`` and one ONNX Runtime inference;
* ``openvino``: ``model.to_openvino`` and one inference compiled at fp32.

Each row records the resident memory after building the model, the peak, the size of the model's state dict and
the largest difference of the exported ``pred_score`` / ``anomaly_map`` from torch on the same batch (raw outputs:
no post-processor).

    python benchmarks/pnpt_export_memory.py --image-size 256 --classes 15 --name pnpt_export_memory_wrn50_256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import stages  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, result_preamble  # noqa: E402


def build(args: argparse.Namespace):
    """The paper configuration with random weights and a fitted ``--classes`` pool (random class statistics)."""
    import torch

    from anomalib_recon.models import PNPT

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = PNPT(
        backbone=args.backbone,
        weights=None,
        image_size=args.image_size,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    ).eval()
    net = model.model
    net.set_classes([f"class_{i}" for i in range(args.classes)])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = net.extract(model.pre_processor.transform(torch.rand(2, 3, args.image_size, args.image_size)))
        priors = [f[:1].expand(args.classes, -1, -1, -1) * (1 + 0.1 * torch.rand(args.classes, 1, 1, 1, generator=gen))
                  for f in features]  # fmt: skip
        keys = torch.randn(args.classes, net.channels[-1], generator=gen)
        net.prompt_pool.set_statistics(priors, keys)
    return model


def run_path(args: argparse.Namespace) -> dict:
    """Build the model and run one path; returns its row."""
    import torch

    model = build(args)
    size = args.image_size
    batch = torch.rand(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    build_rss = stages.rss_mb()
    state_mb = sum(t.numel() * t.element_size() for t in model.model.state_dict().values()) / 2**20
    row = {"build_rss_mb": round(build_rss, 1), "state_dict_mb": round(state_mb, 1)}
    return stages.measure_export_path(model, batch, args.stage, row, opset_version=18)


def render(rows: list[dict], header: dict) -> str:
    """Markdown table of the three paths."""
    cols = ["path", "build_rss_mb", "peak_rss_mb", "state_dict_mb", "export_s", "seconds", "max_score_diff"]
    cols += ["max_map_diff"]
    lines = [
        *result_preamble(header),
        "",
        f"PNPT, backbone {header['backbone']} (random weights), {header['image_size']} px, {header['classes']} classes "
        f"in the prompt pool, batch {header['batch_size']}, {header['threads']} torch thread(s); each path in its own "
        "process. build_rss_mb: resident memory after building the model and filling its pool; " + stages.EXPORT_NOTE,
        "",
        *markdown_table(cols, rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """One subprocess per path; write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="wide_resnet50_2.tv_in1k")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--classes", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paths", nargs="+", choices=stages.EXPORT_PATHS, default=list(stages.EXPORT_PATHS))
    p.add_argument("--name", default="pnpt_export_memory")
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
        **{k: getattr(args, k) for k in ("backbone", "image_size", "classes", "batch_size", "threads")},
    }
    stages.record(__file__, raw, args.paths, header, Path(args.results_dir), render, label=lambda path: {"path": path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
