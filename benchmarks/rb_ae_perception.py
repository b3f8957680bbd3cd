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
  over the cells the loss calls defective (mask coverage >= 0.5) and normal (coverage 0), averaged over scales.

Example (the checkpoints of ``benchmarks/studies/rb_ae_mt_lite0_128_300steps_ablation.yaml``)::

    python benchmarks/rb_ae_perception.py --ckpts /tmp/anomalib_recon_study/rb_ae_mt_lite0_128_300steps_ablation/\
seed*/*/RBAE/RBAE/magnetic_tile/v0/weights/lightning/model.ckpt --name rb_ae_perception_mt_lite0_128_300steps
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
from pnpt_maps import label


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (data settings as the harness's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpts", nargs="+", required=True, help="RB-AE checkpoints (the harness's model.ckpt files)")
    p.add_argument("--dataset", choices=["magnetic_tile", "folder"], default="magnetic_tile", help="needs masks")
    p.add_argument("--data-root", default=None, help="magnetic_tile: optional; folder: an MVTec-style category")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="as the harness run (a folder's split)")
    p.add_argument("--synthetic-images", type=int, default=64, help="normal test images that get a Perlin defect")
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="rb_ae_perception")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    return p.parse_args(argv)


def synthetic_set(datamodule, size: tuple[int, int], count: int, seed: int):
    """``(clean, defective, masks)``: up to ``count`` normal test images (seeded draw, resized like the model's
    Resize), each with a Perlin defect pasted on a copy; images in [0, 1], masks ``(N, 1, H, W)`` in {0, 1}."""
    import torch
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from torchvision.transforms.v2.functional import resize

    datamodule.setup()
    data = datamodule.test_data
    rows = [i for i, y in enumerate(data.samples.label_index) if int(y) == 0]
    if not rows:
        msg = "rb_ae_perception needs normal images in the test split for the synthetic set."
        raise ValueError(msg)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()[:count]
    clean = torch.stack([resize(data[rows[i]].image, list(size), antialias=False) for i in order]).clamp(0, 1)
    torch.manual_seed(seed)
    generator = PerlinAnomalyGenerator(probability=1.0)
    defective, masks = [], []
    for image in clean:
        augmented, mask = generator(image)
        defective.append(augmented.clamp(0, 1))
        masks.append((mask.reshape(1, *size) > 0.5).float())
    return clean, torch.stack(defective), torch.stack(masks)


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
    """Mean ``cos(E_s(x_a), E_s(x))`` over the cells the perception loss calls defective / normal, mean over scales."""
    import torch
    from torch.nn import functional as F

    from anomalib_recon.models.image.rb_ae.loss import mask_coverage

    with torch.no_grad():
        clean_maps, defective_maps = net.encode(clean), net.encode(defective)
    defect_means, normal_means = [], []
    for c, d in zip(clean_maps, defective_maps, strict=True):
        cos = F.cosine_similarity(d, c, dim=1, eps=1e-8).unsqueeze(1)
        coverage = mask_coverage(masks, cos.shape[-2:])
        defect_means.append(float(cos[coverage >= 0.5].mean()) if bool((coverage >= 0.5).any()) else float("nan"))
        normal_means.append(float(cos[coverage == 0].mean()))
    return {
        "cos_defect": float(torch.tensor(defect_means).nanmean()),
        "cos_normal": float(torch.tensor(normal_means).mean()),
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
    return {"real": real, "synthetic": synthetic}


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
            model="RBAE", ckpt=ckpt, backbone="tf_efficientnet_lite0", image_size=args.image_size, init_args={}
        )
        model = per_class.load_model(load_args)
        sets = score_sets(model, harness.build_datamodule(args), args.synthetic_images, args.synthetic_seed)
        weight = float(model.perception_loss_weight)
        rows.append({"checkpoint": label(ckpt), "perception_loss_weight": weight, "use_rbam": model.model.use_rbam})
        rows[-1] |= {f"real_{k}": v for k, v in sets["real"].items()}
        rows[-1] |= {f"synthetic_{k}": v for k, v in sets["synthetic"].items()}
        print(rows[-1], flush=True)
    header = {
        "name": args.name,
        "command": "python benchmarks/rb_ae_perception.py " + " ".join(shlex.quote(a) for a in argv),
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "image_size": args.image_size,
        "synthetic_images": args.synthetic_images,
        "synthetic_seed": args.synthetic_seed,
    }

    def render(rows: list[dict], header: dict) -> str:
        keys = ["checkpoint", "perception_loss_weight", "use_rbam"]
        real = keys + [k for k in rows[0] if k.startswith("real_")]
        synthetic = keys + [k for k in rows[0] if k.startswith("synthetic_")]
        return "\n".join(
            [
                *harness.result_preamble(header),
                "",
                "Real test split (pixel AUROC of the model's map and of the encoder residual 1 - cos(E_s(x), E_s(x^)) "
                "per scale s0-s3 = strides 4-32 and their mean; image AUROC of the model's score):",
                "",
                *harness.markdown_table(real, rows),
                "",
                "Synthetic Perlin defects on normal test images (same pixel AUROCs; cos_defect / cos_normal = mean "
                "cos(E_s(x_a), E_s(x)) on the cells the perception loss calls defective / normal):",
                "",
                *harness.markdown_table(synthetic, rows),
                "",
            ]
        )

    harness.write_results(Path(args.results_dir), header, rows, render=render)
    print(render(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
