"""RB-AE: peak memory of torch inference vs ONNX / OpenVINO export + inference, at the paper's settings.

Each measurement runs in its own subprocess (clean ``ru_maxrss``): build ``RBAE`` (ResNet-18 encoder, random
weights: ``weights=None``, as the paper backbone's ImageNet weights are not needed for memory), then

* ``torch``: ``model(images)`` (pre-processor, model, post-processor) under ``no_grad``;
* ``onnx``: ``model.to_onnx`` at the input size, then one ONNX Runtime session and the same inference;
* ``openvino``: ``model.to_openvino`` (via ONNX), then ``anomalib_recon.deploy.OpenVINOInferencer`` (fp32).

It reports the peak resident memory of the whole process, the memory added after building the model, and the
largest difference of the exported outputs from torch on the same images (with the model's post-processor at its
defaults, the normalised score and map are those of the raw outputs). Results go to
``benchmarks/results/rb_ae_<name>.json`` / ``.md``.

Example::

    python benchmarks/rb_ae_memory.py --size 256 --batch 1 --threads 1 --name memory_256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import stages  # noqa: E402

BACKENDS = ("torch", "onnx", "openvino")


def run_one(backend: str, backbone: str, size: int, batch: int, threads: int) -> dict:
    """One backend in this process: build, export (ONNX/OpenVINO), infer; memory, time and difference from torch."""
    import numpy as np
    import torch

    from anomalib_recon.models.image.rb_ae import RBAE

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = RBAE(backbone=backbone, weights=None, image_size=size, visualizer=False).eval()
    model._recon_trained = True  # random weights on purpose: memory does not depend on them
    model.model.set_reference(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)), 0)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
    base = stages.rss_mb()
    start = time.perf_counter()
    row: dict = {"backend": backend, "backbone": backbone, "size": size, "batch": batch}
    if backend == "torch":
        with torch.no_grad():
            out = model(images)
        got = (out.pred_score.numpy(), out.anomaly_map.numpy())
    else:
        folder = Path(tempfile.mkdtemp(prefix="rb_ae_export_"))
        if backend == "onnx":
            import onnxruntime as ort

            path = model.to_onnx(folder, input_size=(size, size), opset_version=18)
            row["export_s"] = round(time.perf_counter() - start, 1)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
            got = (outputs["pred_score"], outputs["anomaly_map"])
        else:
            from anomalib_recon.deploy import OpenVINOInferencer

            path = model.to_openvino(folder, input_size=(size, size), onnx_kwargs={"opset_version": 18})
            row["export_s"] = round(time.perf_counter() - start, 1)
            inferencer = OpenVINOInferencer(path=path, device="CPU")
            scores, maps = [], []
            for image in images:
                result = inferencer.predict(image.numpy())
                scores.append(np.asarray(result.pred_score).reshape(-1))
                maps.append(np.asarray(result.anomaly_map).reshape(1, size, size))
            got = (np.concatenate(scores), np.stack(maps))
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["peak_rss_mb"] = round(stages.peak_rss_mb(), 1)
    row["model_rss_mb"] = round(base, 1)
    row["added_mb"] = round(row["peak_rss_mb"] - base, 1)
    row["max_abs_diff_score"] = float(np.abs(got[0].reshape(-1) - expected.pred_score.numpy().reshape(-1)).max())
    want = expected.anomaly_map.numpy()
    row["max_abs_diff_map"] = float(np.abs(got[1].reshape(want.shape) - want).max())
    return row


def to_markdown(rows: list[dict], header: dict) -> str:
    """The results table with how it was produced."""
    cols = ["backend", "backbone", "size", "batch", "peak_rss_mb", "model_rss_mb", "added_mb", "export_s", "seconds"]
    cols += ["max_abs_diff_score", "max_abs_diff_map"]
    lines = [
        *harness.result_preamble(header),
        "",
        "Peak resident memory of one process per backend (`ru_maxrss`), the memory after building the model and the "
        "difference; `seconds` covers export and inference. Differences are against torch on the same images.",
        "",
        *harness.markdown_table(cols, rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every backend in a subprocess and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18.tv_in1k")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--name", default="memory_256")
    stages.add_stage_argument(parser, BACKENDS)
    args = parser.parse_args(argv)
    if args.stage:
        return stages.emit_result(run_one(args.stage, args.backbone, args.size, args.batch, args.threads))
    raw = list(sys.argv[1:] if argv is None else argv)
    header = {"name": f"rb_ae_{args.name}", "command": stages.command(__file__, raw), "machine": harness.machine_info()}
    stages.record(__file__, raw, args.backends, header, harness.RESULTS, to_markdown, label=lambda b: {"backend": b})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
