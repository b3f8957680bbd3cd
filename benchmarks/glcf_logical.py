"""A generated logical-anomaly dataset for GLCF: four coloured parts whose *arrangement* follows a rule.

Normal images: a gray texture (random phase and noise) with four disks in four fixed slots (jittered by a pixel or
two). The arrangement rule: the two disks of the top row share one colour and the two of the bottom row share
another (two of four colours, drawn at random per image). So every colour appears in every slot across the normal
images, and any single slot, seen on its own, always looks normal.

Logical anomalies break the rule and nothing else:

* ``swap``: a top disk and a bottom disk exchange their colours (every slot still holds a normal-looking disk);
* ``duplicate``: one disk takes the colour of the other row (three of one colour, one of the other);
* ``missing``: one disk is left out (this one also leaves a slot empty, which a local model can notice).

Structural anomalies (``--types structural``) are local defects: a dark scratch across a disk or the texture.
Masks cover the changed slots (both for a swap).

Write an MVTec-style category folder (``train/good``, ``test/good``, ``test/<type>``, ``ground_truth/<type>``)::

    python benchmarks/glcf_logical.py --root /tmp/glcf_logical --size 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

LOGICAL = ("swap", "duplicate", "missing")
ARRANGEMENT_ONLY = ("swap", "duplicate")
"""Logical anomalies in which every slot, taken alone, looks exactly like a normal slot."""
TYPES = (*LOGICAL, "structural")
COLORS = ((220, 40, 40), (40, 190, 60), (50, 80, 230), (235, 210, 40))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    texture = 125 + 18 * np.sin(xx / 3.0 + phase) * np.cos(yy / 5.0) + rng.normal(0, 4, (size, size))
    return np.repeat(texture[..., None], 3, axis=2)


def _disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def slot_centres(size: int) -> list[tuple[float, float]]:
    """Fixed centres of the four slots: top-left, top-right, bottom-left, bottom-right."""
    a, b = size * 0.27, size * 0.73
    return [(a, a), (a, b), (b, a), (b, b)]


def make_image(size: int, rng: np.random.Generator, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One ``(size, size, 3)`` uint8 image and its ``(size, size)`` bool mask (all False for normal images)."""
    if defect is not None and defect not in TYPES:
        msg = f"unknown anomaly type {defect!r}; choose from {TYPES}."
        raise ValueError(msg)
    image = _background(size, rng)
    centres = slot_centres(size)
    radius = size * 0.13
    top, bottom = (int(c) for c in rng.choice(len(COLORS), size=2, replace=False))
    colours: list[int | None] = [top, top, bottom, bottom]
    changed = np.zeros((size, size), bool)
    if defect == "swap":
        i, j = int(rng.integers(2)), 2 + int(rng.integers(2))
        colours[i], colours[j] = colours[j], colours[i]
        changed |= _disk(size, *centres[i], radius * 1.2) | _disk(size, *centres[j], radius * 1.2)
    elif defect == "duplicate":
        k = int(rng.integers(4))
        colours[k] = bottom if k < 2 else top
        changed |= _disk(size, *centres[k], radius * 1.2)
    elif defect == "missing":
        k = int(rng.integers(4))
        colours[k] = None
        changed |= _disk(size, *centres[k], radius * 1.2)
    for colour, (cy, cx) in zip(colours, centres, strict=True):
        if colour is None:
            continue
        jy, jx = rng.uniform(-1.5, 1.5, 2)
        image[_disk(size, cy + jy, cx + jx, radius)] = COLORS[colour]
    if defect == "structural":
        y0, x0 = rng.integers(size // 8, size - size // 8 - size // 6, 2)
        length, width = size // 6, max(2, size // 40)
        angle = rng.uniform(0, np.pi)
        for t in np.linspace(0, length, 4 * length):
            y, x = int(y0 + t * np.sin(angle)), int(x0 + t * np.cos(angle))
            image[y : y + width, x : x + width] = 20
            changed[y : y + width, x : x + width] = True
    return image.clip(0, 255).astype(np.uint8), changed


def write_logical_dataset(
    root: Path,
    size: int = 128,
    n_train: int = 64,
    n_good: int = 20,
    n_per_type: int = 10,
    types: tuple[str, ...] = LOGICAL,
    seed: int = 0,
) -> Path:
    """Write an MVTec-style category folder of normal and anomalous images; returns ``root``."""
    from PIL import Image

    for kind in types:
        if kind not in TYPES:
            msg = f"unknown anomaly type {kind!r}; choose from {TYPES}."
            raise ValueError(msg)
    rng = np.random.default_rng(seed)
    root = Path(root)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(make_image(size, rng)[0], root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(make_image(size, rng)[0], root / "test" / "good" / f"{i:03d}.png")
    for kind in types:
        for i in range(n_per_type):
            image, mask = make_image(size, rng, kind)
            save(image, root / "test" / kind / f"{i:03d}.png")
            save(mask.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def main(argv: list[str] | None = None) -> int:
    """Write the dataset folder."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-good", type=int, default=20)
    p.add_argument("--n-per-type", type=int, default=10)
    p.add_argument("--types", nargs="+", default=list(LOGICAL), choices=TYPES)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_logical_dataset(
        Path(args.root), args.size, args.n_train, args.n_good, args.n_per_type, tuple(args.types), args.seed
    )
    print(f"wrote {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
