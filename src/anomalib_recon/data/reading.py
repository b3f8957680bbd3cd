"""Reading dataset images, 16-bit grayscale included, with the file named in any error.

anomalib's ``read_image`` reads a 16-bit grayscale image as (almost) all white, silently. :func:`read_image` is
anomalib's reader plus 16-bit grayscale (see its docstring for the scaling); :class:`CheckedImageDatasetMixin`
loads the items of an anomalib dataset with it, and :class:`PredictDataset` is anomalib's ``PredictDataset`` with
it. The checks the datamodules run at setup are in :mod:`anomalib_recon.data.validation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib import TaskType
from anomalib.data import PredictDataset as AnomalibPredictDataset
from anomalib.data.dataclasses import DatasetItem, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, read_mask
from PIL import Image
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2.functional import to_dtype, to_image
from torchvision.tv_tensors import Image as ImageTensor
from torchvision.tv_tensors import Mask

from anomalib_recon.data.validation import (
    READ_ERRORS,
    REFUSED_MODES,
    REPLACE_HINT,
    WIDE_MODES,
    DatasetError,
    DatasetNotFoundError,
    check_image_files,
    refused_mode_error,
)

__all__ = ["CheckedImageDatasetMixin", "PredictDataset", "read_image"]


def _wide_to_unit(array: np.ndarray, path: str | Path) -> np.ndarray:
    """16-bit grayscale values to float32 in [0, 1], by the 16-bit range (value / 65535)."""
    if not (array.dtype.kind == "u" and array.dtype.itemsize == 2):
        low, high = int(array.min(initial=0)), int(array.max(initial=0))
        if low < 0 or high > 65535:
            msg = (
                f"{str(path)!r} is a 32-bit integer image with values {low}..{high}, outside the 16-bit range "
                "0..65535 that can be read. Save it as an 8-bit or 16-bit PNG and retry."
            )
            raise DatasetError(msg)
    return array.astype(np.float32) / np.float32(65535.0)


def read_image(path: str | Path, as_tensor: bool = False) -> torch.Tensor | np.ndarray:
    """Read an image as RGB in [0, 1], like anomalib's ``read_image``, but read 16-bit grayscale correctly.

    anomalib's ``read_image`` calls ``PIL.Image.convert("RGB")``, which clips 16-bit grayscale values (Pillow
    modes ``I;16*``/``I``) at 255: every pixel above 255/65535 becomes white, so a 16-bit image is read as
    (almost) all white, silently. Here such images are scaled by the **16-bit range** (``value / 65535``, the
    same as ``value / 257`` in 8-bit units) and kept in float32 (no rounding to 8 bits), then replicated to 3
    channels. **INFERRED** choice, not the image's own maximum: a fixed scale keeps intensities comparable
    between images (a per-image stretch would make a uniformly brighter defective part look like a normal
    one, and would amplify the noise of dark images); an 8-bit image and its 16-bit copy (``v * 257``) give the
    same tensor. Consequence: 12-bit data stored in 16-bit files (max 4095) reads as dark (max 0.0625);
    normalise such data to the full 16-bit range before training, or rely on the model's normalisation.

    Every other mode (8-bit grayscale, palette, RGB, RGBA, 16-bit RGB which Pillow reduces to 8 bits, ...) is
    read exactly as anomalib reads it. Floating-point images (mode ``F``) are refused with a ``DatasetError``.

    Args:
        path: Image file.
        as_tensor: Return a ``torchvision.tv_tensors.Image`` (3, H, W) float32 (as anomalib), else an (H, W, 3)
            float64 NumPy array.

    Raises:
        DatasetError: Floating-point image, or a 32-bit integer image with values outside 0..65535.
    """
    with Image.open(path) as image:
        if image.mode in REFUSED_MODES:
            raise refused_mode_error(path, image.mode)
        if image.mode not in WIDE_MODES:
            rgb = image.convert("RGB")
            return to_dtype(to_image(rgb), torch.float32, scale=True) if as_tensor else np.array(rgb) / 255.0
        gray = _wide_to_unit(np.asarray(image), path)
    if as_tensor:
        return ImageTensor(torch.from_numpy(gray).unsqueeze(0).repeat(3, 1, 1))
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float64)


def _wrap_read_error(paths: Sequence[str], error: Exception, where: str) -> DatasetError:
    return DatasetError(
        f"Could not read {where} ({' / '.join(paths)}): {type(error).__name__}: {error}. {REPLACE_HINT}"
    )


class CheckedImageDatasetMixin:
    """Mixin for an ``AnomalibDataset``: 16-bit images read correctly, unreadable files named in the error.

    Put it first in the bases, e.g. ``class MyDataset(CheckedImageDatasetMixin, FolderDataset)``.

    ``__getitem__`` is anomalib 2.7's ``AnomalibDataset.__getitem__`` (same item, same augmentation calls) with
    the image read by :func:`read_image` instead of anomalib's, which reads 16-bit images as white; the tests
    compare both on 8-bit data.
    """

    def __getitem__(self, index: int) -> DatasetItem:
        """Load item ``index``; wrap decoding errors with the offending path."""
        assert isinstance(self, AnomalibDataset)
        row = self.samples.iloc[index]
        image_path, label_index = row.image_path, row.label_index
        mask_path = getattr(row, "mask_path", "")
        try:
            image = read_image(image_path, as_tensor=True)
            gt_mask = None
            if self.task == TaskType.SEGMENTATION:
                if label_index == LabelName.NORMAL:
                    gt_mask = Mask(torch.zeros(image.shape[-2:])).to(torch.uint8)
                elif label_index == LabelName.ABNORMAL:
                    gt_mask = read_mask(mask_path, as_tensor=True)
        except DatasetError:
            raise
        except READ_ERRORS as error:
            paths = [str(image_path)] + ([mask_path] if isinstance(mask_path, str) and mask_path else [])
            raise _wrap_read_error(paths, error, f"sample {index}") from error

        if self.augmentations:
            if self.task == TaskType.CLASSIFICATION:
                image = self.augmentations(image)
            elif self.task == TaskType.SEGMENTATION:
                temp_mask = gt_mask if gt_mask is not None else Mask(torch.zeros(image.shape[-2:])).to(torch.uint8)
                image, augmented_mask = self.augmentations(image, temp_mask)
                if gt_mask is not None:
                    gt_mask = augmented_mask
        gt_label = None if label_index == LabelName.UNKNOWN else torch.tensor(label_index)
        return ImageItem(image=image, gt_mask=gt_mask, gt_label=gt_label, image_path=image_path, mask_path=mask_path)


class PredictDataset(AnomalibPredictDataset):
    """anomalib's ``PredictDataset`` with :func:`read_image` (16-bit images read correctly) and checked files.

    ``anomalib predict --data <folder>`` builds anomalib's own ``PredictDataset``, which reads 16-bit images as
    white. Use this class instead, from Python (``engine.predict(model, dataset=PredictDataset(folder))``) or
    from the CLI: ``anomalib predict --model ... --ckpt_path ... --data anomalib_recon.data.PredictDataset
    --data.path <folder>``. Every file is checked at construction (:func:`check_image_files`), so a corrupt
    or truncated image fails before the first batch, with its name.

    Args:
        path: An image or a folder of images.
        transform: Transform applied to each image.
        image_size: Unused by anomalib 2.7's ``PredictDataset`` (kept for the same signature).
    """

    def __init__(
        self,
        path: str | Path,
        transform: Transform | None = None,
        image_size: int | tuple[int, int] = (256, 256),
    ) -> None:
        if not Path(path).exists():
            msg = f"Predict path {str(path)!r} does not exist. Pass an image file or a folder of images."
            raise DatasetNotFoundError(msg)
        super().__init__(path=path, transform=transform, image_size=image_size)
        check_image_files(self.image_filenames, what="PredictDataset")

    def __getitem__(self, index: int) -> ImageItem:
        """Read image ``index`` with :func:`read_image` and apply the transform."""
        image_filename = self.image_filenames[index]
        try:
            image = read_image(image_filename, as_tensor=True)
        except DatasetError:
            raise
        except READ_ERRORS as error:
            raise _wrap_read_error([str(image_filename)], error, f"image {index}") from error
        if self.transform:
            image = self.transform(image)
        return ImageItem(image=image, image_path=str(image_filename))
