"""PNPT's map, part by part: pixel AUROC of each scale's and each stream's cosine residual, per checkpoint.

PNPT's anomaly map is ``Σ_s upsample(½[r^x_s + r^p_s])`` over its three feature scales (strides 4, 8, 16), each
``r = 1 − cos(f_s, R_s)`` of the sample (``x``) or prompt (``p``) stream. When the fused map scores pixels worse than
a simple baseline, this says which part carries the score and which drags it: for each checkpoint it scores the test
split with the model's own map and with every part alone (upsampled bilinearly to the input, as the model does; no
blur), records each part's mean on normal and on defective pixels (a part with large values dominates the sum
whatever its AUROC), and scores the model's map rule on the coarser scales only (``map_s12``, ``map_s2``: what
dropping the fine scales from the map would give on the same weights). Inputs are exactly the harness's
(``per_class.harness_test_batches``).

Example (the key-ablation checkpoints of ``benchmarks/studies/pnpt_mt_lite0_128_300steps.yaml``)::

    python benchmarks/pnpt_maps.py --ckpts /tmp/anomalib_recon_study/pnpt_mt_lite0_128_300steps/seed*/*/PNPT/PNPT/\
magnetic_tile/v0/weights/lightning/model.ckpt --name pnpt_maps_mt_lite0_128_300steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import per_class


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (data settings as the harness's)."""
    return per_class.checkpoints_parser(__doc__.splitlines()[0], "PNPT", "pnpt_maps").parse_args(argv)


COARSE_MAPS = {"map_s12": (0.0, 1.0, 1.0), "map_s2": (0.0, 0.0, 1.0)}
"""The model's map rule with these ``scale_weights`` (PNPT's own option): strides 8 + 16, stride 16 alone."""


def score_parts(model, datamodule) -> dict[str, float]:
    """Pixel AUROC of the model's map and of each part; mean of each part on normal and on defective pixels."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from anomalib_recon.models.image.pnpt.anomaly_map import residual_map

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
            for name, weights in COARSE_MAPS.items():  # the model's map rule on the coarser scales only
                maps.setdefault(name, []).append(residual_map(sample, prompt, size, net.map_streams, net.blur, weights))
            masks.append(gt_mask.reshape(len(images), *size))
    defect = torch.cat(masks).flatten().numpy() > 0.5
    if not 0 < defect.sum() < defect.size:
        msg = "pnpt_maps needs test masks with both normal and defective pixels (Magnetic Tile, a folder with masks)."
        raise ValueError(msg)
    row: dict[str, float] = {}
    for part, values in maps.items():
        flat = torch.cat(values).flatten().numpy()
        row[f"{part}_AUROC"] = round(float(roc_auc_score(defect, flat)), 4)
        if not part.startswith("map"):
            row[f"{part}_normal_mean"] = round(float(flat[~defect].mean()), 4)
            row[f"{part}_defect_mean"] = round(float(flat[defect].mean()), 4)
    return row


def main(argv: list[str] | None = None) -> int:
    """Score every checkpoint; write ``results/<name>.json`` and ``.md``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)

    rows = []
    for name, model in per_class.load_checkpoints("PNPT", args):
        rows.append({"checkpoint": name} | score_parts(model, harness.build_datamodule(args)))
        print(rows[-1], flush=True)
    auroc = ["checkpoint", *[k for k in rows[0] if k.endswith("_AUROC")]]
    means = ["checkpoint", *[k for k in rows[0] if k.endswith("_mean")]]
    sections = [
        (
            "Pixel AUROC of PNPT's map, of the same map rule on the coarser scales only (map_s12: strides 8 and 16, "
            "map_s2: stride 16) and of each part alone (s0, s1, s2 = strides 4, 8, 16; sample / prompt stream; cosine "
            "residual upsampled to the input, no blur):",
            auroc,
        ),
        ("Mean of each part on normal and on defective pixels:", means),
    ]
    per_class.write_checkpoint_tables("pnpt_maps.py", argv, args, rows, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
