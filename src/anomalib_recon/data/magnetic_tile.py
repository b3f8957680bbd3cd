"""Magnetic Tile Defect dataset (MTD) as an anomalib ``Folder`` preset.

License: none is stated by the authors; their collection is meant for academic research only. Treat the data
as **research-only** (no commercial use) and cite:

    Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of magnetic tile", The Visual Computer 36, 85-96 (2020).

The images are grayscale JPEGs of variable size (about 100-630 × 220-400 px); anomalib reads them as RGB, and
a model's pre-processor resizes them. Masks are 0/255 PNGs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from anomalib.data import Folder
from anomalib.data.datasets.image.folder import FolderDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_recon.data.reading import CheckedImageDatasetMixin
from anomalib_recon.data.validation import (
    DatasetError,
    check_image_files,
    check_mask_folders,
    check_masks,
    check_synthetic_val_split,
    require_dir,
)

__all__ = ["MAGNETIC_TILE_DEFECTS", "MAGNETIC_TILE_ENV", "CheckedFolderDataset", "MagneticTile"]

MAGNETIC_TILE_DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")
MAGNETIC_TILE_ENV = "ANOMALIB_RECON_MAGNETIC_TILE"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}

_LAYOUT = (
    "Expected layout (MVTec style): <root>/train/good/*.jpg, <root>/test/good/*.jpg, "
    "<root>/test/<defect>/NNN.jpg and <root>/ground_truth/<defect>/NNN_mask.png for the defects "
    f"{', '.join(MAGNETIC_TILE_DEFECTS)}."
)


class CheckedFolderDataset(CheckedImageDatasetMixin, FolderDataset):
    """anomalib ``FolderDataset`` that reads 16-bit images correctly and names unreadable files in its errors."""


def _count_images(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file())


class MagneticTile(Folder):
    """Magnetic Tile Defect dataset (Huang et al., The Visual Computer 2020) in one flag.

    A ``Folder`` datamodule with the dataset's layout pre-set: train on ``train/good`` (762 normal tiles), test on
    ``test/good`` (190) and the five defect folders (392, with pixel masks), so the task is segmentation and
    pixel metrics are computed. ``val_split_mode="same_as_test"`` as in ``MVTecAD``: the test set is small and
    the validation set only calibrates normalisation and thresholds.

    **Research-only data, no license stated; cite** Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of
    magnetic tile", The Visual Computer 36, 85-96 (2020).

    Args:
        root: Dataset folder. ``None``: the ``ANOMALIB_RECON_MAGNETIC_TILE`` environment variable. Layout:
            ``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/NNN_mask.png``.
        defects: Defect classes to test on, a subset of ``blowhole, break, crack, fray, uneven``.
            ``None`` (default): all five.
        train_batch_size: Training batch size. Default ``32``.
        eval_batch_size: Validation/test batch size. Default ``32``.
        num_workers: Dataloader workers. Default ``8``.
        train_augmentations: Augmentations for training images.
        val_augmentations: Augmentations for validation images.
        test_augmentations: Augmentations for test images.
        augmentations: Augmentations for any split without its own.
        val_split_mode: anomalib ``ValSplitMode``. Default ``same_as_test``.
        val_split_ratio: Fraction used by the ``from_test``/``from_train``/``synthetic`` modes.
        seed: Seed of anomalib's random validation split (unused with ``same_as_test``).

    Raises:
        DatasetError: No root given and the environment variable is unset, or an unknown defect name
            (at construction). At ``setup``: a folder without images; an unreadable, truncated or
            floating-point image in any split; a defect image without a mask or a mask without an image; a
            mask whose size differs from its image's. Each message names the file(s).
        DatasetNotFoundError: The root or one of the expected folders is missing (at ``setup``).

    Example:
        >>> datamodule = MagneticTile(root="/data/magnetic_tile")
        CLI: ``anomalib train --model Padim --data anomalib_recon.data.MagneticTile --data.root /data/magnetic_tile``
    """

    def __init__(
        self,
        root: str | Path | None = None,
        defects: Sequence[str] | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        if root is None:
            root = os.environ.get(MAGNETIC_TILE_ENV) or None
            if root is None:
                msg = f"MagneticTile needs the dataset folder: pass root=... or set {MAGNETIC_TILE_ENV}. {_LAYOUT}"
                raise DatasetError(msg)
        defects = tuple(MAGNETIC_TILE_DEFECTS if defects is None else defects)
        unknown = sorted(set(defects) - set(MAGNETIC_TILE_DEFECTS))
        if unknown or not defects:
            msg = f"defects must be a non-empty subset of {MAGNETIC_TILE_DEFECTS}, got {list(defects)}."
            raise DatasetError(msg)
        self.defects = tuple(d for d in MAGNETIC_TILE_DEFECTS if d in defects)  # sorted: masks pair with images
        super().__init__(
            name="magnetic_tile",
            root=Path(root).expanduser(),
            normal_dir="train/good",
            normal_test_dir="test/good",
            abnormal_dir=[f"test/{d}" for d in self.defects],
            mask_dir=[f"ground_truth/{d}" for d in self.defects],
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )

    def _check_layout(self) -> None:
        root = require_dir(self.root, "MagneticTile root", f"Pass root= or set {MAGNETIC_TILE_ENV}. {_LAYOUT}")
        folders = ["train/good", "test/good"] + [f"{s}/{d}" for d in self.defects for s in ("test", "ground_truth")]
        for rel in folders:
            folder = require_dir(root / rel, "MagneticTile folder", _LAYOUT)
            if _count_images(folder) == 0:
                msg = f"MagneticTile folder {str(folder)!r} has no images. {_LAYOUT}"
                raise DatasetError(msg)
        pairs = [(root / "test" / d, root / "ground_truth" / d) for d in self.defects]
        check_mask_folders(pairs, extensions=self.extensions, what="MagneticTile")

    def prepare_data(self) -> None:
        """Check the folder layout and the image/mask pairing (nothing is downloaded)."""
        self._check_layout()

    def _setup(self, _stage: str | None = None) -> None:
        """Check the layout, build the train and test sets, and check every file of both.

        The validation set (``same_as_test``, or split from train/test) holds only files checked here. Checks
        cost 0.1-0.3 s on the 1,344 images and 392 masks of Magnetic Tile (see ``check_image_files``).
        """
        self._check_layout()
        datasets = [
            CheckedFolderDataset(
                name=self.name,
                split=split,
                root=self.root,
                normal_dir=self.normal_dir,
                abnormal_dir=self.abnormal_dir,
                normal_test_dir=self.normal_test_dir,
                mask_dir=self.mask_dir,
                extensions=self.extensions,
            )
            for split in (Split.TRAIN, Split.TEST)
        ]
        self.train_data, self.test_data = datasets
        files = [*self.train_data.samples["image_path"], *self.test_data.samples["image_path"]]
        files += [m for m in self.test_data.samples["mask_path"] if m]
        sizes = check_image_files(files, what="MagneticTile")
        check_masks(self.test_data.samples, sizes, what="MagneticTile")
        check_synthetic_val_split(self.val_split_mode, self.train_data.samples["image_path"], what="MagneticTile")
