"""Datamodules and data utilities for anomalib-recon.

* :class:`ELPV`: solar-cell electroluminescence images (``elpv-dataset`` package), image-level labels.
* :class:`MagneticTile`: the Magnetic Tile Defect dataset as a pre-set anomalib ``Folder`` (research-only data).
* :class:`MVTec`: alias of anomalib's ``MVTecAD`` for older docs.
* :class:`MultiCategory`: one model over several categories, with per-category test metrics
  (:class:`PerCategoryMetrics`, :func:`per_category_metrics`).

Importing this package costs nothing beyond ``anomalib.data`` (no dataset package is imported).
"""

from anomalib_recon.data.elpv import ELPV, ELPVDataset, default_elpv_root, make_elpv_dataset
from anomalib_recon.data.magnetic_tile import MAGNETIC_TILE_DEFECTS, MAGNETIC_TILE_ENV, MagneticTile
from anomalib_recon.data.multi_category import (
    MultiCategory,
    MultiCategoryDataset,
    PerCategoryMetrics,
    default_test_metrics,
    mvtec_style_folder,
    per_category_metrics,
)
from anomalib_recon.data.mvtec import MVTec
from anomalib_recon.data.validation import DatasetError, DatasetNotFoundError

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
    "default_elpv_root",
    "default_test_metrics",
    "make_elpv_dataset",
    "mvtec_style_folder",
    "per_category_metrics",
]
