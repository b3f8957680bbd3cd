"""SCL-VI exported to OpenVINO vs its checkpoint, on a bank learnt from real data; kNN distances vs float64.

Fits SCL-VI with the offline configuration's model (``configs/scl_vi_offline.yaml``: 128 px, encoder width x0.125,
strides 32/16, 32 pairs per sub-task) for ``--max-steps`` steps on a dataset (Magnetic Tile, ELPV mono or an
MVTec-style folder), or loads ``--state`` saved by an earlier run; exports it with ``Engine.export(OPENVINO)`` and
compares, on ``--images`` test images, the normalised ``pred_score`` and ``anomaly_map`` of the checkpoint (torch)
with anomalib's ``OpenVINOInferencer`` compiled at fp32 (``anomalib_recon.deploy.OpenVINOInferencer``). It also
reports, per scale, how far the model's kNN distances of those images' windows are from a float64 brute force, and
how far the textbook ranking (``||q||^2 + ||b||^2 - 2 q.b`` in fp32, then the k distances recomputed from the chosen
rows) is.

The script uses only API that every SCL-VI version has, so the same command measures an older checkout
(``--state`` of this run, with that checkout's ``src`` first on ``PYTHONPATH``).

Example::

    python benchmarks/scl_vi_export_parity.py --dataset magnetic_tile --max-steps 300 --images 200 \
        --work-dir /tmp/scl_vi_parity --name export_parity_mt_128
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

OFFLINE_MODEL = {
    "image_size": 128,
    "feature_dim": 64,
    "width": 0.125,
    "scales": [64, 32],
    "strides": {64: 32, 32: 16},
    "k": 5,
    "svdd_weight": 1.0,
    "pair_batch_size": 32,
    "lr": 1e-4,
}


def datamodule(args: argparse.Namespace):
    """Magnetic Tile, ELPV mono or an MVTec-style folder (the harness's datamodules), batch 8, no workers."""
    settings = {"batch_size": 8, "workers": 0, "cell_type": "mono", "seed": args.seed}
    return harness.build_datamodule(argparse.Namespace(dataset=args.dataset, data_root=args.data_root, **settings))


def textbook_knn(queries, bank, k: int):
    """The k nearest distances with rows ranked by ``||q||^2 + ||b||^2 - 2 q.b`` in fp32 (the form that cancels)."""
    import torch

    parts = []
    for q in queries.split(1024):
        d2 = q.pow(2).sum(-1, keepdim=True) + bank.pow(2).sum(-1)[None] - 2 * q @ bank.T
        index = d2.topk(k, dim=1, largest=False).indices
        parts.append((q[:, None] - bank[index]).pow(2).sum(-1).sqrt().sort(dim=1).values)
    return torch.cat(parts)


def distance_errors(model, images) -> list[dict]:
    """Per scale: bank rows, median |q|^2 and nearest distance, max error of the model's and the textbook kNN."""
    import torch

    from anomalib_recon.models.image.scl_vi.torch_model import knn_distances

    net = model.model
    rows = []
    with torch.no_grad():
        x = net.standardize(model.pre_processor.transform(images))
        for patch in net.scales:
            queries = net.embed_grid(x, patch).reshape(-1, net.feature_dim)
            bank = net.memory_bank(patch)
            truth = torch.cdist(queries.double(), bank.double()).topk(net.k, dim=1, largest=False).values
            ours = knn_distances(queries, bank, net.k, net.knn_chunk_size).double()
            textbook = textbook_knn(queries, bank, net.k).double()
            rows.append(
                {
                    "scale": patch,
                    "bank_rows": int(bank.shape[0]),
                    "queries": int(queries.shape[0]),
                    "median_sq_norm": round(float(queries.pow(2).sum(1).median()), 2),
                    "median_nearest": float(f"{float(truth[:, 0].median()):.4g}"),
                    "model_max_err": float(f"{float((ours - truth).abs().max()):.3g}"),
                    "textbook_max_err": float(f"{float((textbook - truth).abs().max()):.3g}"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Fit (or load), export, compare; write ``benchmarks/results/scl_vi_<name>.json`` / ``.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder"], default="magnetic_tile")
    p.add_argument("--data-root", default=None, help="Magnetic Tile or folder root (default: the shared Magnetic Tile)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--images", type=int, default=200, help="test images compared")
    p.add_argument("--state", default=None, help="state_dict saved by an earlier run (skips the fit)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/scl_vi_parity")
    p.add_argument("--name", default="export_parity")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    args = p.parse_args(argv)
    if args.dataset == "folder":
        harness.check_folder_root(args)

    import numpy as np
    import torch
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_recon.deploy import OpenVINOInferencer
    from anomalib_recon.models import SCLVI

    torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = datamodule(args)
    model = SCLVI(**OFFLINE_MODEL, visualizer=False)
    engine = Engine(max_steps=args.max_steps, default_root_dir=str(work), logger=False, accelerator="cpu", devices=1)
    fit_s = None
    if args.state:
        model.load_state_dict(torch.load(args.state, weights_only=True))
        # test images resized to the model's input (the exported graph's input) one by one, as Engine.fit sets up
        data.test_augmentations = model.pre_processor.transform
        data.setup()
    else:
        start = time.perf_counter()
        engine.fit(model, datamodule=data)
        fit_s = round(time.perf_counter() - start, 1)
        torch.save(model.state_dict(), work / "state.pt")
    images = []
    for batch in data.test_dataloader():
        images += list(batch.image)
        if len(images) >= args.images:
            break
    images = torch.stack(images[: args.images])
    model.eval()
    distances = distance_errors(model, images)

    start = time.perf_counter()
    xml = engine.export(
        model,
        ExportType.OPENVINO,
        export_root=work / "export",
        input_size=(128, 128),
        onnx_kwargs={"opset_version": 18},
    )
    export_s = round(time.perf_counter() - start, 1)
    inferencer = OpenVINOInferencer(path=xml, device="CPU")
    score_err, map_err = [], []
    for image in images:
        with torch.no_grad():
            reference = model(image[None])
        out = inferencer.predict(image[None])
        score_err.append(float(np.abs(np.asarray(out.pred_score).reshape(-1) - reference.pred_score.numpy()).max()))
        map_err.append(
            float(np.abs(np.asarray(out.anomaly_map).reshape(-1) - reference.anomaly_map.numpy().reshape(-1)).max())
        )
    post = model.post_processor
    parity = {
        "images": len(score_err),
        "max_score_err": float(f"{max(score_err):.3g}"),
        "max_map_err": float(f"{max(map_err):.3g}"),
        "images_score_err_over_1e-4": sum(e > 1e-4 for e in score_err),
        "image_score_range": [float(f"{float(post.image_min):.4g}"), float(f"{float(post.image_max):.4g}")],
    }
    print(json.dumps(parity), flush=True)

    header = {
        "name": f"scl_vi_{args.name}",
        "command": "python benchmarks/scl_vi_export_parity.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "max_steps": args.max_steps,
        "state": args.state,
        "fit_s": fit_s,
        "export_s": export_s,
        "model": OFFLINE_MODEL,
        "distances": distances,
        "parity": parity,
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{header['name']}.json").write_text(json.dumps(header, indent=2))
    lines = [
        *harness.result_preamble(header),
        "",
        f"SCL-VI with the offline configuration's model on {args.dataset} (128 px), "
        + (
            f"fitted {args.max_steps} steps ({fit_s} s)"
            if fit_s is not None
            else f"weights and banks from {args.state}"
        )
        + f"; OpenVINO export {export_s} s. Normalised outputs of the checkpoint (torch) vs anomalib's "
        "OpenVINOInferencer at fp32, per image at batch 1:",
        "",
        *harness.markdown_table(list(parity), [parity]),
        "",
        f"kNN distances (k = {model.model.k}) of these images' windows vs a float64 brute force; `textbook` ranks "
        "rows by ||q||^2 + ||b||^2 - 2 q.b in fp32 and then recomputes the k distances of the chosen rows:",
        "",
        *harness.markdown_table(list(distances[0]), distances),
    ]
    (results / f"{header['name']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
