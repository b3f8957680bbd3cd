"""NAFRAD's two maps, per checkpoint: the segmentation head's (the model's map) and the reconstruction error it reads.

Answers "when a NAFRAD learning curve falls, which part falls?". The head ``S`` sees ``(F̂ − F)²`` and ``F`` and is
trained only on synthetic anomalies, so its map can drift towards the synthetic defects while the reconstruction
``R`` (trained to map perturbed features back to normal ones) keeps improving, or the other way round. For each
checkpoint (e.g. the snapshots of ``learning_curve.py --save-snapshots``) it scores the test split with

* ``head``: the model's own output, its map ``P`` and image score ``pred_score`` (max of the 32×32 box filter),
* ``rec``: ``mean_c (F̂ − F)²`` from the same forward (a hook on ``R``), upsampled like ``P``, same image rule,

as raw-score image AUROC (scikit-learn) and, where masks exist, pixel AUROC. The inputs are exactly the harness's
(``per_class.harness_test_batches``). ``synthetic_*`` scores the head on what it is trained on: the model's own
anomaly synthesis (``NAFRAD.synthesize``: rotation, then the generator) applied to the *normal* test images (fixed
seed, the same images and draws for every checkpoint; about half get an anomaly), image AUROC anomalous vs
untouched and pixel AUROC against the generated masks. A head whose synthetic AUROCs rise while the real ones fall
is learning its task and transferring worse; a head whose synthetic AUROCs fall is broken.

Example (snapshots of a Magnetic Tile curve)::

    python benchmarks/nafrad_branches.py --image-size 256 --ckpts /tmp/naf/NAFRAD/snapshots/step_*.ckpt \
        --name nafrad_branches_mt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import per_class

COLUMNS = [
    "checkpoint",
    "step",
    "head_image_AUROC",
    "head_pixel_AUROC",
    "rec_image_AUROC",
    "rec_pixel_AUROC",
    "synthetic_image_AUROC",
    "synthetic_pixel_AUROC",
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (data settings as in ``per_class.py``, i.e. the harness's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpts", nargs="+", required=True, help="NAFRAD checkpoints (Lightning or snapshot files)")
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder"], default="magnetic_tile")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="nafrad_branches")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def reconstruction_error(torch_model, images):
    """NAFRAD's own ``InferenceBatch`` and its reconstruction error map ``(B, H, W)`` and score ``(B,)``.

    One forward of the model: a hook on ``R`` records its input ``F`` and output ``F̂``; the error map is upsampled
    and reduced to an image score exactly as the model treats ``P``.
    """
    import torch.nn.functional as F

    from anomalib_recon.components.anomaly_map import reduce_max_avgpool

    seen: dict = {}
    hook = torch_model.reconstructor.register_forward_hook(
        lambda _m, inputs, output: seen.update(features=inputs[0], reconstruction=output)
    )
    try:
        output = torch_model(images)
    finally:
        hook.remove()
    error = ((seen["reconstruction"] - seen["features"]) ** 2).mean(1, keepdim=True)
    error = F.interpolate(error, size=images.shape[-2:], mode="bilinear", align_corners=False)
    k = torch_model.score_kernel_size
    return output, error[:, 0], reduce_max_avgpool(error, k, padding=k // 2).flatten()


def evaluate(ckpt: str, args: argparse.Namespace) -> dict:
    """One row: image and pixel AUROC of the head's and the reconstruction error's maps."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    load_args = argparse.Namespace(
        model="NAFRAD", ckpt=ckpt, backbone=args.backbone, image_size=args.image_size, init_args={}
    )
    generator_state = torch.random.get_rng_state()
    # The same synthetic anomalies for every checkpoint and run: seeded before the model is built, because
    # anomalib's generator draws some parameters once, at construction (e.g. its solarize threshold).
    torch.manual_seed(args.seed)
    model = per_class.load_model(load_args)
    data = harness.build_datamodule(args)
    labels, scores, pixels, masks = [], {"head": [], "rec": []}, {"head": [], "rec": []}, []
    synthetic = {"labels": [], "scores": [], "masks": [], "maps": []}
    with torch.no_grad():
        for images, gt_mask, batch in per_class.harness_test_batches(model, data):
            output, rec_map, rec_score = reconstruction_error(model.model, images)
            labels.append(batch.gt_label.numpy())
            scores["head"].append(output.pred_score.flatten().numpy())
            scores["rec"].append(rec_score.numpy())
            if gt_mask is not None:
                gt = gt_mask.float().reshape(len(images), 1, *gt_mask.shape[-2:])
                gt = torch.nn.functional.interpolate(gt, size=rec_map.shape[-2:], mode="nearest")
                masks.append((gt[:, 0] > 0.5).flatten().numpy())
                pixels["head"].append(output.anomaly_map.flatten().numpy())
                pixels["rec"].append(rec_map.flatten().numpy())
            good = batch.gt_label == 0
            if good.any():
                _, augmented, mask = model.synthesize(images[good])  # as in training_step
                output = model.model(augmented)
                mask = mask.reshape(len(augmented), -1) > 0.5
                synthetic["labels"].append(mask.any(1).numpy())
                synthetic["scores"].append(output.pred_score.flatten().numpy())
                synthetic["masks"].append(mask.flatten().numpy())
                synthetic["maps"].append(output.anomaly_map.flatten().numpy())
    torch.random.set_rng_state(generator_state)
    labels = np.concatenate(labels)
    match = re.search(r"step_(\d+)", Path(ckpt).name)
    row: dict = {"checkpoint": ckpt, "step": int(match.group(1)) if match else None}
    flat = np.concatenate(masks) if masks else None
    for branch in ("head", "rec"):
        row[f"{branch}_image_AUROC"] = round(float(roc_auc_score(labels, np.concatenate(scores[branch]))), 4)
        has_pixels = flat is not None and 0 < flat.sum() < flat.size
        pixel = roc_auc_score(flat, np.concatenate(pixels[branch])) if has_pixels else float("nan")
        row[f"{branch}_pixel_AUROC"] = round(float(pixel), 4)
    for level, truth, values in (("image", "labels", "scores"), ("pixel", "masks", "maps")):
        y = np.concatenate(synthetic[truth]) if synthetic[truth] else np.zeros(0, bool)
        auroc = roc_auc_score(y, np.concatenate(synthetic[values])) if 0 < y.sum() < y.size else float("nan")
        row[f"synthetic_{level}_AUROC"] = round(float(auroc), 4)
    return row


def render(rows: list[dict], header: dict) -> str:
    """The table with the command and machine."""
    lines = [
        *harness.result_preamble(header),
        "",
        f"Inputs: the harness's {header['dataset']} test split at {header['image_size']} px (batch "
        f"{header['batch_size']}, seed {header['seed']}). Raw-score AUROCs (scikit-learn), no normalisation: `head` is "
        "NAFRAD's map P (its anomaly map and, through the 32×32 box-filter max, its pred_score); `rec` is the "
        "reconstruction error mean_c (F̂ − F)² that P is computed from, with the same image rule; `synthetic_*`: the "
        "head on the model's own generator applied to the normal test images (fixed seed).",
        "",
        *harness.markdown_table(COLUMNS, rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Evaluate every checkpoint, print and write ``<name>.md`` / ``.json``."""
    args = parse(argv)
    import torch

    import anomalib_recon.models  # noqa: F401  (registers our models in anomalib.models)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    header = {
        "name": args.name,
        "command": "python benchmarks/nafrad_branches.py " + " ".join(shlex.quote(a) for a in argv or sys.argv[1:]),
        "machine": harness.machine_info(),
        **{k: getattr(args, k) for k in ("dataset", "backbone", "image_size", "batch_size", "seed")},
    }
    rows = []
    for ckpt in args.ckpts:
        rows.append(evaluate(ckpt, args))
        print(json.dumps(rows[-1]), flush=True)
        table = harness.write_results(Path(args.results_dir), header, rows, render=render)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
