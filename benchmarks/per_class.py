"""Per-defect-class image AUROC of a trained checkpoint, for several image scores computed from its anomaly maps.

Answers "which defects does a model miss, and would another image score help?": the checkpoint's torch model
is run on the test split (Magnetic Tile, or any MVTec-style ``--data-root``); each defect class is scored
against all good images with scikit-learn, for the model's own ``pred_score`` and for scores reduced from its
maps (std, max, top-1 % mean, max of the 5×5 average-pooled map). Pixel AUROC is computed on the maps'
resolution with nearest-resized masks.

Example::

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

from harness import DEFAULT_MT_ROOT, build_datamodule, machine_info

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


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print a markdown table, optionally write it (and JSON) to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    p.add_argument(
        "--init-args",
        type=json.loads,
        default={},
        help="init args over the checkpoint's, JSON, e.g. '{\"adaptive_mask_at_inference\": false}'",
    )
    args = p.parse_args(argv)

    import anomalib.models as am
    import torch
    from sklearn.metrics import roc_auc_score

    import anomalib_recon.models  # noqa: F401  (registers our models in anomalib.models)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    cls = getattr(am, args.model)
    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    allowed = set(inspect.signature(cls.__init__).parameters) - SKIP_ARGS
    init = {k: v for k, v in state.get("hyper_parameters", {}).items() if k in allowed} | args.init_args
    size = (args.image_size, args.image_size)
    model = cls(**init, pre_processor=cls.configure_pre_processor(image_size=size), evaluator=False, visualizer=False)
    model.load_state_dict(state["state_dict"], strict=False)  # the harness evaluator's metric states are not needed
    model.eval()

    root = Path(args.data_root or os.environ.get("ANOMALIB_RECON_MAGNETIC_TILE", DEFAULT_MT_ROOT))
    folder = argparse.Namespace(dataset="folder", data_root=str(root), batch_size=16, workers=1, seed=0)
    data = build_datamodule(folder)  # the harness's MVTec-style Folder (checks the layout, one clear error)
    data.setup()
    maps, scores, labels, masks, classes = [], [], [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            out = model.model(model.pre_processor.transform(batch.image))
            m = out.anomaly_map[:, 0] if out.anomaly_map.dim() == 4 else out.anomaly_map
            maps.append(m)
            scores.append(out.pred_score.flatten())
            labels.append(batch.gt_label)
            gt = torch.nn.functional.interpolate(batch.gt_mask.float().unsqueeze(1), size=m.shape[-2:])
            masks.append(gt[:, 0])
            classes += [Path(p).parent.name for p in batch.image_path]
    maps, labels, masks = torch.cat(maps), torch.cat(labels).numpy(), torch.cat(masks)
    reduced = {k: v.numpy() for k, v in image_scores(maps, torch.cat(scores)).items()}
    classes = np.array(classes)
    good = labels == 0
    rows = []
    for name in ["all", *sorted(set(classes[~good]))]:
        sel = np.ones_like(good) if name == "all" else good | (classes == name)
        row = {"class": name, "n": int((~good & sel).sum())}
        row |= {k: round(float(roc_auc_score(labels[sel], v[sel])), 4) for k, v in reduced.items()}
        rows.append(row)
    pixel = float(roc_auc_score(masks.flatten().numpy() > 0.5, maps.flatten().numpy()))
    cols = list(rows[0])
    lines = [
        f"# per-class image AUROC: {args.model}",
        "",
        "Command: `python benchmarks/per_class.py " + " ".join(shlex.quote(a) for a in argv or sys.argv[1:]) + "`",
        "",
        f"Machine: {json.dumps(machine_info())}",
        "",
        f"Test images per class: {dict(Counter(classes.tolist()))}. Pixel AUROC on the maps: {pixel:.4f}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows],
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out + ".md").write_text(table)
        Path(args.out + ".json").write_text(json.dumps({"rows": rows, "pixel_AUROC": pixel}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
