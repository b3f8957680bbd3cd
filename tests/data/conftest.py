"""Tiny generated MVTec-style trees for the data tests."""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tree(
    root: Path,
    category: str = "",
    n_train: int = 4,
    n_good: int = 2,
    defects: Sequence[tuple[str, int]] = (("scratch", 2),),
    size: tuple[int, int] = (24, 32),
    ext: str = ".png",
    masks: bool = True,
    vary_size: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``root/category/{train/good, test/good, test/<defect>, ground_truth/<defect>/NNN_mask.png}``.

    Normal images are gray noise; each defect image has a white square, marked in its 0/255 mask.
    """
    rng = np.random.default_rng(seed)
    base = root / category if category else root

    def shape(i: int) -> tuple[int, int]:
        return (size[0] + 4 * (i % 3), size[1] + 2 * (i % 2)) if vary_size else size

    def normal(h: int, w: int) -> np.ndarray:
        return (100 + rng.integers(0, 40, (h, w))).astype(np.uint8)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, "L").save(path)

    for i in range(n_train):
        save(normal(*shape(i)), base / "train" / "good" / f"{i:03d}{ext}")
    for i in range(n_good):
        save(normal(*shape(i)), base / "test" / "good" / f"{i:03d}{ext}")
    for defect, n in defects:
        for i in range(n):
            h, w = shape(i)
            image, mask = normal(h, w), np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            image[y : y + 8, x : x + 8] = 255
            mask[y : y + 8, x : x + 8] = 255
            save(image, base / "test" / defect / f"{i:03d}{ext}")
            if masks:
                save(mask, base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return base


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_tree(category, **kwargs)`` writes a tree under ``tmp_path`` and returns its folder."""

    def factory(category: str = "", root: Path | None = None, **kwargs) -> Path:
        return write_tree(root or tmp_path, category, **kwargs)

    return factory
