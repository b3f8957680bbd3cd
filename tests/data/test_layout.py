"""Each public data name lives in one module: reading vs checks, datamodule vs per-category metrics."""

from __future__ import annotations

import importlib

import anomalib_recon.data as data

MODULES = ("elpv", "magnetic_tile", "multi_category", "mvtec", "per_category", "reading", "validation")


def test_every_public_name_has_exactly_one_home():
    homes: dict[str, list[str]] = {}
    for name in MODULES:
        module = importlib.import_module(f"anomalib_recon.data.{name}")
        for public in getattr(module, "__all__", []):
            homes.setdefault(public, []).append(name)
    assert {name: places for name, places in homes.items() if len(places) > 1} == {}
    assert set(data.__all__) <= set(homes)  # the package re-exports only names a module owns
    assert homes["read_image"] == homes["PredictDataset"] == homes["CheckedImageDatasetMixin"] == ["reading"]
    assert homes["check_image_files"] == homes["DatasetError"] == homes["require_dir"] == ["validation"]
    assert (
        homes["PerCategoryMetrics"]
        == homes["per_category_metrics"]
        == homes["default_test_metrics"]
        == ["per_category"]
    )
    assert homes["MultiCategory"] == ["multi_category"]
