"""LGFDR: where does the selective reconstruction head (SRH) trust the local tower, where the global one?

For a trained LGFDR checkpoint (both towers, ``srh_mode="spatial"``) this script runs the test split of Magnetic Tile
(or ELPV) through the torch model and

* draws, for the most visible defect of each defect class (largest mask), the image, its mask, the anomaly map, the
  SRH gate ``w_l`` (the local tower's weight per position; ``1 − w_l`` goes to the global tower) and the squared
  residuals of each tower alone, into one PNG;
* measures on every test image (the harness's test inputs: each image resized by the model's pre-processor before
  collating, as under ``Engine.test``) the mean gate inside and outside the defect masks and on normal images, and the
  pixel / image AUROC of the maps built from the fused reconstruction ``R`` (the model's map), from ``R_l`` alone and
  from ``R_g`` alone (same weights, same blur and score; raw outputs, no post-processor).

Results: ``<results-dir>/<name>.png``, ``.json`` and ``.md`` (the harness's writer, with the command and machine)::

    python benchmarks/lgfdr_gate_maps.py --ckpt <LGFDR checkpoint> --dataset magnetic_tile --name lgfdr_srh_gate_mt
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import per_class  # noqa: E402
from harness import RESULTS, build_datamodule, machine_info, markdown_table, result_preamble, write_results  # noqa: E402


def tower_maps(net, details, size: tuple[int, int]) -> dict:
    """Anomaly maps and scores of the fused reconstruction and of each tower alone (the model's map and score rule)."""
    out = {}
    for name, recon in (("fused", details.reconstruction), ("local", details.local), ("global", details.global_)):
        amap = net.anomaly_map_generator([details.features], [recon], out_size=size)
        out[name] = (amap, net.score(amap))
    return out


def auroc(scores, labels) -> float:
    """Area under the ROC curve (NaN when one class is missing)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def collect(model, datamodule, max_pixels: int, seed: int) -> tuple[dict, list[dict]]:
    """Gate statistics and per-tower AUROCs over the test split; the defect examples for the figure."""
    import numpy as np
    import torch

    net = model.model.eval()
    rng = np.random.default_rng(seed)
    gate_sums = {"defect": [0.0, 0], "defect_image_background": [0.0, 0], "normal_image": [0.0, 0]}
    scores = {k: [] for k in ("fused", "local", "global")}
    pixel_scores = {k: [] for k in scores}
    pixel_labels, labels, examples = [], [], {}
    with torch.no_grad():
        for images, masks, batch in per_class.harness_test_batches(model, datamodule):
            has_mask = masks is not None
            details = net.details(images)
            size = tuple(images.shape[-2:])
            maps = tower_maps(net, details, size)
            gate = torch.nn.functional.interpolate(details.gate, size=size, mode="bilinear", align_corners=False)
            for name, (_, score) in maps.items():
                scores[name] += score.tolist()
            labels += batch.gt_label.int().tolist()
            for i in range(images.shape[0]):
                g = gate[i, 0]
                if int(batch.gt_label[i]) == 0:
                    gate_sums["normal_image"][0] += float(g.sum())
                    gate_sums["normal_image"][1] += g.numel()
                elif has_mask:
                    m = masks[i].reshape(g.shape).bool()
                    gate_sums["defect"][0] += float(g[m].sum())
                    gate_sums["defect"][1] += int(m.sum())
                    gate_sums["defect_image_background"][0] += float(g[~m].sum())
                    gate_sums["defect_image_background"][1] += int((~m).sum())
                if has_mask:
                    flat = masks[i].reshape(-1).numpy().astype(np.int8)
                    take = rng.choice(flat.size, size=min(max_pixels, flat.size), replace=False)
                    pixel_labels.append(flat[take])
                    for name, (amap, _) in maps.items():
                        pixel_scores[name].append(amap[i].reshape(-1).numpy()[take])
                if int(batch.gt_label[i]) == 1:
                    cls = Path(batch.image_path[i]).parent.name
                    area = float(masks[i].sum()) if has_mask else float(maps["fused"][1][i])
                    if cls not in examples or area > examples[cls]["area"]:
                        examples[cls] = {
                            "class": cls,
                            "area": area,
                            "path": str(batch.image_path[i]),
                            "image": batch.image[i] if batch.image.shape[-2:] == size else images[i],
                            "raw": batch.image.shape[-2:] == size,
                            "mask": masks[i].reshape(size) if has_mask else None,
                            "map": maps["fused"][0][i, 0],
                            "gate": gate[i, 0],
                            "local": maps["local"][0][i, 0],
                            "global": maps["global"][0][i, 0],
                        }
    labels_np = np.array(labels)
    stats = {
        "mean_gate": {k: (s / n if n else float("nan")) for k, (s, n) in gate_sums.items()},
        "image_AUROC": {k: auroc(np.array(v), labels_np) for k, v in scores.items()},
    }
    if pixel_labels:
        pl = np.concatenate(pixel_labels)
        stats["pixel_AUROC"] = {k: auroc(np.concatenate(v), pl) for k, v in pixel_scores.items()}
        stats["pixels_sampled"] = int(pl.size)
    return stats, sorted(examples.values(), key=lambda e: e["class"])


def draw(examples: list[dict], path: Path, mean: list[float], std: list[float]) -> None:
    """One row per defect class: image, mask, anomaly map, SRH gate w_l, local and global residual maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    columns = ["image", "mask", "anomaly map (fused R)", "SRH gate w_l (local weight)", "local tower R_l", "global R_g"]
    fig, axes = plt.subplots(len(examples), len(columns), figsize=(2.2 * len(columns), 2.3 * len(examples)))
    axes = axes.reshape(len(examples), len(columns))
    for row, ex in enumerate(examples):
        image = ex["image"]
        if not ex["raw"]:  # pre-processed: undo the ImageNet normalisation for display
            image = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        top = max(float(ex["map"].max()), float(ex["local"].max()), float(ex["global"].max()))
        panels = [
            (image.permute(1, 2, 0).clamp(0, 1).numpy(), {}),
            (ex["mask"].numpy() if ex["mask"] is not None else None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
            (ex["map"].numpy(), {"cmap": "jet", "vmin": 0, "vmax": top}),
            (ex["gate"].numpy(), {"cmap": "coolwarm", "vmin": 0, "vmax": 1}),
            (ex["local"].numpy(), {"cmap": "jet", "vmin": 0, "vmax": top}),
            (ex["global"].numpy(), {"cmap": "jet", "vmin": 0, "vmax": top}),
        ]
        for col, (data, kwargs) in enumerate(panels):
            ax = axes[row, col]
            ax.axis("off")
            if data is None:
                continue
            im = ax.imshow(data, **kwargs)
            if col == 3:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
        axes[row, 0].text(-8, image.shape[-2] / 2, ex["class"], rotation=90, va="center", ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as drawn:  # a 128-colour palette keeps the committed figure small (~0.3 MB, not 0.8)
        palette = drawn.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def render(rows: list[dict], header: dict) -> str:
    """The statistics as markdown."""
    stats = header["stats"]
    lines = [
        *result_preamble(header),
        "",
        f"Checkpoint `{header['ckpt']}` (LGFDR, both towers, spatial SRH); dataset {header['dataset']}, "
        f"{header['image_size']} px; test split; raw torch outputs. Figure: `{header['figure']}`.",
        "",
        "Mean SRH gate w_l (weight of the local tower; 1 − w_l goes to the global tower):",
        "",
        *markdown_table(
            ["where", "mean w_l"], [{"where": k, "mean w_l": f"{v:.3f}"} for k, v in stats["mean_gate"].items()]
        ),
        "",
        "The map and score rule applied to each reconstruction (same weights):",
        "",
        *markdown_table(["reconstruction", "image_AUROC", "pixel_AUROC"], rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Load, measure, draw, write."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="an LGFDR checkpoint trained with towers='both', srh_mode='spatial'")
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder"], default="magnetic_tile")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=4096, help="pixels sampled per image for the pixel AUROC")
    p.add_argument("--name", default="lgfdr_srh_gate_mt")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch

    from anomalib_recon.components.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from anomalib_recon.models import LGFDR

    torch.set_num_threads(args.threads)
    model = LGFDR.load_from_checkpoint(args.ckpt, weights_only=True, map_location="cpu").eval()
    if model.model.srh is None or model.model.srh.mode != "spatial":
        msg = "the checkpoint must hold both towers and the spatial SRH (towers='both', srh_mode='spatial')."
        raise SystemExit(msg)
    args.image_size = int(model.input_size[0])
    datamodule = build_datamodule(args)
    stats, examples = collect(model, datamodule, args.max_pixels, args.seed)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    figure = results / f"{args.name}.png"
    draw(examples, figure, list(IMAGENET_MEAN), list(IMAGENET_STD))
    raw = list(sys.argv[1:] if argv is None else argv)
    header = {
        "name": args.name,
        "command": "python benchmarks/lgfdr_gate_maps.py " + " ".join(shlex.quote(a) for a in raw),
        "machine": machine_info(),
        "dataset": args.dataset,
        "image_size": args.image_size,
        "ckpt": args.ckpt,
        "figure": figure.name,
        "examples": [{"class": e["class"], "path": e["path"]} for e in examples],
        "stats": stats,
    }
    rows = [
        {
            "reconstruction": name,
            "image_AUROC": f"{stats['image_AUROC'][name]:.4f}",
            "pixel_AUROC": f"{stats.get('pixel_AUROC', {}).get(name, float('nan')):.4f}",
        }
        for name in ("fused", "local", "global")
    ]
    print(write_results(results, header, rows, render=render))
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
