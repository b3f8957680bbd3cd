"""PNPT's map, part by part: pixel AUROC of each scale's and each stream's cosine residual, per checkpoint.

PNPT's anomaly map is ``Σ_s upsample(½[r^x_s + r^p_s])`` over its three feature scales (strides 4, 8, 16), each
``r = 1 − cos(f_s, R_s)`` of the sample (``x``) or prompt (``p``) stream. When the fused map scores pixels worse than
a simple baseline, this says which part carries the score and which drags it: for each checkpoint it scores the test
split with the model's own map and with every part alone (upsampled bilinearly to the input, as the model does; no
blur), and records each part's mean on normal and on defective pixels (a part with large values dominates the sum
whatever its AUROC). Inputs are exactly the harness's (``per_class.harness_test_batches``).

Example (the key-ablation checkpoints of ``benchmarks/studies/pnpt_mt_lite0_128_300steps.yaml``)::

    python benchmarks/pnpt_maps.py --ckpts /tmp/anomalib_recon_study/pnpt_mt_lite0_128_300steps/seed*/*/PNPT/PNPT/\
magnetic_tile/v0/weights/lightning/model.ckpt --name pnpt_maps_mt_lite0_128_300steps
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import per_class


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (data settings as the harness's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpts", nargs="+", required=True, help="PNPT checkpoints (the harness's model.ckpt files)")
    p.add_argument("--dataset", choices=["magnetic_tile", "folder"], default="magnetic_tile", help="needs masks")
    p.add_argument("--data-root", default=None, help="magnetic_tile: optional; folder: an MVTec-style category")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="as the harness run (a folder's split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="pnpt_maps")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    return p.parse_args(argv)


def label(ckpt: str) -> str:
    """``seed1/class`` from the study runner's ``.../seed1/class/PNPT/...`` layout, else the file path."""
    parts = Path(ckpt).parts
    seeds = [i for i, part in enumerate(parts) if part.startswith("seed")]
    return "/".join(parts[seeds[-1] : seeds[-1] + 2]) if seeds else ckpt


def score_parts(model, datamodule) -> dict[str, float]:
    """Pixel AUROC of the model's map and of each part; mean of each part on normal and on defective pixels."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    net = model.model
    maps: dict[str, list] = {"map": []}
    masks = []
    with torch.no_grad():
        for images, gt_mask, _ in per_class.harness_test_batches(model, datamodule):
            size = images.shape[-2:]
            out = net.reconstruction_outputs(images)
            sample, prompt = net.stream_residuals(out)
            streams = {"sample": sample} | ({"prompt": prompt} if prompt else {})
            for stream, residuals in streams.items():
                for s, r in enumerate(residuals):
                    up = F.interpolate(r, size=size, mode="bilinear", align_corners=False)
                    maps.setdefault(f"{stream}_s{s}", []).append(up)
            maps["map"].append(net(images).anomaly_map)
            masks.append(gt_mask.reshape(len(images), *size))
    defect = torch.cat(masks).flatten().numpy() > 0.5
    if not 0 < defect.sum() < defect.size:
        msg = "pnpt_maps needs test masks with both normal and defective pixels (Magnetic Tile, a folder with masks)."
        raise ValueError(msg)
    row: dict[str, float] = {}
    for part, values in maps.items():
        flat = torch.cat(values).flatten().numpy()
        row[f"{part}_AUROC"] = round(float(roc_auc_score(defect, flat)), 4)
        if part != "map":
            row[f"{part}_normal_mean"] = round(float(flat[~defect].mean()), 4)
            row[f"{part}_defect_mean"] = round(float(flat[defect].mean()), 4)
    return row


def main(argv: list[str] | None = None) -> int:
    """Score every checkpoint; write ``results/<name>.json`` and ``.md``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rows = []
    for ckpt in args.ckpts:
        load_args = argparse.Namespace(
            model="PNPT", ckpt=ckpt, backbone="tf_efficientnet_lite0", image_size=args.image_size, init_args={}
        )
        model = per_class.load_model(load_args)
        rows.append({"checkpoint": label(ckpt)} | score_parts(model, harness.build_datamodule(args)))
        print(rows[-1], flush=True)
    header = {
        "name": args.name,
        "command": "python benchmarks/pnpt_maps.py " + " ".join(shlex.quote(a) for a in argv),
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "image_size": args.image_size,
    }

    def render(rows: list[dict], header: dict) -> str:
        auroc = ["checkpoint", *[k for k in rows[0] if k.endswith("_AUROC")]]
        means = ["checkpoint", *[k for k in rows[0] if k.endswith("_mean")]]
        return "\n".join(
            [
                *harness.result_preamble(header),
                "",
                "Pixel AUROC of PNPT's map and of each part alone (s0, s1, s2 = strides 4, 8, 16; sample / prompt "
                "stream; cosine residual upsampled to the input, no blur):",
                "",
                *harness.markdown_table(auroc, rows),
                "",
                "Mean of each part on normal and on defective pixels:",
                "",
                *harness.markdown_table(means, rows),
                "",
            ]
        )

    harness.write_results(Path(args.results_dir), header, rows, render=render)
    print(render(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
