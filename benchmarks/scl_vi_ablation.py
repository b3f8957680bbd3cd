"""SCL-VI key ablation: jigsaw alone vs jigsaw + SVDD, and one vs two patch scales, on one dataset.

Each training variant (``svdd``: the paper's loss with lambda = 1; ``jigsaw``: lambda = 0, no SVDD pairs) is fitted once
in its own subprocess through anomalib's ``Engine`` (the harness's datamodule), then the test split is scored once
and the per-scale maps give every fusion at no extra cost: ``K64 x K32`` (the paper), ``K64`` alone, ``K32`` alone
and ``K64 + K32`` — as the reference's ``eval_embeddings_NN_multiK`` reports them. Metrics are computed here on the
raw maps (image AUROC of the map max, pixel AUROC against the masks), so no post-processor statistics are involved.
Results go to ``benchmarks/results/scl_vi_ablation_<name>.json`` / ``.md``.

Example (offline, Magnetic Tile at 128 px, CPU-sized encoder)::

    python benchmarks/scl_vi_ablation.py --image-size 128 --max-steps 90 --seed 0 --name mt_128_seed0 \
        --model-args '{"width": 0.125, "pair_batch_size": 32, "strides": {"64": 32, "32": 16}}'
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

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

VARIANTS: dict[str, dict] = {"svdd": {"svdd_weight": 1.0}, "jigsaw": {"svdd_weight": 0.0}}
FUSIONS = ("K64xK32", "K64", "K32", "K64+K32")


def _fuse(maps: dict, fusion: str):
    if fusion == "K64xK32":
        return maps[64] * maps[32]
    if fusion == "K64+K32":
        return maps[64] + maps[32]
    return maps[int(fusion[1:])]


def run_variant(args: argparse.Namespace) -> list[dict]:
    """Fit one variant, score the test split once, return one row per fusion."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything
    from torchmetrics.functional.classification import binary_auroc

    from anomalib_recon.models.image.scl_vi import SCLVI

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True)
    datamodule = harness.build_datamodule(args)
    init = {**json.loads(args.model_args), **VARIANTS[args.single]}
    model = SCLVI(image_size=args.image_size, evaluator=False, visualizer=False, **init)
    engine = Engine(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        default_root_dir=str(Path(args.work_dir) / args.single),
        logger=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    train_s = fit_s - model.bank_stats.get("bank_build_s", 0.0)
    steps_per_epoch = len(datamodule.train_dataloader())

    model.eval()
    transform = model.pre_processor.transform
    scores: dict[str, list] = {f: [] for f in FUSIONS}
    pixels: dict[str, list] = {f: [] for f in FUSIONS}
    labels, masks = [], []
    n_images, start = 0, time.perf_counter()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            image, mask = transform(batch.image, batch.gt_mask)
            maps = model.model.scale_maps(image)
            for fusion in FUSIONS:
                fused = _fuse(maps, fusion)
                scores[fusion].append(fused.flatten(1).amax(1))
                pixels[fusion].append(fused[:, 0].flatten())
            labels.append(batch.gt_label.int())
            if mask is not None:
                masks.append(mask.int().flatten())
            n_images += image.shape[0]
    test_s = time.perf_counter() - start
    label = torch.cat(labels)
    mask = torch.cat(masks) if masks and int(torch.cat(masks).sum()) > 0 else None
    rows = []
    for fusion in FUSIONS:
        row = {
            "model": f"SCLVI ({args.single}, {fusion})",
            "image_AUROC": float(binary_auroc(torch.cat(scores[fusion]), label)),
            "train_s": round(train_s, 1),
            "test_s": round(test_s, 1),
            "steps": int(engine.trainer.global_step),
            "infer_img_per_s": round(n_images / test_s, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params_m": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 3),
            "epoch_s": round(train_s * steps_per_epoch / max(1, engine.trainer.global_step), 1),
            **model.bank_stats,
        }
        if mask is not None:
            row["pixel_AUROC"] = float(binary_auroc(torch.cat(pixels[fusion]), mask))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the variants (each in a subprocess) and write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["svdd", "jigsaw"], choices=sorted(VARIANTS))
    p.add_argument("--dataset", default="magnetic_tile", choices=["magnetic_tile", "elpv", "folder"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="SCLVI init args (JSON) shared by every variant")
    p.add_argument("--work-dir", default="/tmp/scl_vi_ablation")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--name", default="mt_128")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        for row in run_variant(args):
            print("ROW " + json.dumps(row), flush=True)
        print("RESULT " + json.dumps({"model": args.single}), flush=True)
        return 0
    header = {
        "name": f"scl_vi_ablation_{args.name}",
        "command": "python benchmarks/scl_vi_ablation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "backbone": "none (SCL-VI encoder trained from scratch)",
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "max_epochs": None,
        "max_time": None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model_args": json.loads(args.model_args),
    }
    rows: list[dict] = []
    for variant in args.variants:
        child = [sys.executable, __file__, *(argv or sys.argv[1:]), "--single", variant]
        proc_rows = _run(child, variant)
        rows += proc_rows
        harness.write_results(Path(args.results_dir), header, rows, note=_note(rows))
    print((Path(args.results_dir) / f"{header['name']}.md").read_text())
    return 0


def _run(child: list[str], label: str) -> list[dict]:
    """One variant subprocess; its ``ROW`` lines (or one error row)."""
    import subprocess

    proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows, last_error = [], ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("ROW "):
            rows.append(json.loads(line[4:]))
        elif "Error: " in line:
            last_error = line.strip()
    proc.wait()
    return rows or [{"model": f"SCLVI ({label})", "error": last_error or f"exit code {proc.returncode}"}]


def _note(rows: list[dict]) -> str:
    lines = [
        "",
        "One training run per variant (`svdd`: lambda = 1, the paper; `jigsaw`: lambda = 0, no SVDD pairs); every",
        "fusion row of a variant scores the same weights and memory banks. Metrics on raw maps (image AUROC of the map",
        "max; pixel AUROC on all test pixels at the input size). `epoch_s` = training time per pass over the training",
        "set (pro-rated from the steps run); `train_s` excludes the memory-bank build (`bank_build_s`).",
        "",
        "| row | epoch_s | bank_build_s | bank_size_64 | bank_size_32 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" not in row:
            lines.append(
                f"| {row['model']} | {row.get('epoch_s')} | {row.get('bank_build_s')} | "
                f"{int(row.get('bank_size_64', 0))} | {int(row.get('bank_size_32', 0))} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
