"""Per-defect-class image AUROC of a trained checkpoint, for several image scores computed from its anomaly maps.

Answers "which defects does a model miss, and would another image score help?". The inputs are exactly the
harness's: its datamodule (``harness.build_datamodule``, same dataset, batch size and seed) resizing each image with
the model's ``Resize`` before collating, as anomalib's datamodules do under ``Engine`` (not anomalib's collate, which
resizes a batch of mixed-size images to its largest member), and the model as the harness builds it
(``harness.build_model``: the same pre-processor), which then transforms each batch as ``PreProcessor`` does in
``Engine.test``. Each defect class is scored against all good images with scikit-learn,
for the model's own ``pred_score`` and for scores reduced from its raw maps (std, max, top-1 % mean, max of the
5×5 average-pooled map). Pixel AUROC (where the dataset has masks) is computed on the maps with the
pre-processed masks (nearest-resized if a map is smaller than the input), in all and by defect size: the masks'
connected components (8-connected) split at the quartiles of their area, each quarter's defect pixels scored against
every normal pixel, with the mean map on those pixels over the mean on normal pixels ("does a model lose the large
defects or the small ones?").

Example (the checkpoint of a harness run with the same ``--image-size``/``--batch-size``/``--seed``)::

    python benchmarks/per_class.py --model AMINet --ckpt /tmp/exp/ami/model.ckpt --image-size 128
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

SKIP_ARGS = {"evaluator", "pre_processor", "post_processor", "visualizer"}


def image_scores(maps, pred_score) -> dict:
    """The model's own score and four reductions of its ``(B, H, W)`` maps."""
    import torch

    flat = maps.flatten(1)
    k = max(1, flat.shape[1] // 100)
    pooled = torch.nn.functional.avg_pool2d(maps.unsqueeze(1), 5, 1, 2).flatten(1)
    return {
        "model": pred_score,
        "std": flat.std(1),
        "max": flat.max(1).values,
        "top1%": flat.topk(k, 1).values.mean(1),
        "max_avgpool5": pooled.max(1).values,
    }


def pixel_auroc_by_size(maps, masks) -> list[dict]:
    """Pixel AUROC and mean-map ratio of the defect pixels of each quarter of the defects by area, vs normal pixels.

    ``maps`` and ``masks`` are ``(N, H, W)`` arrays; a defect is a connected component (8-connected) of a mask. Each
    row scores its defect pixels against every normal pixel (``pixel_AUROC``, ``map_ratio``: mean map on the defect
    pixels / mean on the normal ones) and against the pixels of defect-free images only
    (``AUROC_vs_good_images``): where the two part, the normal pixels *of defective images* (around the defects)
    are what the map gets wrong. A last row, ``all``, scores every defect pixel.
    """
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    areas, ids = [], np.zeros(masks.shape, np.int64)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labelled.ravel())[1:]
            ids[i] = np.where(labelled > 0, labelled + len(areas), 0)
            areas += sizes.tolist()
    if not areas:
        return []
    areas = np.asarray(areas)
    edges = np.quantile(areas, [0.25, 0.5, 0.75])
    quarter = np.concatenate([[-1], np.searchsorted(edges, areas, side="left")])  # component id -> quarter 0..3
    pixel_quarter = quarter[ids]
    normal = maps[~masks]
    good_images = ~masks.reshape(len(masks), -1).any(1)
    good = maps[good_images].ravel()

    def auroc(defect, negatives) -> float | None:
        if not len(negatives):
            return None
        truth = np.concatenate([np.ones(len(defect), bool), np.zeros(len(negatives), bool)])
        return round(float(roc_auc_score(truth, np.concatenate([defect, negatives]))), 4)

    rows = []
    for q, name in ((0, "Q1"), (1, "Q2"), (2, "Q3"), (3, "Q4"), (None, "all")):
        members = areas if q is None else areas[quarter[1:] == q]
        if not len(members):
            continue
        defect = maps[masks] if q is None else maps[masks & (pixel_quarter == q)]
        rows.append(
            {
                "defects by area": name,
                "n": len(members),
                "area_px": f"{int(members.min())}-{int(members.max())}",
                "pixel_AUROC": auroc(defect, normal),
                "map_ratio": round(float(defect.mean() / normal.mean()), 3),
                "AUROC_vs_good_images": auroc(defect, good),
            }
        )
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the data settings are the harness's, with its defaults)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder"], default="magnetic_tile")
    p.add_argument("--data-root", default=None, help="dataset folder (magnetic_tile: optional; folder: required)")
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="as the harness run (the checkpoint's wins)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="as the harness run: batches are collated per batch")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="as the harness run (ELPV's split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    p.add_argument(
        "--init-args",
        type=json.loads,
        default={},
        help="init args over the checkpoint's, JSON, e.g. '{\"adaptive_mask_at_inference\": false}'",
    )
    return p.parse_args(argv)


def load_model(args: argparse.Namespace):
    """The model as the harness builds it (its pre-processor), with the checkpoint's init args and weights."""
    import torch

    from anomalib_recon.components.checkpoint import restoring_from_checkpoint

    cls = harness.model_class(args.model)
    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    allowed = set(inspect.signature(cls.__init__).parameters) - SKIP_ARGS
    init = {k: v for k, v in state.get("hyper_parameters", {}).items() if k in allowed} | args.init_args
    ns = argparse.Namespace(backbone=args.backbone, image_size=args.image_size, model_args={args.model: init})
    with restoring_from_checkpoint():  # our models: no weight download, the checkpoint holds the backbone
        model = harness.build_model(args.model, ns)
    result = model.load_state_dict(state["state_dict"], strict=False)  # the evaluator's metric states may differ
    missing = [k for k in result.missing_keys if k.startswith("model.")]
    if missing:
        msg = f"{args.ckpt} lacks {len(missing)} weights of {args.model} (e.g. {missing[:3]}): another model or size?"
        raise ValueError(msg)
    return model.eval()


def checkpoints_parser(description: str, model: str, name: str) -> argparse.ArgumentParser:
    """The command line of the scripts that score several checkpoints of one model on a masked test split
    (``pnpt_maps.py``, ``rb_ae_perception.py``): the checkpoints, the data settings as the harness's, the result."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ckpts", nargs="+", required=True, help=f"{model} checkpoints (the harness's model.ckpt files)")
    p.add_argument("--dataset", choices=["magnetic_tile", "folder"], default="magnetic_tile", help="needs masks")
    p.add_argument("--data-root", default=None, help="magnetic_tile: optional; folder: an MVTec-style category")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="as the harness run (a folder's split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=name)
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    return p


def study_label(ckpt: str) -> str:
    """``seed1/class`` from the study runner's ``.../seed1/<variant>/<Model>/...`` layout, else the file path."""
    parts = Path(ckpt).parts
    seeds = [i for i, part in enumerate(parts) if part.startswith("seed")]
    return "/".join(parts[seeds[-1] : seeds[-1] + 2]) if seeds else ckpt


def load_checkpoints(model: str, args: argparse.Namespace):
    """``(label, model)`` per checkpoint of ``args.ckpts`` (:func:`checkpoints_parser`), offline, ``args.threads``."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    for ckpt in args.ckpts:
        load_args = argparse.Namespace(
            model=model, ckpt=ckpt, backbone="tf_efficientnet_lite0", image_size=args.image_size, init_args={}
        )
        yield study_label(ckpt), load_model(load_args)


def write_checkpoint_tables(
    script: str,
    argv: list[str],
    args: argparse.Namespace,
    rows: list[dict],
    sections: list[tuple[str, list[str]]],
    **extra,
) -> str:
    """Record a checkpoint-scoring script's rows (``results/<args.name>.json`` / ``.md`` with its exact command and the
    machine): one markdown table per ``(intro, columns)`` of ``sections``; prints and returns the markdown."""
    header = {
        "name": args.name,
        "command": f"python benchmarks/{script} " + shlex.join(argv),
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "image_size": args.image_size,
        **extra,
    }

    def render(rows: list[dict], header: dict) -> str:
        lines = [*harness.result_preamble(header), ""]
        for intro, columns in sections:
            lines += [intro, "", *harness.markdown_table(columns, rows), ""]
        return "\n".join(lines)

    table = harness.write_results(Path(args.results_dir), header, rows, render=render)
    print(table)
    return table


def perlin_defects(dataset, rows: list[int], count: int, size: tuple[int, int], seed: int, generator):
    """``(clean, defective, masks)``: up to ``count`` of the dataset's ``rows`` (a draw seeded by ``seed``), resized
    like the models' Resize (non-antialiased), each with a defect pasted on a copy by ``generator`` (anomalib's
    ``PerlinAnomalyGenerator(probability=1.0)``; the caller seeds torch's global generator it draws from). Images in
    [0, 1], masks ``(N, 1, H, W)`` bool."""
    import torch
    from torchvision.transforms.v2.functional import resize

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()[:count]
    clean = torch.stack([resize(dataset[rows[i]].image, list(size), antialias=False) for i in order])
    defective, masks = [], []
    for image in clean:
        augmented, mask = generator(image)
        defective.append(augmented.clamp(0, 1))
        masks.append(mask.reshape(1, *size) > 0.5)
    return clean, torch.stack(defective), torch.stack(masks)


def harness_test_batches(model, datamodule):
    """``(images, masks, batch)`` per test batch, exactly as ``Engine.test`` feeds ``model.model``.

    Under a trainer, anomalib's image datamodules append the model's ``Resize`` to each dataset's augmentations, so
    every image is resized on its own before collating (``AnomalibDataModule._update_augmentations``); without it,
    anomalib's collate would first resize a batch of mixed-size images (Magnetic Tile) to its largest member. Then
    the model's pre-processor transforms images and masks together, as ``PreProcessor.on_test_batch_start`` does.
    """
    datamodule.setup()
    transform = model.pre_processor.transform if model.pre_processor is not None else None
    if transform is not None:  # what the datamodule does once a trainer holds the model
        datamodule._update_subset_augmentations(datamodule.test_data, datamodule.test_augmentations, transform)
    for batch in datamodule.test_dataloader():
        if transform is not None:
            images, masks = transform(batch.image, batch.gt_mask)
        else:
            images, masks = batch.image, batch.gt_mask
        yield images, masks, batch


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print a markdown table, optionally write it (and JSON) to ``--out``."""
    args = parse(argv)

    import torch
    from sklearn.metrics import roc_auc_score

    import anomalib_recon.models  # noqa: F401  (registers our models in anomalib.models)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model = load_model(args)
    data_args = argparse.Namespace(
        dataset=args.dataset,
        data_root=args.data_root,
        cell_type=args.cell_type,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
    )
    data = harness.build_datamodule(data_args)  # the harness's datamodule: same collate, same split
    maps, scores, labels, masks, classes = [], [], [], [], []
    with torch.no_grad():
        for images, gt_mask, batch in harness_test_batches(model, data):
            out = model.model(images)
            m = out.anomaly_map[:, 0] if out.anomaly_map.dim() == 4 else out.anomaly_map
            maps.append(m)
            scores.append(out.pred_score.flatten())
            labels.append(batch.gt_label)
            if gt_mask is not None:
                gt = gt_mask.float().reshape(len(m), 1, *gt_mask.shape[-2:])
                if gt.shape[-2:] != m.shape[-2:]:
                    gt = torch.nn.functional.interpolate(gt, size=m.shape[-2:], mode="nearest")
                masks.append(gt[:, 0])
            classes += [Path(p).parent.name for p in batch.image_path]
    maps, labels = torch.cat(maps), torch.cat(labels).numpy()
    reduced = {k: v.numpy() for k, v in image_scores(maps, torch.cat(scores)).items()}
    classes = np.array(classes)
    good = labels == 0
    rows = []
    for name in ["all", *sorted(set(classes[~good]))]:
        sel = np.ones_like(good) if name == "all" else good | (classes == name)
        row = {"class": name, "n": int((~good & sel).sum())}
        row |= {k: round(float(roc_auc_score(labels[sel], v[sel])), 4) for k, v in reduced.items()}
        rows.append(row)
    pixel, by_size = None, []
    if masks and len(masks) == len(scores):
        gt = torch.cat(masks).numpy() > 0.5
        if 0 < gt.sum() < gt.size:
            pixel = float(roc_auc_score(gt.ravel(), maps.flatten().numpy()))
            by_size = pixel_auroc_by_size(maps.numpy(), gt)
    command = "python benchmarks/per_class.py " + " ".join(shlex.quote(a) for a in argv or sys.argv[1:])
    cols = list(rows[0])
    pixel_text = f"Pixel AUROC on the maps: {pixel:.4f}." if pixel is not None else "No pixel masks: no pixel AUROC."
    lines = [
        f"# per-class image AUROC: {args.model}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {json.dumps(harness.machine_info())}",
        "",
        f"Inputs: the harness's {args.dataset} test split at {args.image_size} px (batch {args.batch_size}, seed "
        f"{args.seed}) through the model's pre-processor. Test images per class: {dict(Counter(classes.tolist()))}. "
        + pixel_text,
        "",
        *harness.markdown_table(cols, rows),
    ]
    if by_size:
        lines += [
            "",
            "Pixel AUROC by defect size (connected components of the masks at the map's resolution, quarters by area;"
            " each quarter's defect pixels vs every normal pixel; map_ratio = mean map on them / mean on normal;"
            " AUROC_vs_good_images: vs the pixels of defect-free images only):",
            "",
            *harness.markdown_table(list(by_size[0]), by_size),
        ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        header = {"command": command, "model": args.model, "ckpt": args.ckpt, "dataset": args.dataset}
        header |= {"image_size": args.image_size, "batch_size": args.batch_size, "seed": args.seed}
        Path(args.out + ".md").write_text(table)
        Path(args.out + ".json").write_text(
            json.dumps({**header, "rows": rows, "pixel_AUROC": pixel, "by_size": by_size}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
