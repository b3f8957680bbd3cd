"""Datamodules and data utilities for anomalib-recon.

* :class:`ELPV`: solar-cell electroluminescence images (``elpv-dataset`` package), image-level labels.
* :class:`MagneticTile`: the Magnetic Tile Defect dataset as a pre-set anomalib ``Folder`` (research-only data).
* :class:`MVTec`: alias of anomalib's ``MVTecAD`` for older docs.
* :class:`MultiCategory`: one model over several categories, with per-category test metrics
  (:class:`PerCategoryMetrics`, :func:`per_category_metrics`).
* :func:`read_image` / :class:`PredictDataset`: anomalib's reader and predict dataset, with 16-bit grayscale
  images read correctly (anomalib reads them as white); all datamodules above load items with it.
* Checks run at ``setup`` by the datamodules: :func:`check_image_files` (unreadable/truncated files in any
  split), :func:`check_mask_folders` (defect images without masks), :func:`check_masks` (mask size differs).

Importing this package costs nothing beyond ``anomalib.data`` (no dataset package is imported).
"""

from anomalib_recon.data.elpv import ELPV, ELPVDataset, default_elpv_root, make_elpv_dataset
from anomalib_recon.data.magnetic_tile import MAGNETIC_TILE_DEFECTS, MAGNETIC_TILE_ENV, MagneticTile
from anomalib_recon.data.multi_category import MultiCategory, MultiCategoryDataset, mvtec_style_folder
from anomalib_recon.data.mvtec import MVTec
from anomalib_recon.data.per_category import PerCategoryMetrics, default_test_metrics, per_category_metrics
from anomalib_recon.data.reading import PredictDataset, read_image
from anomalib_recon.data.validation import (
    DatasetError,
    DatasetNotFoundError,
    check_image_files,
    check_mask_folders,
    check_masks,
    check_synthetic_val_split,
)

__all__ = [
    "ELPV",
    "MAGNETIC_TILE_DEFECTS",
    "MAGNETIC_TILE_ENV",
    "DatasetError",
    "DatasetNotFoundError",
    "ELPVDataset",
    "MVTec",
    "MagneticTile",
    "MultiCategory",
    "MultiCategoryDataset",
    "PerCategoryMetrics",
    "PredictDataset",
    "check_image_files",
    "check_mask_folders",
    "check_masks",
    "check_synthetic_val_split",
    "default_elpv_root",
    "default_test_metrics",
    "make_elpv_dataset",
    "mvtec_style_folder",
    "per_category_metrics",
    "read_image",
]
