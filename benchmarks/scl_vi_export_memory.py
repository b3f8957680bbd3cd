"""SCL-VI at the paper's bank size: peak memory and time of the OpenVINO export and of OpenVINO and torch inference.

The paper's geometry (256 px, patch sizes 64 and 32 at strides 16 and 4, D = 64, encoder width 1.0) gives 13 x 13
and 57 x 57 windows per image, so ``--train-images`` training images (Magnetic Tile: 762) fill banks of
``N * 169`` and ``N * 3249`` rows (128,778 and 2,475,738: 31 MB and 604 MB). The banks are filled with random
tanh-range embeddings of that size (memory and time do not depend on the values) and the mean image with a random
image; nothing is trained. Every stage runs in its own process, so its peak resident memory (``ru_maxrss``) is its
own:

* ``export``: ``model.to_openvino`` (anomalib's ONNX export with its probe forward, then OpenVINO's conversion and
  IR write), with the exported files' sizes;
* ``openvino``: ``anomalib_recon.deploy.OpenVINOInferencer`` (fp32) compiling the IR and predicting ``--images``
  images at batch 1;
* ``torch``: the checkpoint's eager ``model(image)`` on the same images.

The exported kNN searches the bank in blocks of ``--chunk`` rows (``knn_chunk_size``), so the distances it holds per
image are ``windows x chunk`` floats, not ``windows x bank rows`` (3249 x 2.5 M: 32 GB per image).

Example::

    python benchmarks/scl_vi_export_memory.py --train-images 762 --threads 2 --images 2 --name export_memory_256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import stages


def windows(image_size: int) -> dict[int, int]:
    """Windows per image and scale at the paper's strides scaled with the size (13 x 13 and 57 x 57 at 256 px)."""
    from anomalib_recon.models.image.scl_vi.torch_model import PAPER_SCALES, resolve_strides

    strides = resolve_strides((image_size, image_size), PAPER_SCALES, None)
    return {k: ((image_size - k) // strides[k][0] + 1) ** 2 for k in PAPER_SCALES}


def paper_model(args: argparse.Namespace):
    """SCL-VI at the paper's geometry with random banks of the paper's size and a random mean image."""
    import torch

    from anomalib_recon.models import SCLVI

    torch.manual_seed(0)
    size = args.image_size
    model = SCLVI(image_size=size, width=args.width, knn_chunk_size=args.chunk, evaluator=False, visualizer=False)
    net = model.model.eval()
    net.set_mean_image(torch.rand(1, 3, size, size) * 0.2 + 0.4)
    gen = torch.Generator().manual_seed(1)
    for patch, per_image in windows(size).items():
        rows = args.train_images * per_image
        setattr(net, f"memory_bank_{patch}", torch.tanh(2 * torch.randn(rows, 64, generator=gen)))
    net.bank_steps.copy_(net.trained_steps)
    model._recon_trained = True
    return model


def test_images(count: int, size: int):
    """Smooth random test images in [0, 1]."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(2)
    return F.interpolate(torch.rand(count, 3, 32, 32, generator=gen), size=size, mode="bilinear", align_corners=False)


def stage_export(args: argparse.Namespace) -> dict:
    """Export to OpenVINO IR; peak memory, time and file sizes."""
    model = paper_model(args)
    before = round(stages.peak_rss_mb(), 1)
    start = time.perf_counter()
    size = (args.image_size, args.image_size)
    xml = model.to_openvino(Path(args.work_dir), input_size=size, onnx_kwargs={"opset_version": 18})
    seconds = time.perf_counter() - start
    files = {p.name: round(p.stat().st_size / 2**20, 1) for p in Path(xml).parent.iterdir()}
    peak = round(stages.peak_rss_mb(), 1)
    return {"stage": "export", "seconds": round(seconds, 1), "rss_before_mb": before, "peak_rss_mb": peak} | {
        "files_mb": files
    }


def stage_openvino(args: argparse.Namespace) -> dict:
    """Compile the IR at fp32 and predict images one at a time; peak memory, compile time, seconds per image."""
    import torch

    from anomalib_recon.deploy import OpenVINOInferencer

    torch.set_num_threads(args.threads)
    images = test_images(args.images, args.image_size)
    xml = Path(args.work_dir) / "weights" / "openvino" / "model.xml"
    before = round(stages.peak_rss_mb(), 1)
    start = time.perf_counter()
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config={"INFERENCE_NUM_THREADS": args.threads})
    compile_s = time.perf_counter() - start
    compiled_rss = round(stages.peak_rss_mb(), 1)
    times, scores = [], []
    for image in images:
        start = time.perf_counter()
        out = inferencer.predict(image[None])
        times.append(time.perf_counter() - start)
        scores.append(float(out.pred_score.reshape(-1)[0]))
    return {
        "stage": "openvino",
        "compile_s": round(compile_s, 1),
        "seconds_per_image": [round(t, 1) for t in times],
        "rss_before_mb": before,
        "rss_after_compile_mb": compiled_rss,
        "peak_rss_mb": round(stages.peak_rss_mb(), 1),
        "pred_score": scores,
    }


def stage_torch(args: argparse.Namespace) -> dict:
    """Eager ``model(image)`` one image at a time; peak memory and seconds per image."""
    import torch

    torch.set_num_threads(args.threads)
    model = paper_model(args)
    images = test_images(args.images, args.image_size)
    before = round(stages.peak_rss_mb(), 1)
    times, scores = [], []
    with torch.no_grad():
        for image in images:
            start = time.perf_counter()
            out = model(image[None])
            times.append(time.perf_counter() - start)
            scores.append(float(out.pred_score.reshape(-1)[0]))
    return {
        "stage": "torch",
        "seconds_per_image": [round(t, 1) for t in times],
        "rss_before_mb": before,
        "peak_rss_mb": round(stages.peak_rss_mb(), 1),
        "pred_score": scores,
    }


STAGES = {"export": stage_export, "openvino": stage_openvino, "torch": stage_torch}


def main(argv: list[str] | None = None) -> int:
    """Run each stage in a child process; write ``benchmarks/results/scl_vi_<name>.json`` / ``.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=int, default=762, help="training images (Magnetic Tile: 762)")
    p.add_argument("--image-size", type=int, default=256, help="input size (256 = the paper; a multiple of 64)")
    p.add_argument("--width", type=float, default=1.0, help="encoder width (1.0 = the paper)")
    p.add_argument("--chunk", type=int, default=65536, help="knn_chunk_size (bank rows per block)")
    p.add_argument("--images", type=int, default=2, help="test images per inference stage (batch 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    stages.add_stage_argument(p, STAGES)  # a child process
    p.add_argument("--work-dir", default="/tmp/scl_vi_export_memory")
    p.add_argument("--name", default="export_memory_256")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    args = p.parse_args(argv)

    if args.stage:
        import torch

        torch.set_num_threads(args.threads)
        return stages.emit_result(STAGES[args.stage](args))

    argv = list(argv if argv is not None else sys.argv[1:])
    per_image = windows(args.image_size)
    banks = {f"bank_rows_{k}": args.train_images * w for k, w in per_image.items()}
    bank_mb = round(sum(banks.values()) * 64 * 4 / 2**20, 1)
    header = {
        "name": f"scl_vi_{args.name}",
        "command": stages.command(__file__, argv),
        "machine": harness.machine_info() | {"memory_gb": stages.memory_gb()},
        "image_size": args.image_size,
        "train_images": args.train_images,
        **banks,
        "banks_mb": bank_mb,
        "knn_chunk_size": args.chunk,
        "width": args.width,
    }
    per_block_mb = round(per_image[32] * args.chunk * 4 / 2**20)

    def render(rows: list[dict], header: dict) -> str:
        lines = [
            *harness.result_preamble(header),
            "",
            f"SCL-VI at {args.image_size} px with the paper's strides and encoder width {args.width}; random banks "
            f"of the paper's size for {args.train_images} training images: {banks['bank_rows_64']:,} + "
            f"{banks['bank_rows_32']:,} rows (D = 64, {bank_mb} MB). kNN blocks of {args.chunk:,} bank rows: "
            f"{per_image[32]} x {args.chunk:,} distances = {per_block_mb} MB per image per block (unblocked: "
            f"{per_image[32] * banks['bank_rows_32'] * 4 / 2**30:.1f} GB). Each stage in its own process; peak RSS = "
            f"ru_maxrss; {args.threads} threads; test images at batch 1.",
            "",
        ]
        lines += ["- " + ", ".join(f"{key}: {value}" for key, value in row.items()) for row in rows]
        return "\n".join(lines) + "\n"

    stages.record(__file__, argv, args.stages, header, Path(args.results_dir), render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
