"""Early, readable errors for bad datasets, and an image reader that handles 16-bit images.

anomalib reports a missing folder or a corrupt file late (inside a dataloader worker, after training) or not at
all (a split with zero images, a mask stretched to a differently sized image, a 16-bit image read as all white).
The datamodules of this package call these checks in ``prepare_data``/``setup`` so that a user sees one
message that names the file(s) and says what to do, before any training step:

* :func:`check_image_files`: every image and mask of every split opens, is not truncated, and has a mode we
  can read (cost measured below).
* :func:`check_mask_folders`: every defect image has a mask and every mask an image (before anomalib pairs them
  by sorted position, which fails deep in pandas/NumPy when one is missing).
* :func:`check_masks`: every (image, mask) pair of a segmentation split has the same size (anomalib would
  silently resize the mask to the image).

:func:`read_image` is anomalib's ``read_image`` plus 16-bit grayscale (see its docstring for the scaling);
:class:`CheckedImageDatasetMixin` loads items with it, and :class:`PredictDataset` is anomalib's
``PredictDataset`` with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data import PredictDataset as AnomalibPredictDataset
from anomalib.data.dataclasses import DatasetItem, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, read_mask
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2.functional import to_dtype, to_image
from torchvision.tv_tensors import Image as ImageTensor
from torchvision.tv_tensors import Mask

__all__ = [
    "CheckedImageDatasetMixin",
    "DatasetError",
    "DatasetNotFoundError",
    "PredictDataset",
    "check_image_files",
    "check_mask_folders",
    "check_masks",
    "check_synthetic_val_split",
    "read_image",
    "require_dir",
]

# Pillow modes of 16-bit grayscale files (PNG, TIFF, PGM). ``"I"`` (32-bit integer) is what some Pillow
# versions and TIFF readers return for them; its values are checked to be in 0..65535 when read.
WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Modes without a defined value range: refused with a message instead of being clipped to white.
_REFUSED_MODES = frozenset({"F"})
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
_REPLACE = "Replace the file with a valid image or delete it."


class DatasetError(ValueError):
    """A dataset root, split or file cannot be used as given."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset root, folder or file does not exist (also a ``FileNotFoundError``)."""


def require_dir(path: str | Path, what: str, hint: str = "") -> Path:
    """Return ``path`` as a ``Path`` if it is an existing directory, else raise ``DatasetNotFoundError``.

    Args:
        path: Directory to check.
        what: Human name of the directory, used in the message (e.g. ``"ELPV root"``).
        hint: Extra sentence telling the user what to do.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        msg = f"{what} {str(path)!r} {state}. {hint}".strip()
        raise DatasetNotFoundError(msg)
    return path


# --------------------------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------------------------
def _refused_mode_error(path: str | Path, mode: str) -> DatasetError:
    return DatasetError(
        f"{str(path)!r} is a {mode!r}-mode (floating-point) image, which has no defined value range. "
        "Save it as an 8-bit or 16-bit PNG (values scaled to the full range) and retry."
    )


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
        if image.mode in _REFUSED_MODES:
            raise _refused_mode_error(path, image.mode)
        if image.mode not in WIDE_MODES:
            rgb = image.convert("RGB")
            return to_dtype(to_image(rgb), torch.float32, scale=True) if as_tensor else np.array(rgb) / 255.0
        gray = _wide_to_unit(np.asarray(image), path)
    if as_tensor:
        return ImageTensor(torch.from_numpy(gray).unsqueeze(0).repeat(3, 1, 1))
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# Checks run at setup
# --------------------------------------------------------------------------------------------------------------
def _jpeg_complete(path: Path) -> bool:
    """True if the file ends with a JPEG end-of-image marker (``FFD9``) in its last 64 bytes.

    In the entropy-coded data an ``FF`` byte is always followed by ``00`` or a restart marker, so ``FFD9`` near
    the end means the file was written completely; a file cut short almost never ends with it.
    """
    with path.open("rb") as file:
        file.seek(0, 2)
        size = file.tell()
        file.seek(max(0, size - 64))
        return b"\xff\xd9" in file.read()


def check_image_files(
    paths: Iterable[str | Path],
    what: str = "dataset",
    decode: Literal["auto", "all"] = "auto",
) -> dict[str, tuple[int, int]]:
    """Check that every image can be read in full, so a bad file fails at setup, not mid-run.

    With ``decode="auto"`` (default) each file's header is opened and:

    * PNG: ``verify()`` reads every chunk and checks its CRC, which catches corrupt and truncated files;
    * JPEG: ``verify()`` checks nothing, so the file must end with the end-of-image marker; if it does not,
      the image is decoded in full (a truncated JPEG then fails as it would during training);
    * other formats (BMP, TIFF, WebP, ...): decoded in full.

    ``decode="all"`` decodes every file in full (also catches corrupt data inside a complete file).

    Cost, measured on this project's shared 2-core machine, warm file cache, the range being light to heavy
    load (``python /tmp/measure_setup.py``, see the data report): ELPV, 2,624 PNG cells: ``"auto"`` 0.2-0.8 s,
    ``"all"`` 3.6-7.9 s; Magnetic Tile, 1,344 JPEGs + 392 PNG masks: ``"auto"`` 0.1-0.3 s, ``"all"``
    1.6-2.6 s (all its JPEGs end with the marker, so none is decoded by ``"auto"``). Reading a dataset from a
    cold disk the first time costs 2-7 s more whichever mode is used (anomalib reads the files again later).
    Hence the default ``"auto"``: it catches truncated files at a small fraction of a full decode.

    Also refuses floating-point images (``F`` mode), which :func:`read_image` cannot scale.

    Args:
        paths: Image (and mask) files.
        what: Dataset name used in the messages.
        decode: ``"auto"`` or ``"all"`` (see above).

    Returns:
        ``{str(path): (width, height)}`` for every file, read from the headers (used by :func:`check_masks`).

    Raises:
        DatasetNotFoundError: A listed file is missing.
        DatasetError: A file is not a readable image, is truncated, or is a floating-point image.
    """
    if decode not in ("auto", "all"):
        msg = f"decode must be 'auto' or 'all', got {decode!r}."
        raise ValueError(msg)
    sizes: dict[str, tuple[int, int]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            msg = f"{what}: image file {str(path)!r} is missing. Restore it or remove it from the dataset."
            raise DatasetNotFoundError(msg)
        try:
            with Image.open(path) as image:
                size, mode, image_format = image.size, image.mode, image.format
                if decode == "all" or image_format not in ("PNG", "JPEG"):
                    image.load()
                elif image_format == "PNG":
                    image.verify()
                elif not _jpeg_complete(path):
                    image.load()
        except _READ_ERRORS as error:
            msg = (
                f"{what}: {str(path)!r} is not a readable image, truncated or corrupt ({type(error).__name__}: "
                f"{error}). {_REPLACE}"
            )
            raise DatasetError(msg) from error
        if mode in _REFUSED_MODES:
            raise DatasetError(f"{what}: {_refused_mode_error(path, mode)}")
        sizes[str(path)] = size
    return sizes


def _key(path: Path, folder: Path, strip_mask: bool) -> str:
    """Relative path without suffix (and without a ``_mask`` stem suffix for masks): the pairing key."""
    rel = path.relative_to(folder).with_suffix("")
    name = rel.name[: -len("_mask")] if strip_mask and rel.name.endswith("_mask") else rel.name
    return str(rel.with_name(name))


def _files(folder: Path, extensions: Sequence[str] | None) -> list[Path]:
    suffixes = {e.lower() for e in (IMG_EXTENSIONS if extensions is None else extensions)}
    return sorted(f for f in folder.glob("**/*") if f.suffix.lower() in suffixes and f.is_file())


def check_mask_folders(
    pairs: Iterable[tuple[str | Path, str | Path]],
    extensions: Sequence[str] | None = None,
    what: str = "dataset",
) -> None:
    """Check that each defect image has a mask and each mask an image, before anomalib pairs them.

    anomalib's ``Folder``/``MVTecAD`` pair the sorted defect images with the sorted masks by position: one
    missing mask fails deep in pandas ("Must have equal len keys and value...") without naming a file. A mask
    pairs with the image of the same relative path whose name is the mask's name without its suffix and
    without a trailing ``_mask`` (``crack/000.jpg`` ↔ ``crack/000_mask.png`` or ``crack/000.png``).

    Args:
        pairs: ``(defect image folder, mask folder)`` pairs (searched recursively, as anomalib does).
        extensions: Image file suffixes to consider (e.g. ``(".png", ".jpg")``). ``None``: anomalib's default
            (torchvision's ``IMG_EXTENSIONS``), as for ``Folder``.
        what: Dataset name used in the messages.

    Raises:
        DatasetError: A defect image without a mask or a mask without an image.
    """
    for image_dir, mask_dir in pairs:
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        images = {_key(f, image_dir, strip_mask=False): f for f in _files(image_dir, extensions)}
        if not images:
            continue  # an empty image folder is reported by the dataset itself ("Found 0 ... images")
        masks = {_key(f, mask_dir, strip_mask=True): f for f in _files(mask_dir, extensions)}
        missing = [images[k] for k in images if k not in masks]
        if missing:
            example = missing[0]
            msg = (
                f"{what}: {len(missing)} defect image(s) have no mask, e.g. {str(example)!r}: expected "
                f"{example.stem}_mask.png (or {example.stem}.png) in {str(mask_dir)!r}. Add the missing mask(s) "
                "(all-zero if the defect is not visible) or move the image(s) out of the defect folder."
            )
            raise DatasetError(msg)
        orphans = [masks[k] for k in masks if k not in images]
        if orphans:
            msg = (
                f"{what}: {len(orphans)} mask(s) have no defect image, e.g. {str(orphans[0])!r} (no "
                f"{_key(orphans[0], mask_dir, strip_mask=True)}.* in {str(image_dir)!r}). Delete the mask(s) or "
                "restore the image(s)."
            )
            raise DatasetError(msg)


def check_masks(samples: pd.DataFrame, sizes: dict[str, tuple[int, int]], what: str = "dataset") -> None:
    """Check the (image, mask) pairs of a segmentation samples table: each defect image has a mask of its size.

    anomalib resizes a mask to its image without a word, so a mask from another image or another resolution
    trains and scores against the wrong pixels.

    Args:
        samples: anomalib samples table (``image_path``, ``mask_path``, ``label_index``; ``attrs["task"]``).
            Tables whose task is not segmentation are not checked.
        sizes: ``{path: (width, height)}`` for the images and masks (from :func:`check_image_files`); a path not
            in it is read from its header.
        what: Dataset name used in the messages.

    Raises:
        DatasetError: A defect image without a mask, or a mask whose size differs from its image's.
    """
    if samples.attrs.get("task") != TaskType.SEGMENTATION.value or "mask_path" not in samples:
        return

    def size_of(path: str) -> tuple[int, int]:
        if path not in sizes:
            with Image.open(path) as image:
                sizes[path] = image.size
        return sizes[path]

    abnormal = samples[samples["label_index"] == LabelName.ABNORMAL]
    for image_path, mask_path in zip(abnormal["image_path"], abnormal["mask_path"], strict=True):
        image_path = str(image_path)
        if not isinstance(mask_path, str) or not mask_path:
            msg = (
                f"{what}: defect image {image_path!r} has no mask while the split is a segmentation split. "
                "Add its mask (all-zero if the defect is not visible) or move the image out of the test set."
            )
            raise DatasetError(msg)
        image_size, mask_size = size_of(image_path), size_of(mask_path)
        if image_size != mask_size:
            msg = (
                f"{what}: mask {mask_path!r} is {mask_size[0]}x{mask_size[1]} (width x height) but its image "
                f"{image_path!r} is {image_size[0]}x{image_size[1]}; anomalib would stretch the mask over the "
                "image. Save the mask at the image's size (or check that it belongs to this image)."
            )
            raise DatasetError(msg)


def check_synthetic_val_split(val_split_mode: str, train_paths: Iterable[str | Path], what: str = "dataset") -> None:
    """Refuse ``val_split_mode="synthetic"`` with 16-bit training images.

    anomalib's ``SyntheticAnomalyDataset`` builds the validation images from the training images with its own
    ``read_image``, which reads 16-bit images as white; that cannot be fixed from this package.

    Raises:
        DatasetError: Synthetic validation and at least one 16-bit training image (named).
    """
    if str(getattr(val_split_mode, "value", val_split_mode)) != "synthetic":
        return
    for path in train_paths:
        with Image.open(path) as image:
            if image.mode in WIDE_MODES:
                msg = (
                    f"{what}: val_split_mode='synthetic' makes validation images with anomalib's reader, which "
                    f"reads 16-bit images such as {str(path)!r} as white. Use val_split_mode='same_as_test' or "
                    "'from_test', or convert the images to 8 bits."
                )
                raise DatasetError(msg)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------
def _wrap_read_error(paths: Sequence[str], error: Exception, where: str) -> DatasetError:
    return DatasetError(f"Could not read {where} ({' / '.join(paths)}): {type(error).__name__}: {error}. {_REPLACE}")


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
        except _READ_ERRORS as error:
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
        except _READ_ERRORS as error:
            raise _wrap_read_error([str(image_filename)], error, f"image {index}") from error
        if self.transform:
            image = self.transform(image)
        return ImageItem(image=image, image_path=str(image_filename))
