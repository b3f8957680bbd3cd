"""PNPT identical-shortcut test: do the reconstructions reproduce synthetic anomalies, with and without prompts?

A reconstruction model trained on many classes can learn the "identical shortcut": it reconstructs whatever it is
given, anomalies included, so the residual no longer shows them. This script pastes Perlin anomalies (anomalib's
``PerlinAnomalyGenerator``, probability 1, seeded) onto normal test images of every category and measures, for each
checkpoint and each reconstruction stream (PNPT with prompts: the sample stream ``R^x``, the prompt stream ``R^p`` and
their mean, the model's map; without prompts: ``R^x`` only):

* ``contrast``: mean residual ``1 − cos(f, R)`` inside the anomaly over the mean outside (summed over scales,
  upsampled, no blur; pooled over images). 1 = the anomaly is invisible in the residual.
* ``leak``: how much of the anomaly's feature change reaches the reconstruction, per scale
  ``Σ_mask |R(x_a) − R(x)| / Σ_mask |f(x_a) − f(x)|`` (channel sums, mask area-weighted at the scale's resolution),
  averaged over scales. 0 = the reconstruction ignores the anomaly, 1 = it copies it (the identical shortcut).
* ``pixel_AUROC`` of the stream's map against the synthetic masks, ``image_AUROC`` of its blurred maximum on the
  anomalous vs the same normal images.

Each image is scored as at test time (class inferred from the image); the inferred class of normal and anomalous
images is recorded. The checkpoints come from ``pnpt_multiclass.py --save-checkpoints DIR`` (or any PNPT ``.ckpt``).

Example::

    python benchmarks/pnpt_shortcut.py --ckpt class=/tmp/pnpt_ckpt/seed0/class.ckpt \
        --ckpt none=/tmp/pnpt_ckpt/seed0/none.ckpt --images-per-category 32 --threads 1 \
        --name pnpt_shortcut_multiclass_lite0_128_900steps_seed0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import per_class
from pnpt_multiclass import CATEGORIES, build_multi_datamodule

STREAMS = ("both", "sample", "prompt")


def synthetic_pairs(datamodule, categories: list[str], per_category: int, size: tuple[int, int], seed: int):
    """``{category: (normal images, anomalous images, masks)}``: normal test images resized like the models' Resize
    (non-antialiased), Perlin anomalies pasted on copies of them (``[0, 1]`` images, masks ``(N, 1, H, W)`` bool)."""
    import torch
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    torch.manual_seed(seed)
    generator = PerlinAnomalyGenerator(probability=1.0)
    samples = datamodule.test_data.samples
    pairs = {}
    for category in categories:
        labels = zip(samples.category, samples.label_index, strict=True)
        rows = [i for i, (c, y) in enumerate(labels) if c == category and int(y) == 0]
        pairs[category] = per_class.perlin_defects(datamodule.test_data, rows, per_category, size, seed, generator)
    return pairs


def stream_maps(net, images, size):
    """Per stream: summed upsampled residual maps (no blur), the model's blurred map, inferred classes, outputs."""
    import torch
    from torch.nn import functional as F

    with torch.no_grad():
        out = net.reconstruction_outputs(images)
        sample, prompt = net.stream_residuals(out)
        classes = net.infer_class(out.features) if net.prompt_pool is not None else None

    def up(maps):
        return sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)

    maps = {"sample": up(sample)}
    if prompt is not None:
        maps["prompt"] = up(prompt)
        maps["both"] = 0.5 * (maps["sample"] + maps["prompt"])
    return maps, classes, out


def leak(out_n, out_a, masks, stream: str) -> list[float]:
    """Per scale: ``Σ_mask |R(x_a) − R(x)| / Σ_mask |f(x_a) − f(x)|``, the mask area-weighted at the scale's size."""
    from torch.nn import functional as F

    values = []
    recons = {"sample": (out_n.sample, out_a.sample), "prompt": (out_n.prompt, out_a.prompt)}
    for s, (f_n, f_a) in enumerate(zip(out_n.features, out_a.features, strict=True)):
        weight = F.interpolate(masks.float(), size=f_n.shape[-2:], mode="area")
        if stream == "both":
            r_n = 0.5 * (recons["sample"][0][s] + recons["prompt"][0][s])
            r_a = 0.5 * (recons["sample"][1][s] + recons["prompt"][1][s])
        else:
            r_n, r_a = recons[stream][0][s], recons[stream][1][s]
        moved = float(((r_a - r_n).abs().sum(dim=1, keepdim=True) * weight).sum())
        change = float(((f_a - f_n).abs().sum(dim=1, keepdim=True) * weight).sum())
        values.append(moved / change if change > 0 else float("nan"))
    return values


def evaluate(label: str, path: str, pairs: dict, datamodule=None, blur_scores: bool = True) -> list[dict]:
    """Rows of one checkpoint: one per stream, pooled over categories (per-category values in ``per_category``)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    from anomalib_recon.components.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from anomalib_recon.models import PNPT

    model = PNPT.load_from_checkpoint(path, weights_only=True).eval()
    net = model.model
    size = net.image_size
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    collected: dict[str, dict[str, list]] = {}
    inference = {}
    for category, (normal, anomalous, masks) in pairs.items():
        maps_n, classes_n, out_n = stream_maps(net, (normal - mean) / std, size)
        maps_a, classes_a, out_a = stream_maps(net, (anomalous - mean) / std, size)
        if classes_n is not None:
            names = net.class_names
            truth = names.index(category) if category in names else -1
            inference[category] = {
                "normal": float((classes_n == truth).float().mean()),
                "anomalous": float((classes_a == truth).float().mean()),
            }
        for stream in maps_a:
            entry = collected.setdefault(stream, {"cat": [], "a": [], "n": [], "m": [], "leak": []})
            entry["cat"].append(category)
            entry["a"].append(maps_a[stream])
            entry["n"].append(maps_n[stream])
            entry["m"].append(masks)
            entry["leak"].append(leak(out_n, out_a, masks, stream))
    real = real_test_metrics(net, datamodule, list(pairs)) if datamodule is not None else {}
    rows = []
    for stream in (s for s in STREAMS if s in collected):
        entry = collected[stream]

        def metrics(a, n, m, lk):
            blurred_a = net.blur(a) if (blur_scores and net.blur is not None) else a
            blurred_n = net.blur(n) if (blur_scores and net.blur is not None) else n
            scores = torch.cat([blurred_n.flatten(1).amax(1), blurred_a.flatten(1).amax(1)])
            labels = torch.cat([torch.zeros(len(n)), torch.ones(len(a))]).long()
            return {
                "contrast": float(a[m].mean() / a[~m].mean()),
                "inside": float(a[m].mean()),
                "outside": float(a[~m].mean()),
                "normal_mean": float(n.mean()),
                "pixel_AUROC": float(binary_auroc(a.flatten(), m.flatten().long())),
                "image_AUROC": float(binary_auroc(scores, labels)),
                "leak": float(torch.tensor(lk).nanmean()),
                "leak_per_scale": [round(v, 4) for v in lk],
            }

        per_category = {
            c: metrics(a, n, m, lk)
            for c, a, n, m, lk in zip(entry["cat"], entry["a"], entry["n"], entry["m"], entry["leak"], strict=True)
        }
        pooled_leak = torch.tensor(entry["leak"]).nanmean(dim=0).tolist()
        pooled = metrics(torch.cat(entry["a"]), torch.cat(entry["n"]), torch.cat(entry["m"]), pooled_leak)
        rows.append(
            {
                "model": f"{label} ({stream})",
                "checkpoint": label,
                "stream": stream,
                "prompts": net.prompts,
                **pooled,
                "per_category": per_category,
                "real_test": real.get(stream, {}),
                "class_inference": inference,
            }
        )
    return rows


def real_test_metrics(net, datamodule, categories: list[str], batch_size: int = 16) -> dict:
    """Per stream and category on the real test set: image AUROC (blurred map maximum) and pixel AUROC (blurred map,
    where the category has masks). Classes inferred as at test time."""
    import torch
    from torchmetrics.functional.classification import binary_auroc
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    from anomalib_recon.components.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    size = net.image_size
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    samples = datamodule.test_data.samples
    results: dict[str, dict[str, dict[str, float]]] = {}
    for category in categories:
        rows = [i for i, c in enumerate(samples.category) if c == category]
        scores: dict[str, list] = {}
        pixels: dict[str, list] = {}
        labels, masks = [], []
        for start in range(0, len(rows), batch_size):
            items = [datamodule.test_data[i] for i in rows[start : start + batch_size]]
            images = torch.stack([resize(it.image, list(size), antialias=False) for it in items])
            labels.append(torch.tensor([int(it.gt_label) for it in items]))
            if all(it.gt_mask is not None for it in items):
                masks.append(
                    torch.stack(
                        [
                            resize(it.gt_mask.reshape(1, *it.gt_mask.shape[-2:]).float(), list(size),
                                   interpolation=InterpolationMode.NEAREST) > 0.5
                            for it in items
                        ]
                    )
                )  # fmt: skip
            maps, _, _ = stream_maps(net, (images - mean) / std, size)
            for stream, amap in maps.items():
                blurred = net.blur(amap) if net.blur is not None else amap
                scores.setdefault(stream, []).append(blurred.flatten(1).amax(1))
                pixels.setdefault(stream, []).append(blurred)
        truth = torch.cat(labels)
        for stream in scores:
            entry = {"image_AUROC": float(binary_auroc(torch.cat(scores[stream]), truth))}
            if masks and len(masks) == len(pixels[stream]):
                mask = torch.cat(masks)
                entry["pixel_AUROC"] = float(binary_auroc(torch.cat(pixels[stream]).flatten(), mask.flatten().long()))
            results.setdefault(stream, {})[category] = entry
    return results


def to_markdown(rows: list[dict], header: dict) -> str:
    """Pooled metrics per checkpoint and stream, then per-category contrast and leak (and the real test sets)."""
    cols = ["model", "contrast", "leak", "pixel_AUROC", "image_AUROC", "inside", "outside"]

    def cell(row: dict, col: str) -> str:
        value = row.get(col, "")
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cats = header["categories"]
    per_cat_cols = ["model", *(f"{c} contrast / leak / pixel AUROC" for c in cats)]
    per_cat_rows = [
        {
            "model": r["model"],
            **{
                f"{c} contrast / leak / pixel AUROC": "{contrast:.3f} / {leak:.3f} / {pixel_AUROC:.3f}".format(
                    **r["per_category"][c]
                )
                for c in cats
                if c in r["per_category"]
            },
        }
        for r in rows
    ]
    lines = [
        *harness.result_preamble(header),
        "",
        f"Perlin anomalies (anomalib PerlinAnomalyGenerator, probability 1, seed {header['seed']}) pasted on "
        f"{header['images_per_category']} normal test images per category ({', '.join(cats)}), at each model's "
        "input size. `contrast` = mean residual inside / outside the anomaly (1: invisible); `leak` = share of the "
        "anomaly's feature change that reaches the reconstruction (0: ignored, 1: copied — the identical shortcut), "
        "mean over scales; `pixel_AUROC` on the synthetic masks; `image_AUROC` anomalous vs the same normal images "
        "(blurred map maximum). Classes inferred from the images as at test time.",
        "",
        *harness.markdown_table(cols, rows, cell),
        "",
        "Per category (synthetic anomalies):",
        "",
        *harness.markdown_table(per_cat_cols, per_cat_rows),
    ]
    if any(r.get("real_test") for r in rows):
        real_cols = ["model", *(f"{c} image / pixel AUROC" for c in cats)]
        real_rows = [
            {
                "model": r["model"],
                **{
                    f"{c} image / pixel AUROC": " / ".join(
                        f"{r['real_test'][c][k]:.3f}" for k in ("image_AUROC", "pixel_AUROC") if k in r["real_test"][c]
                    )
                    for c in cats
                    if c in r.get("real_test", {})
                },
            }
            for r in rows
        ]
        lines += [
            "",
            "Real test sets, each stream's blurred map (image score: its maximum):",
            "",
            *harness.markdown_table(real_cols, real_rows),
        ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", required=True, help="LABEL=PATH of a PNPT checkpoint (repeat)")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    p.add_argument("--images-per-category", type=int, default=32)
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0, help="Perlin draws and the choice of images (and the ELPV split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--real-test", action="store_true", help="also score each stream on the real test sets")
    p.add_argument("--name", default="pnpt_shortcut")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load each checkpoint, score the same synthetic pairs, write JSON + markdown."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    checkpoints = []
    for item in args.ckpt:
        label, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            msg = f"--ckpt {item!r}: give LABEL=PATH of an existing checkpoint."
            raise SystemExit(msg)
        checkpoints.append((label, path))
    from anomalib_recon.models import PNPT

    size = PNPT.load_from_checkpoint(checkpoints[0][1], weights_only=True).model.image_size
    data_args = argparse.Namespace(
        categories=args.categories, data_root=args.data_root, workers=0, batch_size=8, seed=args.seed
    )
    datamodule = build_multi_datamodule(data_args)
    datamodule.setup()
    pairs = synthetic_pairs(datamodule, list(args.categories), args.images_per_category, size, args.seed)
    header = {
        "name": args.name,
        "command": "python benchmarks/pnpt_shortcut.py " + " ".join(shlex.quote(a) for a in argv),
        "machine": harness.machine_info(),
        "dataset": "multi_category_synthetic",
        "categories": list(args.categories),
        "images_per_category": args.images_per_category,
        "seed": args.seed,
        "checkpoints": dict(checkpoints),
    }
    rows = []
    for label, path in checkpoints:
        rows += evaluate(label, path, pairs, datamodule if args.real_test else None)
        print(json.dumps([{k: v for k, v in r.items() if k not in ("per_category",)} for r in rows[-3:]]), flush=True)
        table = harness.write_results(Path(args.results_dir), header, rows, render=to_markdown)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
