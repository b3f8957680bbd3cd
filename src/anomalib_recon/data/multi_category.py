"""One model for several categories: a union training set, test metrics per category and their mean.

anomalib's batches carry no category field, but they carry ``image_path``. :class:`MultiCategory` records the
category of every image path it loads, and :class:`PerCategoryMetrics` (a Lightning callback that the
datamodule attaches to the trainer by itself) groups the post-processed test predictions by that path. It
clones the model's own test metrics (``model.evaluator.test_metrics``), so each category is scored exactly like
the pooled run, and logs ``<category>/<metric>`` plus ``mean/<metric>`` (the unweighted mean over categories).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data import Folder, MVTecAD
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.errors import MisMatchError
from anomalib.data.utils import TestSplitMode, ValSplitMode
from anomalib.metrics import AUROC, AnomalibMetric, F1Score
from lightning.pytorch import Callback
from torchvision.transforms.v2 import Transform

from anomalib_recon.data.validation import (
    CheckedImageDatasetMixin,
    DatasetError,
    DatasetNotFoundError,
    check_image_files,
    check_mask_folders,
    check_masks,
    check_synthetic_val_split,
    require_dir,
)

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

__all__ = [
    "MEAN_KEY",
    "MultiCategory",
    "MultiCategoryDataset",
    "PerCategoryMetrics",
    "default_test_metrics",
    "mvtec_style_folder",
    "per_category_metrics",
]

logger = logging.getLogger(__name__)

MEAN_KEY = "mean"
_MVTEC_LAYOUT = (
    "Expected MVTec-style layout: <root>/<category>/train/good/*, <root>/<category>/test/good/*, "
    "<root>/<category>/test/<defect>/* and optionally <root>/<category>/ground_truth/<defect>/<stem>_mask.png."
)


# --------------------------------------------------------------------------------------------------------------
# Metrics grouped by category
# --------------------------------------------------------------------------------------------------------------
def default_test_metrics() -> list[AnomalibMetric]:
    """anomalib's default test metrics: image/pixel AUROC and F1Score (pixel ones skipped without masks)."""
    return [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
    ]


def _take(value: Any, index: torch.Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach()[index.to(value.device)].cpu()
    return [value[i] for i in index.tolist()]


class _PerCategoryTracker:
    """Per-category clones of a list of metrics, updated with the rows of each batch that belong to them."""

    _GROUND_TRUTH = ("gt_label", "gt_mask")

    def __init__(self, metrics: Sequence[AnomalibMetric]) -> None:
        self.template = []
        for metric in metrics:
            if not isinstance(metric, AnomalibMetric):
                msg = f"metrics must be anomalib metrics (anomalib.metrics.*), got {type(metric).__name__}."
                raise TypeError(msg)
            clone = copy.deepcopy(metric).cpu()
            clone.reset()
            clone.strict = False  # a field missing for a category (e.g. no masks) skips the metric
            clone.sync_on_compute = False  # categories may differ between processes: never block on a sync
            self.template.append(clone)
        self.fields = sorted({field for metric in self.template for field in metric.fields})
        self.metrics: dict[str, list[AnomalibMetric]] = {}
        # per category and ground-truth field: which of the classes {0, 1} were seen
        self.seen: dict[str, dict[str, set[int]]] = {}

    def update(self, batch: Any, categories: Sequence[str]) -> None:
        values = {field: getattr(batch, field, None) for field in self.fields}
        for category in dict.fromkeys(categories):
            index = torch.tensor([i for i, c in enumerate(categories) if c == category], dtype=torch.long)
            sub_batch = SimpleNamespace(**{field: _take(value, index) for field, value in values.items()})
            if category not in self.metrics:
                self.metrics[category] = [copy.deepcopy(metric) for metric in self.template]
                self.seen[category] = {field: set() for field in self._GROUND_TRUTH}
            for field in self._GROUND_TRUTH:
                truth = getattr(sub_batch, field, None)
                if isinstance(truth, torch.Tensor):
                    self.seen[category][field].update(int(v) for v in torch.unique(truth.int()).tolist())
            for metric in self.metrics[category]:
                metric.update(sub_batch)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for category, metrics in self.metrics.items():
            for metric in metrics:
                if metric.update_count == 0:  # a field was missing in every batch (e.g. no masks)
                    continue
                one_class = [f for f in self._GROUND_TRUTH if f in metric.fields and len(self.seen[category][f]) < 2]
                if one_class:
                    logger.warning(
                        "%s/%s skipped: %s of category %r holds only one class.",
                        category,
                        metric.name,
                        one_class[0],
                        category,
                    )
                    continue
                value = metric.compute()
                if value is None:
                    continue
                value = float(value)
                if math.isnan(value):
                    continue
                results[f"{category}/{metric.name}"] = value
                per_metric.setdefault(metric.name, []).append(value)
        for name, values in per_metric.items():
            results[f"{MEAN_KEY}/{name}"] = sum(values) / len(values)
        return results


def per_category_metrics(
    categories: Sequence[str],
    metrics: Sequence[AnomalibMetric] | None = None,
    **fields: torch.Tensor,
) -> dict[str, float]:
    """Compute metrics per category and their unweighted mean over categories.

    Args:
        categories: Category of each sample (length ``N``).
        metrics: anomalib metrics to compute. ``None``: :func:`default_test_metrics`. A metric whose fields are
            not all given (e.g. ``pred_label``) is skipped, as is a metric on ground truth (``gt_label``/``gt_mask``)
            that holds only one class within a category (its AUROC would be meaningless).
        **fields: Batch fields with first dimension ``N``, e.g. ``pred_score=..., gt_label=...``.

    Returns:
        ``{"<category>/<metric>": value, ..., "mean/<metric>": value}``, e.g. ``"bottle/image_AUROC"``.

    Example:
        >>> per_category_metrics(["a", "a", "b", "b"], pred_score=torch.tensor([.1, .9, .8, .2]),
        ...                      gt_label=torch.tensor([0, 1, 0, 1]))
        {'a/image_AUROC': 1.0, 'b/image_AUROC': 0.0, 'mean/image_AUROC': 0.5}
    """
    categories = [str(c) for c in categories]
    if MEAN_KEY in categories:
        msg = f"{MEAN_KEY!r} is reserved for the mean over categories; rename that category."
        raise ValueError(msg)
    for field, value in fields.items():
        if len(value) != len(categories):
            msg = f"{field} has {len(value)} entries but categories has {len(categories)}; they must match."
            raise ValueError(msg)
    tracker = _PerCategoryTracker(default_test_metrics() if metrics is None else metrics)
    tracker.update(SimpleNamespace(**fields), categories)
    return tracker.compute()


class PerCategoryMetrics(Callback):
    """Log test metrics per category (``<category>/<metric>``) and their mean (``mean/<metric>``).

    The metrics are clones of the model's ``evaluator.test_metrics`` (anomalib's defaults if the model has no
    evaluator) unless ``metrics`` is given, and they see the batches after the model's post-processor, so
    scores and thresholds are the pooled run's: one model, one threshold for all categories. The values are
    logged (they appear in ``engine.test(...)``'s result) and kept in :attr:`results`.

    :class:`MultiCategory` attaches this callback itself; pass it to ``Engine(callbacks=[...])`` with another
    datamodule together with ``category_fn``. Single-process evaluation: on a multi-device run each process
    would score only its own share of the test set (no cross-process sync).

    Args:
        metrics: anomalib metrics to clone per category. ``None``: the model's test metrics.
        category_fn: Maps an ``image_path`` to its category. ``None``: ``trainer.datamodule.category_of``.
    """

    def __init__(
        self,
        metrics: Sequence[AnomalibMetric] | None = None,
        category_fn: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__()
        self.metrics = list(metrics) if metrics is not None else None
        self.category_fn = category_fn
        self.results: dict[str, float] = {}
        self._tracker: _PerCategoryTracker | None = None
        self._resolve: Callable[[str], str] | None = None
        self._pending: Any = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Create fresh per-category metrics and find the category lookup."""
        if self.metrics is not None:
            template = self.metrics
        else:
            evaluator = getattr(pl_module, "evaluator", None)
            template = list(getattr(evaluator, "test_metrics", None) or default_test_metrics())
        self._resolve = self.category_fn or getattr(trainer.datamodule, "category_of", None)
        if self._resolve is None:
            msg = (
                "PerCategoryMetrics needs the category of each image: use the MultiCategory datamodule or pass "
                "category_fn=(image_path -> category)."
            )
            raise TypeError(msg)
        self._tracker = _PerCategoryTracker(template)
        self._pending = None
        self.results = {}

    def _flush(self) -> None:
        # Batches are scored one hook later: by then the model's post-processor (a callback that may run after
        # this one) has normalised the scores and set pred_label/pred_mask in place.
        if self._pending is None or self._tracker is None or self._resolve is None:
            return
        batch, self._pending = self._pending, None
        self._tracker.update(batch, [self._resolve(str(path)) for path in batch.image_path])

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Score the previous batch and keep this one until its post-processing is done."""
        del trainer, pl_module, batch_idx, dataloader_idx
        self._flush()
        self._pending = outputs if outputs is not None else batch

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log the per-category metrics and their mean."""
        self._flush()
        if self._tracker is None:
            return
        self.results = self._tracker.compute()
        for key, value in self.results.items():
            if trainer.barebones:  # logging is disabled in barebones mode
                trainer.callback_metrics[key] = torch.tensor(value)
            else:
                pl_module.log(key, value)


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
