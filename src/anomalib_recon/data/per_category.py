"""Test metrics per category and their unweighted mean, for one model trained on several categories.

anomalib's batches carry no category field, but they carry ``image_path``. :class:`PerCategoryMetrics` (a Lightning
callback; :class:`~anomalib_recon.data.multi_category.MultiCategory` attaches it to the trainer by itself) groups
the post-processed test predictions by the category of their path. It clones the model's own test metrics
(``model.evaluator.test_metrics``), so each category is scored exactly like the pooled run, and logs
``<category>/<metric>`` plus ``mean/<metric>`` (the unweighted mean over categories). :func:`per_category_metrics`
does the same on tensors.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from anomalib.metrics import AUROC, AnomalibMetric, F1Score
from lightning.pytorch import Callback

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

__all__ = ["MEAN_KEY", "PerCategoryMetrics", "default_test_metrics", "per_category_metrics"]

logger = logging.getLogger(__name__)

MEAN_KEY = "mean"
"""Metric-key prefix of the unweighted mean over categories (``mean/image_AUROC``); not a valid category name."""


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
