"""benchmarks/glcf_logical.py: the generated logical-anomaly set breaks only its arrangement rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.benchmarks.conftest import load_script


def test_logical_generator_breaks_only_the_arrangement_rule(tmp_path: Path) -> None:
    logical = load_script("glcf_logical")
    rng = np.random.default_rng(0)
    size = 64
    centres = [(round(y), round(x)) for y, x in logical.slot_centres(size)]
    colours = [tuple(c) for c in logical.COLORS]

    def slots(image: np.ndarray) -> list[int | None]:
        found = [tuple(int(v) for v in image[y, x]) for y, x in centres]
        return [colours.index(c) if c in colours else None for c in found]

    seen = set()
    for _ in range(40):
        image, mask = logical.make_image(size, rng)
        s = slots(image)
        assert not mask.any() and image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert s[0] == s[1] != s[2] == s[3] and None not in s  # the rule: one colour per row
        seen |= {(slot, colour) for slot, colour in enumerate(s)}
    assert len(seen) == 16  # every colour in every slot: no slot alone tells a normal image from an anomaly
    for kind in logical.LOGICAL:
        image, mask = logical.make_image(size, rng, kind)
        s = slots(image)
        assert mask.any()
        if kind == "missing":
            assert s.count(None) == 1
        else:
            assert None not in s and not (s[0] == s[1] != s[2] == s[3])
            counts = sorted(s.count(c) for c in set(s))
            assert counts == ([2, 2] if kind == "swap" else [1, 3])
    root = logical.write_logical_dataset(tmp_path / "logical", size=64, n_train=3, n_good=2, n_per_type=2)
    assert len(list((root / "train" / "good").glob("*.png"))) == 3
    for kind in logical.LOGICAL:
        masks = sorted((root / "ground_truth" / kind).glob("*_mask.png"))
        assert len(masks) == 2 and np.asarray(Image.open(masks[0])).max() == 255
    with pytest.raises(ValueError, match="unknown anomaly type"):
        logical.write_logical_dataset(tmp_path / "bad", types=("rotated",))
