"""Early, readable errors for bad datasets: the checks the datamodules run before any training step.

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
* :func:`check_synthetic_val_split`: anomalib's synthetic validation split cannot read 16-bit training images.

Reading the images (16-bit grayscale included) is :mod:`anomalib_recon.data.reading`; the image modes and read
errors it shares with these checks are defined here (:data:`WIDE_MODES`, :data:`REFUSED_MODES`,
:data:`READ_ERRORS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
from anomalib import TaskType
from anomalib.data.utils import LabelName
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "check_image_files",
    "check_mask_folders",
    "check_masks",
    "check_synthetic_val_split",
    "require_dir",
]

WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
"""Pillow modes of 16-bit grayscale files (PNG, TIFF, PGM). ``"I"`` (32-bit integer) is what some Pillow versions
and TIFF readers return for them; its values are checked to be in 0..65535 when read."""
REFUSED_MODES = frozenset({"F"})
"""Modes without a defined value range: refused with a message instead of being clipped to white."""
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What Pillow raises for an unreadable, truncated or corrupt file."""
REPLACE_HINT = "Replace the file with a valid image or delete it."


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


def refused_mode_error(path: str | Path, mode: str) -> DatasetError:
    """A :class:`DatasetError` for a floating-point image (``F`` mode), which has no defined value range."""
    return DatasetError(
        f"{str(path)!r} is a {mode!r}-mode (floating-point) image, which has no defined value range. "
        "Save it as an 8-bit or 16-bit PNG (values scaled to the full range) and retry."
    )


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

    Also refuses floating-point images (``F`` mode), which
    :func:`~anomalib_recon.data.reading.read_image` cannot scale.

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
        except READ_ERRORS as error:
            msg = (
                f"{what}: {str(path)!r} is not a readable image, truncated or corrupt ({type(error).__name__}: "
                f"{error}). {REPLACE_HINT}"
            )
            raise DatasetError(msg) from error
        if mode in REFUSED_MODES:
            raise DatasetError(f"{what}: {refused_mode_error(path, mode)}")
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
