"""Early, readable errors for bad dataset roots and unreadable images.

anomalib reports a missing folder or a corrupt file late (inside a dataloader worker) or not at all (a split
with zero images). The datamodules of this package call these checks in ``prepare_data``/``setup`` so a
user sees one message that names the path and says what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from anomalib.data.dataclasses import DatasetItem
from anomalib.data.datasets.base.image import AnomalibDataset
from PIL import Image, UnidentifiedImageError

__all__ = ["CheckedImageDatasetMixin", "DatasetError", "DatasetNotFoundError", "check_image_files", "require_dir"]


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


def check_image_files(paths: Iterable[str | Path], what: str = "dataset") -> None:
    """Open every image's header (and verify PNG checksums) so a corrupt file fails now, not mid-epoch.

    Costs about 0.15 ms per image (2,624 ELPV cells: about 0.4 s).

    Raises:
        DatasetNotFoundError: A listed file is missing.
        DatasetError: A file is not a readable image.
    """
    for path in paths:
        path = Path(path)
        if not path.is_file():
            msg = f"{what}: image file {str(path)!r} is missing. Restore it or remove it from the dataset."
            raise DatasetNotFoundError(msg)
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            msg = (
                f"{what}: {str(path)!r} is not a readable image ({type(error).__name__}: {error}). "
                "Replace the file with a valid image or delete it."
            )
            raise DatasetError(msg) from error


class CheckedImageDatasetMixin:
    """Mixin for an ``AnomalibDataset`` subclass: a file that fails to load raises ``DatasetError`` naming it.

    Put it first in the bases, e.g. ``class MyDataset(CheckedImageDatasetMixin, FolderDataset)``.
    """

    def __getitem__(self, index: int) -> DatasetItem:
        """Load item ``index``; wrap decoding errors with the offending path."""
        try:
            return super().__getitem__(index)  # type: ignore[misc]
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            assert isinstance(self, AnomalibDataset)
            row = self.samples.iloc[index]
            paths = [str(row.image_path)]
            mask_path = getattr(row, "mask_path", "")
            if isinstance(mask_path, str) and mask_path:
                paths.append(mask_path)
            msg = (
                f"Could not read sample {index} ({' / '.join(paths)}): {type(error).__name__}: {error}. "
                "Replace the file with a valid image or delete it."
            )
            raise DatasetError(msg) from error
