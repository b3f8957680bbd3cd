"""OpenVINO at fp32 vs bf16: how far each model's exported scores move from the checkpoint, and how much faster.

Per model: a short fit on ELPV mono cells (harness settings: Lite0 offline weights, one image size), so the
post-processor holds real normalisation statistics; then ``Engine.export(OPENVINO)`` and, on ``--images`` test cells,
the normalised ``pred_score`` and ``anomaly_map`` of

* the checkpoint (torch eager, the reference),
* OpenVINO compiled with ``INFERENCE_PRECISION_HINT=f32`` (what our docs and tests use),
* OpenVINO compiled with ``INFERENCE_PRECISION_HINT=bf16`` (the CPU plugin's default on CPUs with AVX-512 BF16/AMX),

with the largest absolute error of each against the checkpoint and images/s at batch 1. On a CPU without bf16
support the bf16 hint falls back to fp32 and the two rows agree: the machine line in the results says which.

Example::

    python benchmarks/openvino_precision.py --models NAFRAD AGPNet AMINet InpFormerPP --image-size 128 \
        --max-steps 30 --name openvino_precision_elpv_128
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

COLUMNS = ["model", "backend", "precision", "max_score_err", "max_map_err", "img_per_s", "error"]


def run_model(name: str, args: argparse.Namespace, work: Path) -> list[dict]:
    """Fit briefly, export to OpenVINO, compare fp32/bf16 compiled models with the checkpoint."""
    import numpy as np
    import torch
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_recon.deploy import compile_openvino

    seed_everything(args.seed, workers=True)
    datamodule = harness.build_datamodule(args)
    model = harness.build_model(name, args)
    engine = Engine(
        max_steps=args.max_steps, default_root_dir=str(work / name), logger=False, accelerator="cpu", devices=1
    )
    engine.fit(model, datamodule=datamodule)
    engine.validate(model, datamodule=datamodule)
    xml = engine.export(
        model,
        ExportType.OPENVINO,
        export_root=work / name / "ov",
        input_size=(args.image_size, args.image_size),
        onnx_kwargs={"opset_version": 18},
    )
    images = []
    for batch in datamodule.test_dataloader():
        images += list(batch.image)
        if len(images) >= args.images:
            break
    size = (args.image_size, args.image_size)
    images = [torch.nn.functional.interpolate(i[None], size=size, mode="bilinear")[0] for i in images[: args.images]]
    model.eval()
    with torch.no_grad():
        reference = [model(i[None]) for i in images]
    rows = []
    for precision in ("f32", "bf16"):
        row = {"model": name, "backend": "openvino", "precision": precision}
        try:
            compiled = compile_openvino(xml, precision=precision)
            outputs = [compiled(i[None].numpy()) for i in images]
            start = time.perf_counter()
            for i in images:
                compiled(i[None].numpy())
            row["img_per_s"] = round(len(images) / (time.perf_counter() - start), 2)
            score_err = map_err = 0.0
            for out, ref in zip(outputs, reference, strict=True):
                named = {port.any_name: value for port, value in out.items()}
                score_err = max(
                    score_err, float(np.abs(named["pred_score"].reshape(-1) - ref.pred_score.numpy()).max())
                )
                amap = named["anomaly_map"].reshape(ref.anomaly_map.shape)
                map_err = max(map_err, float(np.abs(amap - ref.anomaly_map.numpy()).max()))
            row |= {"max_score_err": float(f"{score_err:.3g}"), "max_map_err": float(f"{map_err:.3g}")}
        except Exception as error:  # a failing backend is a row
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["NAFRAD", "AGPNet", "AMINet", "InpFormerPP"])
    parser.add_argument("--dataset", default="elpv", choices=["elpv", "magnetic_tile", "folder"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cell-type", default="mono")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-args", type=json.loads, default={})
    parser.add_argument("--name", default="openvino_precision")
    parser.add_argument("--results-dir", default=str(harness.RESULTS))
    args = parser.parse_args(argv)
    command = "python benchmarks/openvino_precision.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ov_precision_") as work:
        for name in args.models:
            try:
                rows += run_model(name, args, Path(work))
            except Exception as error:  # a model that cannot run is a row
                rows.append({"model": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
    machine = harness.machine_info()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(
        json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2)
    )
    lines = [
        *harness.result_preamble({"name": args.name, "command": command, "machine": machine}),
        "",
        f"{args.dataset} ({args.cell_type if args.dataset == 'elpv' else ''}), {args.backbone}, {args.image_size} px, "
        f"{args.max_steps} training steps, seed {args.seed}; errors are the largest absolute difference from the "
        f"checkpoint's normalised outputs over {args.images} test images; images/s at batch 1.",
        "",
        *harness.markdown_table(COLUMNS, rows),
    ]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
