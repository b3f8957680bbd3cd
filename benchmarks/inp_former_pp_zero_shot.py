"""INP-Former++ zero-shot-style use: test a checkpoint trained on one dataset on another, without retraining.

The INPs are extracted from each test image, so a trained InpFormerPP can be applied to an unseen domain as is;
only the post-processor's normalisation statistics are re-computed on the target's validation split (AUROC and
AUPRO are rank-based and do not depend on them). Example (the ELPV checkpoint of the harness table)::

    python benchmarks/inp_former_pp_zero_shot.py \
        --ckpt /tmp/tables/elpv_ipp/InpFormerPP/InpFormerPP/ELPV/mono/v0/weights/lightning/model.ckpt \
        --image-size 128 --name elpv_to_mt_lite0_128
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint's weights into a fresh InpFormerPP and test it on Magnetic Tile."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a trusted InpFormerPP checkpoint (trained elsewhere)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "magnetic_tile"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="zero_shot")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch
    from anomalib.engine import Engine
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    from anomalib_recon.data import MagneticTile
    from anomalib_recon.models import InpFormerPP

    torch.set_num_threads(args.threads)
    evaluator = Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )
    model = InpFormerPP(backbone=args.backbone, image_size=args.image_size, evaluator=evaluator, visualizer=False)
    # Harness checkpoints pickle their custom Evaluator in the hyper-parameters, so weights_only loading refuses
    # them: only load checkpoints you made yourself. Evaluator and post-processor state stay fresh.
    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k: v for k, v in state.items() if not k.startswith(("evaluator.", "post_processor."))}
    missing, _ = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.startswith(("evaluator.", "post_processor."))]
    if missing:
        msg = f"the checkpoint does not fit this InpFormerPP configuration: missing {missing[:5]}"
        raise SystemExit(msg)
    datamodule = MagneticTile(root=args.data_root, train_batch_size=8, eval_batch_size=8, num_workers=1)
    engine = Engine(accelerator="cpu", logger=False, default_root_dir="/tmp/anomalib_recon_zero_shot")
    engine.validate(model=model, datamodule=datamodule)  # normalisation statistics on the target domain
    metrics = {k: float(v) for k, v in engine.test(model=model, datamodule=datamodule)[0].items()}
    command = "python benchmarks/inp_former_pp_zero_shot.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "checkpoint": args.ckpt, "target": "magnetic_tile", "metrics": metrics}
    (RESULTS / f"inp_former_pp_{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# InpFormerPP zero-shot-style: {args.name}", "", f"Command: `{command}`", ""]
    lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v:.4f} |" for k, v in metrics.items()]]
    (RESULTS / f"inp_former_pp_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
