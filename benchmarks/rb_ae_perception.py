"""RB-AE's defective-feature perception, measured: does the encoder tell defects apart, on synthetic and real ones?

The perception loss trains RB-AE's encoder so that at defective positions ``E_s(x_a)`` differs from the clean
``E_s(x)`` (cosine below the margin) while positions without a defect keep their features. Whether that helps the
model depends on whether what the encoder learns to perceive on the synthetic (Perlin) defects carries over to real
ones. For each checkpoint this script scores two sets with the same measures:

* ``real``: the test split, exactly as ``Engine.test`` feeds the model (``per_class.harness_test_batches``);
* ``synthetic``: Perlin defects (anomalib's ``PerlinAnomalyGenerator``, probability 1, Perlin-noise textures as the
  offline training uses, seeded) pasted on the normal test images, with their masks.

Measures (pixel AUROC against the set's masks; maps upsampled bilinearly to the input, no blur):

* ``map``: the model's anomaly map ``P`` (what the image score reads); ``image`` (real set): the model's score;
* ``enc_s<k>``, ``enc``: the encoder residual ``1 − cos(E_s(x), E_s(x̂))`` at scale ``k`` and its mean over scales
  — the part of the MSFDM's input that the perception loss shapes (``x̂`` = the model's reconstruction);
* synthetic set only, the loss's own quantity: ``cos_defect`` / ``cos_normal``, the mean of ``cos(E_s(x_a), E_s(x))``
  over the cells the loss calls defective (mask coverage >= 0.5) and normal (coverage 0), averaged over scales; and
  ``copy``, how much of the pasted defect's pixel change reaches the reconstruction (0 = repaired, 1 = reproduced).

Example (the checkpoints of ``benchmarks/studies/rb_ae_mt_lite0_128_300steps_ablation.yaml``)::

    python benchmarks/rb_ae_perception.py --ckpts /tmp/anomalib_recon_study/rb_ae_mt_lite0_128_300steps_ablation/\
seed*/*/RBAE/RBAE/magnetic_tile/v0/weights/lightning/model.ckpt --name rb_ae_perception_mt_lite0_128_300steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import per_class


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (data settings as the harness's, plus the synthetic set's size and seed)."""
    p = per_class.checkpoints_parser(__doc__.splitlines()[0], "RB-AE", "rb_ae_perception")
    p.add_argument("--synthetic-images", type=int, default=64, help="normal test images that get a Perlin defect")
    p.add_argument("--synthetic-seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_set(datamodule, size: tuple[int, int], count: int, seed: int):
    """``(clean, defective, masks)``: up to ``count`` normal test images (seeded draw, resized like the model's
    Resize), each with a Perlin defect pasted on a copy; images in [0, 1], masks ``(N, 1, H, W)`` in {0, 1}."""
    import torch
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    datamodule.setup()
    data = datamodule.test_data
    rows = [i for i, y in enumerate(data.samples.label_index) if int(y) == 0]
    if not rows:
        msg = "rb_ae_perception needs normal images in the test split for the synthetic set."
        raise ValueError(msg)
    torch.manual_seed(seed)
    generator = PerlinAnomalyGenerator(probability=1.0)
    clean, defective, masks = per_class.perlin_defects(data, rows, count, size, seed, generator)
    return clean, defective, masks.float()


def encoder_residuals(net, images):
    """``(P, [1 − cos(E_s(x), E_s(x̂))] per scale, score)`` of [0, 1] images, in eval mode without gradients."""
    import torch
    from torch.nn import functional as F

    with torch.no_grad():
        out = net(images)
        reconstruction, features = net.reconstruct(images)
        rec_features = net.encode(reconstruction)
        residuals = [
            1 - F.cosine_similarity(f, r, dim=1, eps=1e-8).unsqueeze(1)
            for f, r in zip(features, rec_features, strict=True)
        ]
    return out.anomaly_map, residuals, out.pred_score


def perceived_cosines(net, clean, defective, masks) -> dict[str, float]:
    """Mean ``cos(E_s(x_a), E_s(x))`` over the cells the perception loss calls defective / normal, mean over the scales
    that have such cells."""
    import torch
    from torch.nn import functional as F

    from anomalib_recon.models.image.rb_ae.loss import mask_coverage

    with torch.no_grad():
        clean_maps, defective_maps = net.encode(clean), net.encode(defective)
    defect_means, normal_means = [], []
    for c, d in zip(clean_maps, defective_maps, strict=True):
        cos = F.cosine_similarity(d, c, dim=1, eps=1e-8).unsqueeze(1)
        coverage = mask_coverage(masks, cos.shape[-2:])
        for means, cells in ((defect_means, coverage >= 0.5), (normal_means, coverage == 0)):
            means.append(float(cos[cells].mean()) if bool(cells.any()) else float("nan"))  # a scale may have none
    return {
        "cos_defect": float(torch.tensor(defect_means).nanmean()),
        "cos_normal": float(torch.tensor(normal_means).nanmean()),
    }


def score_sets(model, datamodule, synthetic_images: int = 64, synthetic_seed: int = 0) -> dict[str, dict]:
    """``{"real": {...}, "synthetic": {...}}``: pixel AUROC of the map and of the encoder residuals per set."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    net = model.model

    def collect(batches) -> tuple[dict[str, list], list, list, list]:
        maps: dict[str, list] = {}
        masks, scores, labels = [], [], []
        for images, mask, image_label in batches:
            size = images.shape[-2:]
            anomaly_map, residuals, score = encoder_residuals(net, images)
            ups = [F.interpolate(r, size=size, mode="bilinear", align_corners=False) for r in residuals]
            parts = {"map": anomaly_map} | {f"enc_s{k}": u for k, u in enumerate(ups)}
            parts["enc"] = torch.stack(ups).mean(0)
            for part, value in parts.items():
                maps.setdefault(part, []).append(value.flatten())
            masks.append(mask.reshape(-1) > 0.5)
            scores.append(score)
            labels.append(image_label)
        return maps, masks, scores, labels

    def aurocs(maps: dict[str, list], masks: list) -> dict[str, float]:
        truth = torch.cat(masks).numpy()
        if not 0 < truth.sum() < truth.size:
            msg = "rb_ae_perception needs masks with both normal and defective pixels (Magnetic Tile, a masked folder)."
            raise ValueError(msg)
        return {f"{k}_AUROC": round(float(roc_auc_score(truth, torch.cat(v).numpy())), 4) for k, v in maps.items()}

    real_batches = (
        (images, gt_mask, batch.gt_label)
        for images, gt_mask, batch in per_class.harness_test_batches(model, datamodule)
    )
    maps, masks, scores, labels = collect(real_batches)
    real = {"image_AUROC": round(float(roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())), 4)}
    real |= aurocs(maps, masks)

    clean, defective, synthetic_masks = synthetic_set(datamodule, net.image_size, synthetic_images, synthetic_seed)
    batches = [
        (defective[i : i + 8], synthetic_masks[i : i + 8], torch.ones(len(defective[i : i + 8])))
        for i in range(0, len(defective), 8)
    ]
    maps, masks, _, _ = collect(batches)
    synthetic = aurocs(maps, masks) | {
        k: round(v, 4) for k, v in perceived_cosines(net, clean, defective, synthetic_masks).items()
    }
    synthetic["copy"] = round(copied_fraction(net, clean, defective, synthetic_masks), 4)
    return {"real": real, "synthetic": synthetic}


def copied_fraction(net, clean, defective, masks, batch_size: int = 8) -> float:
    """How much of a pasted defect reaches the reconstruction: ``Σ_mask |x̂(x_a) − x̂(x)| / Σ_mask |x_a − x|`` (channel
    sums; 0 = the defect is repaired away, 1 = it is reproduced as much as it changed the image)."""
    import torch

    moved = changed = 0.0
    with torch.no_grad():
        for i in range(0, len(clean), batch_size):
            x, x_a, m = clean[i : i + batch_size], defective[i : i + batch_size], masks[i : i + batch_size]
            recon_a, _ = net.reconstruct(x_a)
            recon, _ = net.reconstruct(x)
            moved += float(((recon_a - recon).abs().sum(1, keepdim=True) * m).sum())
            changed += float(((x_a - x).abs().sum(1, keepdim=True) * m).sum())
    return moved / changed if changed > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Score every checkpoint; write ``results/<name>.json`` and ``.md``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)

    rows = []
    for name, model in per_class.load_checkpoints("RBAE", args):
        sets = score_sets(model, harness.build_datamodule(args), args.synthetic_images, args.synthetic_seed)
        weight = float(model.perception_loss_weight)
        rows.append({"checkpoint": name, "perception_loss_weight": weight, "use_rbam": model.model.use_rbam})
        rows[-1] |= {f"real_{k}": v for k, v in sets["real"].items()}
        rows[-1] |= {f"synthetic_{k}": v for k, v in sets["synthetic"].items()}
        print(rows[-1], flush=True)
    keys = ["checkpoint", "perception_loss_weight", "use_rbam"]
    sections = [
        (
            "Real test split (pixel AUROC of the model's map and of the encoder residual 1 - cos(E_s(x), E_s(x^)) "
            "per scale s0-s3 = strides 4-32 and their mean; image AUROC of the model's score):",
            keys + [k for k in rows[0] if k.startswith("real_")],
        ),
        (
            "Synthetic Perlin defects on normal test images (same pixel AUROCs; cos_defect / cos_normal = mean "
            "cos(E_s(x_a), E_s(x)) on the cells the perception loss calls defective / normal; copy = the share of the "
            "defect's pixel change that reaches the reconstruction):",
            keys + [k for k in rows[0] if k.startswith("synthetic_")],
        ),
    ]
    extra = {"synthetic_images": args.synthetic_images, "synthetic_seed": args.synthetic_seed}
    per_class.write_checkpoint_tables("rb_ae_perception.py", argv, args, rows, sections, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
