"""One model for several categories: a union training set, and the category of every image it loads.

anomalib's batches carry no category field, but they carry ``image_path``. :class:`MultiCategory` records the
category of every image path it loads (:meth:`MultiCategory.category_of`) and attaches a
:class:`~anomalib_recon.data.per_category.PerCategoryMetrics` callback to the trainer, which scores the test
predictions per category and on average (:mod:`anomalib_recon.data.per_category`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from anomalib import TaskType
from anomalib.data import Folder, MVTecAD
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.errors import MisMatchError
from anomalib.data.utils import TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_recon.data.per_category import MEAN_KEY, PerCategoryMetrics
from anomalib_recon.data.reading import CheckedImageDatasetMixin
from anomalib_recon.data.validation import (
    DatasetError,
    DatasetNotFoundError,
    check_image_files,
    check_mask_folders,
    check_masks,
    check_synthetic_val_split,
    require_dir,
)

__all__ = ["MultiCategory", "MultiCategoryDataset", "mvtec_style_folder"]

logger = logging.getLogger(__name__)

_MVTEC_LAYOUT = (
    "Expected MVTec-style layout: <root>/<category>/train/good/*, <root>/<category>/test/good/*, "
    "<root>/<category>/test/<defect>/* and optionally <root>/<category>/ground_truth/<defect>/<stem>_mask.png."
)


# --------------------------------------------------------------------------------------------------------------
# Union dataset and datamodule
# --------------------------------------------------------------------------------------------------------------
class MultiCategoryDataset(CheckedImageDatasetMixin, AnomalibDataset):
    """Union of several anomalib image datasets, with a ``category`` column in ``samples``.

    The task is segmentation only if every part is; otherwise masks are dropped (classification).

    Args:
        parts: ``(category, dataset)`` pairs.
        augmentations: Transforms applied to each image (and mask).
        name: Dataset name.
    """

    def __init__(
        self,
        parts: Sequence[tuple[str, AnomalibDataset]],
        augmentations: Transform | None = None,
        name: str = "MultiCategory",
    ) -> None:
        super().__init__(augmentations=augmentations)
        self._name = name
        if not parts:
            msg = "MultiCategoryDataset needs at least one (category, dataset) pair."
            raise ValueError(msg)
        segmentation = all(dataset.task == TaskType.SEGMENTATION for _, dataset in parts)
        frames = []
        for category, dataset in parts:
            samples = dataset.samples
            mask_path = samples["mask_path"] if "mask_path" in samples else pd.Series("", index=samples.index)
            frames.append(
                pd.DataFrame(
                    {
                        "image_path": samples["image_path"].astype(str),
                        "label": samples["label"].astype(str) if "label" in samples else "",
                        "label_index": samples["label_index"].astype(int),
                        "mask_path": mask_path.fillna("").astype(str) if segmentation else "",
                        "split": samples["split"].astype(str),
                        "category": category,
                    }
                )
            )
        samples = pd.concat(frames, ignore_index=True)
        samples.attrs["task"] = (TaskType.SEGMENTATION if segmentation else TaskType.CLASSIFICATION).value
        self.samples = samples

    @property
    def name(self) -> str:
        """Dataset name."""
        return self._name


def mvtec_style_folder(root: str | Path, category: str) -> Folder:
    """An anomalib ``Folder`` for ``root/category`` in MVTec layout; any image format, masks optional.

    Defect folders are ``test/*`` except ``good``; masks are used only if every defect has a
    ``ground_truth/<defect>`` folder, and then every defect image must have its mask
    (``<stem>_mask.png`` or ``<stem>.png``) and every mask its image (``DatasetError`` naming the file).
    """
    base = require_dir(Path(root).expanduser() / category, f"Category {category!r}: folder", _MVTEC_LAYOUT)
    require_dir(base / "train" / "good", f"Category {category!r}: folder", _MVTEC_LAYOUT)
    test = base / "test"
    defects = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != "good") if test.is_dir() else []
    has_masks = bool(defects) and all((base / "ground_truth" / d).is_dir() for d in defects)
    if has_masks:
        pairs = [(test / d, base / "ground_truth" / d) for d in defects]
        check_mask_folders(pairs, what=f"Category {category!r}")
    elif any((base / "ground_truth" / d).is_dir() for d in defects):
        logger.warning(
            "Category %r: only some defect folders have a ground_truth/<defect> folder; masks are ignored "
            "(classification). Add the missing mask folders to get pixel metrics.",
            category,
        )
    return Folder(
        name=category,
        root=base,
        normal_dir="train/good",
        normal_test_dir="test/good" if (test / "good").is_dir() else None,
        abnormal_dir=[f"test/{d}" for d in defects] or None,
        mask_dir=[f"ground_truth/{d}" for d in defects] if has_masks else None,
        test_split_mode=TestSplitMode.FROM_DIR,
        val_split_mode=ValSplitMode.NONE,
    )


class MultiCategory(AnomalibDataModule):
    """Train one model on the union of several categories; test per category and on average.

    Give either ``datamodules`` (any anomalib image datamodules, e.g. ``MVTecAD``, ``Folder``, ``MagneticTile``,
    ``ELPV``) or ``root`` + ``categories`` (MVTec-style folders ``root/<category>/{train,test,ground_truth}``,
    any image format). Each category is split by its own datamodule (its ``val_split_mode`` is ignored); the
    train set is the union of the train sets, the test set the union of the test sets, and the validation set
    follows this datamodule's ``val_split_mode`` on the union. Children's batch sizes, workers and
    augmentations are ignored: this datamodule's are used.

    During ``engine.test`` a :class:`PerCategoryMetrics` callback (attached in ``setup`` unless
    ``log_per_category_metrics=False``) logs ``<category>/image_AUROC`` etc. and ``mean/image_AUROC`` (unweighted
    mean over categories) next to the pooled metrics.

    Args:
        datamodules: The categories as datamodules. Category names: ``category`` if set, else ``name``.
        root: Root of MVTec-style category folders (with ``categories``).
        categories: Category folder names under ``root``.
        category_names: Names to use instead of the defaults (same length as the categories).
        name: Datamodule name (results go to ``results/<model>/<name>/``). Default: the ``root`` folder's name
            with ``root``, else ``"MultiCategory"``. anomalib's visualizer keeps the part of each image path
            after a folder with this name, so with ``root`` the saved images keep ``<category>/test/<defect>/``;
            with ``datamodules`` it keeps only the last folder, and two categories' images with the same
            ``<defect>/<file>`` name overwrite each other's visualisation (metrics are unaffected).
        log_per_category_metrics: Attach :class:`PerCategoryMetrics` to the trainer. Default ``True``.
        train_batch_size: Training batch size. Default ``32``.
        eval_batch_size: Validation/test batch size. Default ``32``.
        num_workers: Dataloader workers. Default ``8``.
        train_augmentations: Augmentations for training images.
        val_augmentations: Augmentations for validation images.
        test_augmentations: Augmentations for test images.
        augmentations: Augmentations for any split without its own.
        val_split_mode: anomalib ``ValSplitMode`` on the union. Default ``same_as_test`` (as ``MVTecAD``).
        val_split_ratio: Fraction for the ``from_test``/``from_train``/``synthetic`` modes.
        seed: Seed of anomalib's random validation split.

    Attributes:
        categories: The category names used in metric keys, in order (after ``category_names``).

    Example:
        >>> datamodule = MultiCategory(root="./datasets/MVTecAD", categories=["bottle", "cable"])
        >>> engine.train(model, datamodule=datamodule)  # logs bottle/image_AUROC, cable/..., mean/...
    """

    def __init__(
        self,
        datamodules: Sequence[AnomalibDataModule] | None = None,
        root: str | Path | None = None,
        categories: Sequence[str] | None = None,
        category_names: Sequence[str] | None = None,
        name: str | None = None,
        log_per_category_metrics: bool = True,
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
        super().__init__(
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
        if (datamodules is None) == (categories is None) or (categories is not None and root is None):
            msg = "MultiCategory needs exactly one of: datamodules=[...], or root=... with categories=[...]."
            raise ValueError(msg)
        if datamodules is not None:
            datamodules = list(datamodules)
            bad = [type(dm).__name__ for dm in datamodules if not isinstance(dm, AnomalibDataModule)]
            if not datamodules or bad:
                msg = f"datamodules must be a non-empty list of anomalib datamodules, got {bad or 'an empty list'}."
                raise TypeError(msg)
            default_names = [dm.category or dm.name for dm in datamodules]
        else:
            categories = [str(c) for c in categories or []]
            if not categories:
                msg = "categories must name at least one category folder under root."
                raise ValueError(msg)
            default_names = categories
        names = [str(n) for n in category_names] if category_names is not None else default_names
        if len(names) != len(default_names):
            msg = f"category_names has {len(names)} entries for {len(default_names)} categories."
            raise ValueError(msg)
        if len(set(names)) != len(names) or MEAN_KEY in names:
            msg = f"Category names must be unique and not {MEAN_KEY!r}, got {names}; pass category_names=[...]."
            raise ValueError(msg)
        if name is None:
            name = Path(root).expanduser().resolve().name if root is not None else "MultiCategory"
        self._name = name
        self.datamodules = datamodules
        self.root = Path(root).expanduser() if root is not None else None
        self.categories = names
        self._folder_categories = categories
        self.log_per_category_metrics = log_per_category_metrics
        self._category_of: dict[str, str] = {}

    @property
    def name(self) -> str:
        """Datamodule name."""
        return self._name

    def category_of(self, image_path: str) -> str:
        """Category of an image loaded by this datamodule (available after ``setup``)."""
        try:
            return self._category_of[str(image_path)]
        except KeyError:
            msg = f"{image_path!r} is not an image of this MultiCategory datamodule (call setup() first?)."
            raise DatasetError(msg) from None

    def _children(self) -> list[AnomalibDataModule]:
        if self.datamodules is not None:
            return self.datamodules
        assert self.root is not None and self._folder_categories is not None
        require_dir(self.root, "MultiCategory root", _MVTEC_LAYOUT)
        self.datamodules = [mvtec_style_folder(self.root, c) for c in self._folder_categories]
        return self.datamodules

    def prepare_data(self) -> None:
        """Run each category's ``prepare_data`` (e.g. ``MVTecAD`` downloads a missing category)."""
        for category, child in zip(self.categories, self._children(), strict=True):
            with _category_errors(category):
                child.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        train_parts, test_parts = [], []
        for category, child in zip(self.categories, self._children(), strict=True):
            val_split_mode = child.val_split_mode
            child.val_split_mode = ValSplitMode.NONE  # keep the child's whole test set; we split the union
            try:
                _check_child_masks(child, category)
                with _category_errors(category):
                    child.setup()
            finally:
                child.val_split_mode = val_split_mode
            train, test = child.train_data, child.test_data
            if len(train) == 0 or len(test) == 0:
                msg = f"Category {category!r} has {len(train)} train and {len(test)} test images; both must be > 0."
                raise DatasetError(msg)
            if not test.has_anomalous or not test.has_normal:
                logger.warning("Category %r: the test set lacks normal or anomalous images.", category)
            train_parts.append((category, train))
            test_parts.append((category, test))
        self.train_data = MultiCategoryDataset(train_parts, name=self.name)
        self.test_data = MultiCategoryDataset(test_parts, name=self.name)

        lookup: dict[str, str] = {}
        for samples in (self.train_data.samples, self.test_data.samples):
            for path, category in zip(samples["image_path"], samples["category"], strict=True):
                if lookup.setdefault(path, category) != category:
                    msg = f"{path!r} belongs to categories {lookup[path]!r} and {category!r}; use distinct data."
                    raise DatasetError(msg)
        self._category_of = lookup
        # Every file of every split (the validation set is drawn from these), then the (image, mask) pairs.
        masks = [m for m in self.test_data.samples["mask_path"] if m]
        sizes = check_image_files([*lookup, *masks], what="MultiCategory")
        check_masks(self.test_data.samples, sizes, what="MultiCategory")
        check_synthetic_val_split(self.val_split_mode, self.train_data.samples["image_path"], what="MultiCategory")
        counts = self.test_data.samples.groupby("category")["label_index"].agg(["size", "sum"])
        logger.info(
            "MultiCategory: %d train images; test per category (images, anomalous): %s",
            len(self.train_data),
            {str(k): (int(v["size"]), int(v["sum"])) for k, v in counts.iterrows()},
        )
        if self.train_data.has_anomalous:
            msg = "The union train set holds anomalous images; train folders must contain normal images only."
            raise DatasetError(msg)

    def setup(self, stage: str | None = None) -> None:
        """Set up the union splits and attach :class:`PerCategoryMetrics` to the trainer (once)."""
        super().setup(stage)
        trainer = self.trainer
        if (
            self.log_per_category_metrics
            and trainer is not None
            and not any(isinstance(cb, PerCategoryMetrics) for cb in trainer.callbacks)
        ):
            trainer.callbacks.append(PerCategoryMetrics())


def _as_list(value: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [value] if isinstance(value, str | Path) else list(value)


def _check_child_masks(child: AnomalibDataModule, category: str) -> None:
    """Pair the defect images and masks of a ``Folder``/``MVTecAD`` child before anomalib does.

    anomalib fails deep in pandas on a missing mask (see ``check_mask_folders``). Other datamodules are
    checked on their samples after their setup (``check_masks``).
    """
    what = f"Category {category!r}"
    if isinstance(child, Folder) and child.abnormal_dir and child.mask_dir:
        root = Path(child.root) if child.root is not None else Path()
        image_dirs = [root / d for d in _as_list(child.abnormal_dir)]
        mask_dirs = [root / d for d in _as_list(child.mask_dir)]
        if len(image_dirs) == len(mask_dirs) and all(d.is_dir() for d in image_dirs + mask_dirs):
            check_mask_folders(zip(image_dirs, mask_dirs, strict=True), extensions=child.extensions, what=what)
    elif isinstance(child, MVTecAD):
        base = Path(child.root) / child.category
        test = base / "test"
        defects = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != "good") if test.is_dir() else []
        # MVTecAD pairs every defect image with a mask: a missing ground_truth/<defect> folder means no masks.
        pairs = [(test / d, base / "ground_truth" / d) for d in defects]
        check_mask_folders(pairs, extensions=(".png", ".PNG"), what=what)


@contextmanager
def _category_errors(category: str) -> Iterator[None]:
    """Re-raise a child's data errors as one ``DatasetError`` that names the category."""
    try:
        yield
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"Category {category!r}: {error}") from error
    except (RuntimeError, OSError, ValueError, MisMatchError) as error:
        raise DatasetError(f"Category {category!r}: {error}") from error
