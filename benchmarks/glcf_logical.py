"""A generated logical-anomaly dataset for GLCF: a fixed arrangement of four coloured parts on a texture.

Normal images: a gray texture (random phase and noise) with four parts at fixed places (jittered by a pixel or
two): a red disk top-left, a green square top-right, a blue triangle bottom-left, a yellow cross bottom-right.

Logical anomalies change only the arrangement; every part that is drawn looks exactly like a normal part:

* ``missing``: one part is left out;
* ``duplicate``: one part appears a second time, in the centre of the image;
* ``swap``: two parts exchange their places.

Structural anomalies (``--types structural``) are local defects: a dark scratch across a part or the texture.
Masks cover the changed regions (both places for a swap).

Write an MVTec-style category folder (``train/good``, ``test/good``, ``test/<type>``, ``ground_truth/<type>``)::

    python benchmarks/glcf_logical.py --root /tmp/glcf_logical --size 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

LOGICAL = ("missing", "duplicate", "swap")
TYPES = (*LOGICAL, "structural")
COLORS = ((220, 40, 40), (40, 190, 60), (50, 80, 230), (235, 210, 40))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    texture = 125 + 18 * np.sin(xx / 3.0 + phase) * np.cos(yy / 5.0) + rng.normal(0, 4, (size, size))
    return np.repeat(texture[..., None], 3, axis=2)


def _shape_mask(kind: int, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Boolean mask of part ``kind`` (0 disk, 1 square, 2 triangle, 3 cross) centred at ``(cy, cx)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return dy**2 + dx**2 <= radius**2
    if kind == 1:
        return (np.abs(dy) <= 0.85 * radius) & (np.abs(dx) <= 0.85 * radius)
    if kind == 2:
        return (dy <= 0.8 * radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 1.8 * 1.0)
    arm = 0.3 * radius
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))


def part_centres(size: int) -> list[tuple[float, float]]:
    """Fixed centres of the four parts (top-left, top-right, bottom-left, bottom-right)."""
    a, b = size * 0.27, size * 0.73
    return [(a, a), (a, b), (b, a), (b, b)]


def make_image(size: int, rng: np.random.Generator, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One ``(size, size, 3)`` uint8 image and its ``(size, size)`` bool mask (all False for normal images)."""
    image = _background(size, rng)
    centres = part_centres(size)
    radius = size * 0.13
    kinds = [0, 1, 2, 3]
    places = list(centres)
    changed = np.zeros((size, size), bool)
    extra: list[tuple[int, tuple[float, float]]] = []
    if defect == "missing":
        gone = int(rng.integers(4))
        changed |= _shape_mask(kinds[gone], size, *centres[gone], radius * 1.1)
        kinds[gone] = -1
    elif defect == "duplicate":
        copy = int(rng.integers(4))
        extra.append((kinds[copy], (size / 2, size / 2)))
        changed |= _shape_mask(kinds[copy], size, size / 2, size / 2, radius * 1.1)
    elif defect == "swap":
        i, j = rng.choice(4, size=2, replace=False)
        places[i], places[j] = places[j], places[i]
        for k in (i, j):
            changed |= _shape_mask(0, size, *centres[k], radius * 1.2)
    for kind, (cy, cx) in [*zip(kinds, places, strict=True), *extra]:
        if kind < 0:
            continue
        jy, jx = rng.uniform(-1.5, 1.5, 2)
        image[_shape_mask(kind, size, cy + jy, cx + jx, radius)] = COLORS[kind]
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
