"""DADF's two reconstruction streams on real images: how much of the backbone features each explains.

DADF (``src/anomalib_recon/models/image/dadf``) reconstructs the frozen backbone maps ``f_s`` of three scales with
two streams of one transformer: the patch stream ``X̂_s`` (self-attention) and the memory stream ``M̂_s`` (memorial
attention); its flows are trained on ``[f_s, X̂_s, M̂_s]``. For each checkpoint and scale this script reports

* ``variance``: the feature variance, mean over channels of the per-channel (population) variance of ``f_s`` over
  images × positions, i.e. the MSE of the best constant-per-channel predictor;
* ``mse_self`` / ``mse_memory``: ``mean (X̂_s − f_s)²`` and ``mean (M̂_s − f_s)²``, the per-scale terms of the
  stage-1 loss;
* ``explained_self`` / ``explained_memory``: ``1 − MSE / variance``;
* ``mutual_mse``: ``mean (X̂_s − M̂_s)²``, how different the two reconstructions are.

The model's own methods compute everything (``extract`` and ``reconstruction_maps``), in eval mode without
gradients. The images are those the benchmark harness feeds the model: ``harness.build_datamodule`` with the same
arguments, anomalib's collate (which resizes a batch of mixed sizes to its largest image) in batches of
``--batch-size``, then the checkpoint's own pre-processor transform. **INFERRED**: which ``--images`` images are
used is a seeded random subset of the split (``--seed``), taken in dataset order, so that a test subset mixes
normal and defective images. On the test split the statistics are also reported for the normal and the anomalous
images separately (each subset's own variance). Results go to ``benchmarks/results/dadf_streams_<name>.json`` /
``.md`` with the command and the machine.

Example (the 300-step ablation checkpoints, Magnetic Tile at 128 px)::

    python benchmarks/dadf_streams.py --ckpt dual=/tmp/dadf/dual/.../model.ckpt self=/tmp/dadf/self/.../model.ckpt \
        --dataset magnetic_tile --image-size 128 --split train --images 16 --name mt_lite0_128_seed0_train16
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

COLUMNS = [
    "checkpoint",
    "subset",
    "n_images",
    "scale",
    "variance",
    "mse_self",
    "mse_memory",
    "explained_self",
    "explained_memory",
    "mutual_mse",
]


# ---------------------------------------------------------------------------------------------------- arguments
def parse_ckpt(spec: str) -> tuple[str, Path]:
    """``label=PATH`` or ``PATH`` (labelled by its path) → ``(label, path)``."""
    label, sep, path = spec.partition("=")
    if sep and label and os.sep not in label:
        return label, Path(path)
    return spec, Path(spec)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the dataset ones as ``benchmarks/harness.py`` takes them)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="DADF checkpoints, each PATH or LABEL=PATH")
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder"], default="magnetic_tile")
    p.add_argument("--data-root", default=None, help="dataset folder (magnetic_tile: optional; folder: required)")
    p.add_argument("--cell-type", default="mono")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="must equal the checkpoints' input size (a check; the checkpoint's pre-processor resizes)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the datamodule and of the image subset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--images", type=int, default=16, help="images of the split to measure on (at most all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--name", default=None, help="results go to dadf_streams_<name>.json/.md")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    args = p.parse_args(argv)
    if args.images < 1 or args.batch_size < 1:
        p.error(f"--images and --batch-size must be positive, got {args.images} and {args.batch_size}.")
    args.ckpt = [parse_ckpt(spec) for spec in args.ckpt]
    labels = [label for label, _ in args.ckpt]
    if len(set(labels)) != len(labels):
        p.error(f"--ckpt labels must be distinct, got {labels}.")
    return args


# ---------------------------------------------------------------------------------------------------- loading
def load_dadf(path: Path, label: str):
    """``DADF.load_from_checkpoint(path, weights_only=True)`` in eval mode, or one ``ValueError`` naming the file."""
    from anomalib_recon.models.image.dadf import DADF

    if not path.is_file():
        msg = f"--ckpt {label}: {str(path)!r} does not exist (pass the model.ckpt that anomalib train wrote)."
        raise ValueError(msg)
    try:
        model = DADF.load_from_checkpoint(path, weights_only=True, visualizer=False)
    except ValueError as error:  # CheckpointMismatchError: another model's, unreadable, or other settings
        msg = f"--ckpt {label}: {path} is not a loadable DADF checkpoint: {error}"
        raise ValueError(msg) from error
    check_measurable(model, label)
    return model.eval()


def check_measurable(model, label: str) -> None:
    """A DADF with a reconstruction transformer (``flow_input="features"`` builds none: nothing to measure)."""
    if not model.model.has_reconstruction:
        msg = (
            f"--ckpt {label}: this DADF was trained with flow_input='features' (flows on raw features); it has no "
            "reconstruction streams to measure."
        )
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------------------- images
def select_batches(args: argparse.Namespace) -> tuple[list, int]:
    """``--images`` items of the split (seeded subset, dataset order) collated in ``--batch-size`` batches.

    Returns the raw batches (before any model's pre-processor) and the size of the split.
    """
    import torch
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, verbose=False)
    datamodule = harness.build_datamodule(args)
    datamodule.prepare_data()
    datamodule.setup()
    dataset = datamodule.train_data if args.split == "train" else datamodule.test_data
    total = len(dataset)
    generator = torch.Generator().manual_seed(args.seed)
    chosen = sorted(torch.randperm(total, generator=generator)[: args.images].tolist())
    batches = [
        dataset.collate_fn([dataset[i] for i in chosen[start : start + args.batch_size]])
        for start in range(0, len(chosen), args.batch_size)
    ]
    return batches, total


# ---------------------------------------------------------------------------------------------------- measurement
def stream_outputs(model, batches: list) -> dict:
    """``f_s``, ``X̂_s``, ``M̂_s`` (``None`` without memory) per scale over all batches, and the image labels.

    Each batch goes through the checkpoint's pre-processor transform (as anomalib's ``on_*_batch_start`` applies
    it), then the model's ``extract`` and ``reconstruction_maps``.
    """
    import torch

    features, selfs, memories, labels = [], [], [], []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            images = batch.image
            if model.pre_processor is not None and getattr(model.pre_processor, "transform", None) is not None:
                images = model.pre_processor.transform(images)
            images = images.as_subclass(torch.Tensor).float()
            f = model.model.extract(images)
            x_maps, m_maps = model.model.reconstruction_maps(f)
            features.append(f)
            selfs.append(x_maps)
            memories.append(m_maps)
            labels.append(None if batch.gt_label is None else batch.gt_label.reshape(-1).long())

    def cat(parts: list) -> list | None:
        if any(p is None for p in parts):
            return None
        return [torch.cat([p[s] for p in parts]) for s in range(len(parts[0]))]

    label = None if any(lab is None for lab in labels) else torch.cat(labels)
    return {"features": cat(features), "self": cat(selfs), "memory": cat(memories), "labels": label}


def scale_stats(f, x_hat, m_hat) -> dict:
    """Variance of ``f`` and the MSEs of one scale (float64); memory entries ``None`` without ``m_hat``."""
    f64 = f.double()
    channels = f64.shape[1]
    variance = float(f64.transpose(0, 1).reshape(channels, -1).var(dim=1, unbiased=False).mean())
    mse_self = float(((x_hat.double() - f64) ** 2).mean())
    out = {
        "variance": variance,
        "mse_self": mse_self,
        "mse_memory": None,
        "explained_self": 1.0 - mse_self / variance,
        "explained_memory": None,
        "mutual_mse": None,
    }
    if m_hat is not None:
        mse_memory = float(((m_hat.double() - f64) ** 2).mean())
        out |= {
            "mse_memory": mse_memory,
            "explained_memory": 1.0 - mse_memory / variance,
            "mutual_mse": float(((x_hat.double() - m_hat.double()) ** 2).mean()),
        }
    return out


def measure(model, batches: list, label: str, split: str) -> list[dict]:
    """One row per (subset, scale): ``all``, and on the test split ``normal`` / ``anomalous`` where labelled."""
    outputs = stream_outputs(model, batches)
    features, selfs, memories, labels = outputs["features"], outputs["self"], outputs["memory"], outputs["labels"]
    n = int(features[0].shape[0])
    subsets = [("all", None)]
    if split == "test" and labels is not None:
        subsets += [("normal", labels == 0), ("anomalous", labels == 1)]
    rows = []
    for subset, mask in subsets:
        count = n if mask is None else int(mask.sum())
        if count == 0:
            continue
        for s, f in enumerate(features):
            x_hat, m_hat = selfs[s], None if memories is None else memories[s]
            if mask is not None:
                f, x_hat, m_hat = f[mask], x_hat[mask], None if m_hat is None else m_hat[mask]
            stats = scale_stats(f, x_hat, m_hat)
            rows.append(
                {
                    "checkpoint": label,
                    "subset": subset,
                    "n_images": count,
                    "scale": s + 1,
                    "shape": list(f.shape[1:]),
                    **stats,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------- output
def _cell(row: dict, col: str) -> str:
    value = row.get(col)
    if value is None:
        return "—"
    if col == "scale":
        c, h, w = row["shape"]
        return f"{value} ({c}×{h}×{w})"
    if col.startswith("explained"):
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_markdown(rows: list[dict], header: dict) -> str:
    """The table plus how it was produced."""
    lines = [
        *harness.result_preamble(header),
        "",
        f"Dataset {header['dataset']}, {header['split']} split: {header['n_images']} of {header['split_size']} images "
        f"(seeded subset, seed {header['seed']}), batches of {header['batch_size']} through each checkpoint's "
        "pre-processor, eval mode. Per scale: `variance` = mean over channels of the per-channel variance of the "
        "backbone features f over images × positions; `mse_self` / `mse_memory` = mean (X̂ − f)² / mean (M̂ − f)² "
        "(the stage-1 loss terms); `explained` = 1 − MSE / variance; `mutual_mse` = mean (X̂ − M̂)². — = no memory "
        "stream (use_memory=False).",
        "",
        "Checkpoints:",
        "",
    ]
    for c in header["checkpoints"]:
        lines.append(
            f"- {c['label']}: `{c['path']}` (global_step {c['global_step']}, reconstruction_steps "
            f"{c['reconstruction_steps']}, use_memory {c['use_memory']}, {c['input_size'][0]} px)"
        )
    lines += ["", *harness.markdown_table(COLUMNS, rows, _cell)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Load every checkpoint (all before measuring: a bad one fails fast), measure, write JSON + markdown."""
    args = parse(argv)
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "folder":
        harness.check_folder_root(args)
    models = {label: (path, load_dadf(path, label)) for label, path in args.ckpt}
    for label, (_, model) in models.items():
        size = tuple(model.model.image_size)
        if args.image_size is not None and size != (args.image_size, args.image_size):
            msg = f"--image-size {args.image_size} differs from the input size {size} checkpoint {label} was built for."
            raise ValueError(msg)
    batches, split_size = select_batches(args)
    raw = argv if argv is not None else sys.argv[1:]
    name = args.name or f"{args.dataset}_{args.split}{args.images}_seed{args.seed}"
    header = {
        "name": f"dadf_streams_{name}",
        "command": "python benchmarks/dadf_streams.py " + " ".join(shlex.quote(a) for a in raw),
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "data_root": args.data_root,
        "split": args.split,
        "split_size": split_size,
        "n_images": sum(int(b.image.shape[0]) for b in batches),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "checkpoints": [],
    }
    rows = []
    for label, (path, model) in models.items():
        hp = dict(model.hparams)
        header["checkpoints"].append(
            {
                "label": label,
                "path": str(path),
                "global_step": torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step"),
                "reconstruction_steps": hp.get("reconstruction_steps"),
                "use_memory": bool(model.model.use_memory),
                "input_size": list(model.model.image_size),
            }
        )
        print(f"=== {label} ===", flush=True)
        rows += measure(model, batches, label, args.split)
    print(harness.write_results(Path(args.results_dir), header, rows, render=to_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
