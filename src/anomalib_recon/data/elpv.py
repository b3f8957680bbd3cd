"""ELPV: electroluminescence images of solar-cell modules, as a one-class anomaly-detection datamodule.

The data come from the ``elpv-dataset`` PyPI package (``pip install "anomalib-recon[data]"``): 2,624 grayscale
300×300 PNG cells (1,074 mono-crystalline, 1,550 poly-crystalline), each with an expert defect probability
in {0, 1/3, 2/3, 1}. There are no pixel masks, so the task is classification and pixel metrics are skipped.

License: the images are CC BY-NC-SA 4.0 (non-commercial). Cite Buerhop-Lutz et al., "A Benchmark for Visual
Identification of Defective Solar Cells in Electroluminescence Imagery", EU PVSEC 2018, and Deitsch et al.,
"Automatic classification of defective photovoltaic module cells in electroluminescence images", Solar Energy
185 (2019) 455-468.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_recon.data.reading import CheckedImageDatasetMixin
from anomalib_recon.data.validation import (
    DatasetError,
    DatasetNotFoundError,
    check_image_files,
    check_synthetic_val_split,
    require_dir,
)

__all__ = ["ELPV", "ELPVDataset", "default_elpv_root", "make_elpv_dataset"]

logger = logging.getLogger(__name__)

CellType = Literal["mono", "poly", "both"]
_CELL_TYPES = ("mono", "poly")
_INSTALL_HINT = 'Install it with `pip install "anomalib-recon[data]"` (or `pip install elpv-dataset`), or pass root=.'
# Defect probabilities are multiples of 1/3 stored as decimals; compare with a tolerance so that
# defect_threshold=0.6667 still selects the 2/3 cells.
_PROB_TOL = 1e-3


def default_elpv_root() -> Path:
    """Return the data folder of the installed ``elpv-dataset`` package (``labels.csv`` + ``images/``).

    Raises:
        ModuleNotFoundError: ``elpv-dataset`` is not installed.
    """
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        msg = f"The ELPV datamodule needs the `elpv-dataset` package, which is not installed. {_INSTALL_HINT}"
        raise ModuleNotFoundError(msg, name="elpv_dataset")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_labels(root: Path) -> pd.DataFrame:
    """Read ``root/labels.csv`` (whitespace separated: path, defect probability, cell type)."""
    root = require_dir(root, "ELPV root", f"It must contain labels.csv and images/. {_INSTALL_HINT}")
    labels_file = root / "labels.csv"
    if not labels_file.is_file():
        msg = f"ELPV root {str(root)!r} has no labels.csv. Point root= at the elpv_dataset/data folder."
        raise DatasetNotFoundError(msg)
    try:
        table = pd.read_csv(labels_file, sep=r"\s+", header=None, names=["path", "probability", "type"])
        table["probability"] = table["probability"].astype(float)
    except (ValueError, pd.errors.ParserError) as error:
        msg = f"{str(labels_file)!r} is not an ELPV label file (expected 'path probability mono|poly' rows): {error}"
        raise DatasetError(msg) from error
    if table.empty or not table["type"].isin(_CELL_TYPES).all() or table["probability"].isna().any():
        msg = f"{str(labels_file)!r} is not an ELPV label file (expected 'path probability mono|poly' rows)."
        raise DatasetError(msg)
    return table


def _seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``n`` and ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _validate_args(
    cell_type: str,
    defect_threshold: float,
    test_split_ratio: float,
    max_train_images: int | None,
    max_test_images: int | None,
    seed: int,
) -> None:
    if cell_type not in (*_CELL_TYPES, "both"):
        msg = f"cell_type must be 'mono', 'poly' or 'both', got {cell_type!r}."
        raise ValueError(msg)
    if not 0.0 < defect_threshold <= 1.0:
        msg = f"defect_threshold must be in (0, 1], got {defect_threshold}."
        raise ValueError(msg)
    if not 0.0 < test_split_ratio < 1.0:
        msg = f"test_split_ratio must be in (0, 1), got {test_split_ratio}."
        raise ValueError(msg)
    if max_train_images is not None and max_train_images < 1:
        msg = f"max_train_images must be None or >= 1, got {max_train_images}."
        raise ValueError(msg)
    if max_test_images is not None and max_test_images < 2:
        msg = f"max_test_images must be None or >= 2 (one normal and one defective cell), got {max_test_images}."
        raise ValueError(msg)
    if not isinstance(seed, int) or isinstance(seed, bool):
        msg = f"seed must be an int (the ELPV split is always seeded), got {seed!r}."
        raise TypeError(msg)


def make_elpv_dataset(
    root: str | Path,
    cell_type: CellType = "both",
    defect_threshold: float = 0.5,
    include_uncertain: bool = False,
    test_split_ratio: float = 0.2,
    seed: int = 0,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
    split: str | Split | None = None,
) -> pd.DataFrame:
    """Build the anomalib samples table for ELPV (see :class:`ELPV` for the label rule and the split).

    Returns:
        DataFrame with anomalib's columns ``image_path, label, label_index, mask_path, split`` plus
        ``cell_type`` and ``defect_probability``; ``attrs["task"] == "classification"``.
    """
    _validate_args(cell_type, defect_threshold, test_split_ratio, max_train_images, max_test_images, seed)

    root = Path(root).expanduser()
    table = _read_labels(root)
    types = _CELL_TYPES if cell_type == "both" else (cell_type,)
    table = table[table["type"].isin(types)].sort_values("path", ignore_index=True)

    prob = table["probability"]
    normal = prob <= _PROB_TOL
    defective = prob >= defect_threshold - _PROB_TOL
    uncertain = ~normal & ~defective
    anomalous = defective | uncertain if include_uncertain else defective

    # Normal cells: a seeded split per cell type, so the mono part of cell_type="both" equals cell_type="mono".
    split_col = pd.Series(pd.NA, index=table.index, dtype="object")
    for ctype in types:
        index = table.index[normal & (table["type"] == ctype)]
        order = [index[i] for i in _seeded_order(len(index), seed)]
        n_test = round(test_split_ratio * len(index))
        split_col[order[:n_test]] = Split.TEST.value
        split_col[order[n_test:]] = Split.TRAIN.value
    split_col[anomalous] = Split.TEST.value

    samples = pd.DataFrame(
        {
            "image_path": [str(root / p) for p in table["path"]],
            "label": ["defective" if a else "normal" for a in anomalous],
            "label_index": [int(LabelName.ABNORMAL) if a else int(LabelName.NORMAL) for a in anomalous],
            "mask_path": "",
            "split": split_col,
            "cell_type": table["type"],
            "defect_probability": prob,
        }
    )
    samples = samples[samples["split"].notna()].reset_index(drop=True)  # drops excluded "uncertain" cells

    def take(frame: pd.DataFrame, n: int | None) -> pd.DataFrame:
        if n is None or n >= len(frame):
            return frame
        return frame.iloc[sorted(_seeded_order(len(frame), seed)[:n])]

    train = take(samples[samples["split"] == Split.TRAIN.value], max_train_images)
    test = samples[samples["split"] == Split.TEST.value]
    if max_test_images is not None and max_test_images < len(test):
        test_normal = test[test["label_index"] == LabelName.NORMAL]
        test_anomalous = test[test["label_index"] == LabelName.ABNORMAL]
        n_anomalous = round(max_test_images * len(test_anomalous) / len(test))
        n_anomalous = min(max(n_anomalous, 1), len(test_anomalous), max_test_images - 1)
        test = pd.concat([take(test_normal, max_test_images - n_anomalous), take(test_anomalous, n_anomalous)])
    samples = pd.concat([train, test]).sort_values("image_path", ignore_index=True)

    counts = {s: int((samples["split"] == s).sum()) for s in (Split.TRAIN.value, Split.TEST.value)}
    if counts[Split.TRAIN.value] == 0 or not (samples["label_index"] == LabelName.ABNORMAL).any():
        msg = (
            f"ELPV with cell_type={cell_type!r}, defect_threshold={defect_threshold} gives {counts} images "
            "(train, test): nothing to train or no defective test cells. Check root and the arguments."
        )
        raise DatasetError(msg)

    missing = [path for path in samples["image_path"] if not Path(path).is_file()]
    if missing:
        msg = (
            f"ELPV: {len(missing)} image file(s) listed in labels.csv are missing, e.g. {missing[0]!r}. "
            f"Restore {root / 'images'} (reinstall elpv-dataset) or point root= at a complete copy."
        )
        raise DatasetNotFoundError(msg)
    samples.attrs["task"] = "classification"
    if split is not None:
        split_value = split.value if isinstance(split, Split) else split
        samples = samples[samples["split"] == split_value].reset_index(drop=True)
        samples.attrs["task"] = "classification"
    return samples


class ELPVDataset(CheckedImageDatasetMixin, AnomalibDataset):
    """ELPV solar cells as an anomalib dataset (RGB float images, image-level labels, no masks).

    Args:
        root: Folder holding ``labels.csv`` and ``images/``. ``None``: the installed ``elpv-dataset`` package.
        split: ``"train"``, ``"test"`` or ``None`` (all selected cells).
        augmentations: Transforms applied to each image.
        Other arguments: see :class:`ELPV`.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str | Split | None = None,
        cell_type: CellType = "both",
        defect_threshold: float = 0.5,
        include_uncertain: bool = False,
        test_split_ratio: float = 0.2,
        seed: int = 0,
        max_train_images: int | None = None,
        max_test_images: int | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.root = Path(root) if root is not None else default_elpv_root()
        self.split = split
        self.cell_type = cell_type
        self.samples = make_elpv_dataset(
            self.root,
            cell_type=cell_type,
            defect_threshold=defect_threshold,
            include_uncertain=include_uncertain,
            test_split_ratio=test_split_ratio,
            seed=seed,
            max_train_images=max_train_images,
            max_test_images=max_test_images,
            split=split,
        )


class ELPV(AnomalibDataModule):
    """ELPV solar-cell datamodule: train on normal cells, test on held-out normal + defective cells.

    Label rule (per cell, from the expert defect probability ``p`` in ``labels.csv``):

    * **normal**: ``p == 0``. Only these are used for training.
    * **anomalous**: ``p >= defect_threshold``. The default 0.5 keeps the 2/3 ("probably defective") and 1
      ("defective") cells, the same cut as rounding ``p`` to the nearer class.
    * **uncertain**: ``0 < p < defect_threshold`` (with the default, the 1/3 "possibly defective" cells). They
      are neither clean enough to train on nor certain defects, so by default they are **left out of every
      split**, which keeps label noise out of the test metrics. ``include_uncertain=True`` adds them to the
      test set as anomalous.

    Split: the normal cells of each cell type are shuffled with ``seed`` (a ``torch.Generator`` permutation
    of the cells sorted by file name) and ``round(test_split_ratio * n)`` of them go to test, the rest to
    train. The split is per type, so the mono cells of ``cell_type="both"`` are split exactly as with
    ``cell_type="mono"``. All anomalous cells go to test. With the defaults: mono 470 train / 118 + 369 test,
    poly 736 train / 184 + 452 test, both 1,206 train / 302 + 821 test (normal + defective).

    Validation: ``val_split_mode="same_as_test"`` by default, as in anomalib's ``MVTecAD``. The validation set
    only calibrates the post-processor (min-max normalisation and the F1-adaptive threshold); splitting the
    test set instead (``from_test``) would halve its already small normal part. Threshold-free metrics
    (image_AUROC) do not depend on this choice; image_F1Score is then optimistic, as on MVTec AD.

    Args:
        root: Folder with ``labels.csv`` and ``images/``. ``None`` (default): the data folder of the installed
            ``elpv-dataset`` package; without it a ``ModuleNotFoundError`` says how to install it.
        cell_type: ``"mono"``, ``"poly"`` or ``"both"`` (default). Also used as the datamodule ``category``
            (results go to ``results/<model>/ELPV/<cell_type>/``).
        defect_threshold: Smallest defect probability counted as anomalous, in (0, 1]. Default ``0.5``.
        include_uncertain: Put cells with ``0 < p < defect_threshold`` in the test set as anomalous.
            Default ``False`` (they are excluded).
        test_split_ratio: Fraction of the normal cells held out for testing. Default ``0.2``.
        max_train_images: Use at most this many training cells (a seeded subset), for quick runs.
        max_test_images: Use at most this many test cells (a seeded subset keeping the normal/defective
            proportion, at least one of each), for quick runs.
        train_batch_size: Training batch size. Default ``32``.
        eval_batch_size: Validation/test batch size. Default ``32``.
        num_workers: Dataloader workers. Default ``8``.
        train_augmentations: Augmentations for training images.
        val_augmentations: Augmentations for validation images.
        test_augmentations: Augmentations for test images.
        augmentations: Augmentations for any split without its own.
        val_split_mode: How the validation set is made (anomalib ``ValSplitMode``). Default ``same_as_test``.
        val_split_ratio: Fraction used by ``from_test``/``from_train``/``synthetic`` validation modes.
        seed: Seed of the normal-cell split, the subsets and anomalib's validation split. Default ``0``.

    Example:
        >>> datamodule = ELPV(cell_type="mono", max_train_images=64)
        >>> datamodule.setup()
        >>> batch = next(iter(datamodule.train_dataloader()))
        >>> batch.image.shape  # (B, 3, 300, 300) float in [0, 1]

        CLI: ``anomalib train --model Padim --data anomalib_recon.data.ELPV --data.cell_type mono``.

    License and citation: see the module docstring (images are CC BY-NC-SA 4.0).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        cell_type: CellType = "both",
        defect_threshold: float = 0.5,
        include_uncertain: bool = False,
        test_split_ratio: float = 0.2,
        max_train_images: int | None = None,
        max_test_images: int | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        _validate_args(cell_type, defect_threshold, test_split_ratio, max_train_images, max_test_images, seed)
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            # The test split (held-out normal + defective cells) is built by make_elpv_dataset.
            test_split_mode=TestSplitMode.FROM_DIR,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.root = Path(root).expanduser() if root is not None else default_elpv_root()
        self.cell_type = cell_type
        self.defect_threshold = defect_threshold
        self.include_uncertain = include_uncertain
        self.max_train_images = max_train_images
        self.max_test_images = max_test_images
        self.category = cell_type

    def prepare_data(self) -> None:
        """Check that ``root`` holds the ELPV files (nothing is downloaded)."""
        _read_labels(self.root)

    def _dataset(self, split: Split) -> ELPVDataset:
        return ELPVDataset(
            root=self.root,
            split=split,
            cell_type=self.cell_type,
            defect_threshold=self.defect_threshold,
            include_uncertain=self.include_uncertain,
            test_split_ratio=self.test_split_ratio,
            seed=self.seed,
            max_train_images=self.max_train_images,
            max_test_images=self.max_test_images,
        )

    def _setup(self, _stage: str | None = None) -> None:
        """Build the train and test sets and check every file of both (the validation set is drawn from them).

        ``check_image_files`` costs 0.2-0.8 s on all 2,624 cells with a warm file cache (CRC of every PNG
        chunk, which catches truncated files); 16-bit cells would be read correctly (``read_image``).
        """
        self.train_data = self._dataset(Split.TRAIN)
        self.test_data = self._dataset(Split.TEST)
        check_image_files([*self.train_data.samples["image_path"], *self.test_data.samples["image_path"]], what="ELPV")
        check_synthetic_val_split(self.val_split_mode, self.train_data.samples["image_path"], what="ELPV")
        test_labels = self.test_data.samples["label_index"]
        logger.info(
            "ELPV cell_type=%s seed=%s defect_threshold=%s include_uncertain=%s: train %d normal, "
            "test %d normal + %d defective",
            self.cell_type,
            self.seed,
            self.defect_threshold,
            self.include_uncertain,
            len(self.train_data),
            int((test_labels == LabelName.NORMAL).sum()),
            int((test_labels == LabelName.ABNORMAL).sum()),
        )
