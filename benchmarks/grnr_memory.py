"""GRNR peak memory and time per image size, with and without chunking the per-image N×N distance matrix.

Each configuration runs in its own subprocess; the peak resident memory added by the forward pass is
``ru_maxrss`` after the timed forwards minus the resident memory after building the model (CPU). Backbone
weights are random (``weights=None``): memory and time do not depend on them, and WRN50's ImageNet weights are
not available offline. Results go to ``benchmarks/results/grnr_<name>.json`` / ``.md``.

Example::

    python benchmarks/grnr_memory.py --backbones wide_resnet50_2.tv_in1k tf_efficientnet_lite0 \
        --sizes 320 512 --batch 4 --threads 2 --name memory_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import stages  # noqa: E402


def spec_label(spec: str) -> dict:
    """A child's ``--stage`` is ``[backbone, image_size, distance_chunk]`` as JSON; its error row carries them."""
    return dict(zip(("backbone", "image_size", "distance_chunk"), json.loads(spec), strict=True))


def run_one(backbone: str, size: int, batch: int, chunk: int | None, threads: int, reps: int) -> dict:
    """Build GRNR, run ``reps`` timed forwards on a random batch; peak memory above the built model."""
    import torch

    from anomalib_recon.models.image.grnr import GRNR

    if threads:
        torch.set_num_threads(threads)
    model = GRNR(backbone=backbone, weights=None, image_size=size, distance_chunk=chunk, visualizer=False).eval()
    images = torch.randn(batch, 3, size, size)
    grids = model.model.grid_sizes((size, size))
    base = stages.rss_mb()
    with torch.no_grad():
        model.model(images)  # warm-up (allocator, kernels)
        start = time.perf_counter()
        for _ in range(reps):
            model.model(images)
        seconds = (time.perf_counter() - start) / reps
        feats = model.model.feature_extractor(images)
        start = time.perf_counter()
        for _ in range(reps):
            model.model.feature_extractor(images)
        backbone_s = (time.perf_counter() - start) / reps
    del feats
    peak = stages.peak_rss_mb()
    n_max = max(h * w for h, w in grids)
    return {
        "backbone": backbone,
        "image_size": size,
        "batch": batch,
        "distance_chunk": chunk,
        "grids": [f"{h}x{w}" for h, w in grids],
        "full_nxn_mb_per_batch": round(batch * n_max * n_max * 4 / 2**20, 1),
        "ms_per_image": round(1e3 * seconds / batch, 1),
        "backbone_ms_per_image": round(1e3 * backbone_s / batch, 1),
        "peak_rss_above_model_mb": round(peak - base, 1),
    }


def to_markdown(rows: list[dict], header: dict) -> str:
    """The table plus how it was produced."""
    cols = [
        "backbone",
        "image_size",
        "batch",
        "distance_chunk",
        "grids",
        "full_nxn_mb_per_batch",
        "ms_per_image",
        "backbone_ms_per_image",
        "peak_rss_above_model_mb",
        "error",
    ]
    lines = [
        *harness.result_preamble(header),
        "",
        "CPU, random backbone weights, torch eager `model.model(batch)` (no pre/post-processing). "
        "`full_nxn_mb_per_batch`: what one unchunked float32 N×N distance matrix per image of the batch takes at the "
        "largest grid; `peak_rss_above_model_mb`: peak resident memory of the forwards minus the built model.",
        "",
        *harness.markdown_table(cols, rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Every (backbone, size, chunk) in a subprocess; JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["wide_resnet50_2.tv_in1k", "tf_efficientnet_lite0"])
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 512])
    p.add_argument("--chunks", nargs="+", default=["1024", "none"], help="distance_chunk values ('none' = unchunked)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--name", default="memory_cpu")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    stages.add_stage_argument(p)
    args = p.parse_args(argv)
    if args.stage:
        backbone, size, chunk = json.loads(args.stage)
        return stages.emit_result(run_one(backbone, size, args.batch, chunk, args.threads, args.reps))
    raw = list(sys.argv[1:] if argv is None else argv)
    header = {"name": f"grnr_{args.name}", "command": stages.command(__file__, raw), "machine": harness.machine_info()}
    specs = [
        json.dumps([backbone, size, None if chunk.lower() == "none" else int(chunk)])
        for backbone in args.backbones
        for size in args.sizes
        for chunk in args.chunks
    ]
    stages.record(__file__, raw, specs, header, Path(args.results_dir), to_markdown, label=spec_label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
