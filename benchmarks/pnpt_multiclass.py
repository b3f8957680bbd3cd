"""PNPT multi-class benchmark: one model on Magnetic Tile + ELPV mono + ELPV poly, per-category metrics and their mean.

The multi-class half of PNPT's key ablation (the one-model-per-class half is ``studies/pnpt_{mt,elpv_mono,
elpv_poly}_lite0_128_300steps.yaml``, run through the harness). Each variant (an argument override of PNPT, e.g. the
class prompt pool vs no prompt stream) trains one model on the union of the categories
(``anomalib_recon.data.MultiCategory``: each category split by its own datamodule, the ELPV split seeded by
``--seed``) in its own subprocess, through anomalib's ``Engine`` and the harness's evaluator (image AUROC/F1-max,
pixel AUROC/AUPRO/AP where masks exist). Validation runs once, after training (its statistics are the final
model's), then the test logs ``<category>/<metric>`` and ``mean/<metric>`` (the unweighted mean over categories,
``PerCategoryMetrics``). Each row also records the class inference (nearest class key of ``GAP(f_3)``) on every test
image: accuracy per category and the confusion counts. ``--save-checkpoints DIR`` keeps each variant's checkpoint
(``<DIR>/<variant>.ckpt``) for ``pnpt_shortcut.py``.

Example (offline, Lite0; 900 steps = 3 categories x 300 steps of 8)::

    python benchmarks/pnpt_multiclass.py --variants class none --image-size 128 --max-steps 900 --seed 0 \
        --threads 1 --workers 1 --name pnpt_multiclass_lite0_128_900steps_seed0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

CATEGORIES = ("magnetic_tile", "elpv_mono", "elpv_poly")
OFFLINE_ARGS = {"embed_dim_per_scale": 64, "depth": 2, "decoder_depth": 2, "num_heads": 4, "lr": 5e-4}
OFFLINE_ARGS |= {"warmup_epochs": 0.05}
VARIANTS = {
    "class": {"prompts": "class"},
    "shared": {"prompts": "shared"},
    "none": {"prompts": "none"},
    "class_learned": {"prompts": "class", "prompt_prior": False},
}
METRIC_KEYS = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO")


def build_multi_datamodule(args: argparse.Namespace):
    """``MultiCategory`` over the chosen categories, batch size and workers of the run, ELPV split seeded."""
    from anomalib_recon.data import ELPV, MagneticTile, MultiCategory

    children = []
    for category in args.categories:
        if category == "magnetic_tile":
            root = Path(args.data_root or os.environ.get("ANOMALIB_RECON_MAGNETIC_TILE", harness.DEFAULT_MT_ROOT))
            children.append(MagneticTile(root=root, num_workers=args.workers))
        elif category in ("elpv_mono", "elpv_poly"):
            children.append(ELPV(cell_type=category.split("_")[1], seed=args.seed, num_workers=args.workers))
        else:
            msg = f"unknown category {category!r}; choose from {CATEGORIES}."
            raise SystemExit(msg)
    return MultiCategory(
        datamodules=children,
        category_names=list(args.categories),
        name="multi_" + "_".join(args.categories),
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
    )


def class_inference(model, datamodule) -> dict:
    """Accuracy of ``argmax_c cos(GAP(f_3(x)), k_c)`` per category on the test set, and the confusion counts."""
    import torch

    net = model.model
    if net.prompt_pool is None:
        return {}
    names = net.class_names
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    model.eval()
    device = next(net.parameters()).device
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images = model.pre_processor.transform(batch.image.to(device))
            truth = model.class_ids(batch.image_path, device)
            inferred = net.infer_class(net.extract(images))
            for t, p in zip(truth.tolist(), inferred.tolist(), strict=True):
                confusion[t, p] += 1
    totals = confusion.sum(dim=1).clamp(min=1)
    return {
        "class_accuracy": float(confusion.diag().sum() / confusion.sum()),
        **{f"{n}/class_accuracy": float(confusion[i, i] / totals[i]) for i, n in enumerate(names)},
        "class_confusion": {n: dict(zip(names, confusion[i].tolist(), strict=True)) for i, n in enumerate(names)},
    }


def run_single(args: argparse.Namespace) -> dict:
    """Fit, validate once, test and measure one variant (called in a subprocess)."""

    harness.setup_run(args)
    variant = args.single
    datamodule = build_multi_datamodule(args)
    model_args = {**OFFLINE_ARGS, **args.base_args, **VARIANTS.get(variant, {}), **args.variant_args.get(variant, {})}
    build_args = argparse.Namespace(image_size=args.image_size, backbone=args.backbone, model_args={"PNPT": model_args})
    model = harness.build_model("PNPT", build_args)
    # validate once, after training (the final model's statistics); an epoch-end validation of the union is long
    engine = harness.make_engine(args, variant, check_val_every_n_epoch=10**6)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.validate(model=model, datamodule=datamodule, verbose=False)
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    test_s = time.perf_counter() - start
    if args.save_checkpoints:
        path = Path(args.save_checkpoints) / f"{variant}.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        engine.trainer.save_checkpoint(path)
    row = {
        "model": f"PNPT ({variant})",
        "variant": variant,
        "model_args": model_args,
        "classes": model.model.class_names,
        **{k: float(v) for k, v in results.items() if isinstance(v, int | float) or hasattr(v, "item")},
        **class_inference(model, datamodule),
        "train_s": round(train_s, 1),
        "test_s": round(test_s, 1),
        "steps": int(engine.trainer.global_step),
        "train_images": {c: int(n) for c, n in datamodule.train_data.samples.groupby("category").size().items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params_m": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 2),
        "trainable_params_m": round(sum(p.numel() for p in model.model.trainable_parameters()) / 1e6, 2),
    }
    return row


def to_markdown(rows: list[dict], header: dict) -> str:
    """Per-category image AUROC (pixel AUROC for Magnetic Tile), the mean, the pooled AUROC and class accuracy."""
    cats = header["categories"]
    cols = ["model", *(f"{c}/image_AUROC" for c in cats), "mean/image_AUROC", "image_AUROC"]
    cols += [f"{c}/pixel_AUROC" for c in cats if c == "magnetic_tile"]
    cols += ["class_accuracy", "train_s", "test_s", "steps", "peak_rss_mb"]

    def cell(row: dict, col: str) -> str:
        value = row.get(col, "")
        return f"{value:.4f}" if isinstance(value, float) and ("AUROC" in col or "accuracy" in col) else str(value)

    lines = [
        *harness.result_preamble(header),
        "",
        f"One PNPT per variant on the union of {', '.join(cats)} (MultiCategory), backbone {header['backbone']}, "
        f"{header['image_size']} px, max_steps={header['max_steps']} of batch {header['batch_size']}, seed "
        f"{header['seed']}. `<category>/image_AUROC` is scored on that category's test images with the pooled model "
        "(one threshold for all), `mean/` is the unweighted mean over categories, `image_AUROC` the pooled test set. "
        "`class_accuracy`: the inferred class (nearest class key) of every test image against its category. "
        "Every metric is in the JSON.",
        "",
        *harness.markdown_table(cols, rows, cell),
    ]
    errors = [f"- {row['model']}: {row['error']}" for row in rows if row.get("error")]
    if errors:
        lines += ["", "Variants without a result:", "", *errors]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["class", "none"], help=f"of {sorted(VARIANTS)} or own names")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    p.add_argument("--data-root", default=None, help="Magnetic Tile folder (default: ../shared/datasets)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=900)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--max-time", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-args", type=json.loads, default={}, help="PNPT arguments for every variant (JSON)")
    p.add_argument("--variant-args", type=json.loads, default={}, help='per variant, JSON: {"class": {...}}')
    p.add_argument("--save-checkpoints", default=None, help="folder for <variant>.ckpt")
    p.add_argument("--name", default=None)
    p.add_argument("--work-dir", default="/tmp/anomalib_recon_bench/pnpt_multiclass")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Every variant in a subprocess; JSON + markdown rewritten after each."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return 0
    name = args.name or f"pnpt_multiclass_lite0_{args.image_size}_{args.max_steps}steps_seed{args.seed}"
    header = {
        "name": name,
        "command": "python benchmarks/pnpt_multiclass.py " + " ".join(shlex.quote(a) for a in argv),
        "machine": harness.machine_info(),
        "dataset": "multi_category",
        "categories": list(args.categories),
        **{k: getattr(args, k) for k in ("backbone", "image_size", "max_steps", "max_epochs", "max_time")},
        "seed": args.seed,
        "batch_size": args.batch_size,
        "base_args": {**OFFLINE_ARGS, **args.base_args},
    }
    rows = []
    for index, variant in enumerate(args.variants, 1):
        print(f"=== [{index}/{len(args.variants)}] {variant} ===", flush=True)
        child = [sys.executable, __file__, *argv, "--single", variant]
        rows.append(harness.run_child(child, f"PNPT ({variant})"))
        table = harness.write_results(Path(args.results_dir), header, rows, render=to_markdown)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
