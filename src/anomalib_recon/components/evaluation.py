"""Evaluate only the metrics the data can give.

anomalib's default evaluator holds pixel metrics (``pixel_AUROC``, ``pixel_F1Score``) next to the image ones. They
are non-strict: on a dataset without masks (ELPV, a ``Folder`` without ``mask_dir``) every batch lacks ``gt_mask``
and they skip their updates, but at the epoch end Lightning still computes them, and torchmetrics warns "The
``compute`` method of metric AUROC was called before the ``update`` method" for each: a warning in every clean run
on such data, and the first thing a newcomer reads in the quickstart log.

:class:`SkipUnavailableMetrics` hides those metrics (:func:`unavailable_metrics`: non-strict, never updated this
epoch) from the evaluator for the epoch end only, and says once, at INFO level, which metrics were skipped and why.
The evaluator keeps them: the next epoch, or data with masks, evaluates them again. It must run before anomalib's
``Evaluator`` callback (the models put it right after ``ModelGuard``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from anomalib.metrics import AnomalibMetric
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn import ModuleList

logger = logging.getLogger(__name__)

_STAGES = {"validation": "val_metrics", "test": "test_metrics"}


def unavailable_metrics(metrics: Iterable[Any]) -> list[AnomalibMetric]:
    """The non-strict anomalib metrics that no batch updated: a field they need was missing every time.

    anomalib counts an update only when every field of the metric is in the batch, so a pixel metric on data without
    masks ends the epoch with ``update_count == 0``. Strict metrics are never returned: a missing field is an error
    for them, raised at the update.
    """
    return [m for m in metrics if isinstance(m, AnomalibMetric) and not m.strict and m.update_count == 0]


class SkipUnavailableMetrics(Callback):
    """Hide the evaluator's metrics that the data could not update, for the epoch end only (module docstring)."""

    def __init__(self) -> None:
        self._hidden: dict[str, ModuleList] = {}
        self._reported: set[tuple[str, tuple[str, ...]]] = set()

    def _hide(self, pl_module: LightningModule, stage: str) -> None:
        evaluator = getattr(pl_module, "evaluator", None)
        attribute = _STAGES[stage]
        metrics = getattr(evaluator, attribute, None)
        if not isinstance(metrics, ModuleList) or attribute in self._hidden:
            return
        skipped = unavailable_metrics(metrics)
        if not skipped:
            return
        self._hidden[attribute] = metrics
        setattr(evaluator, attribute, ModuleList([m for m in metrics if all(m is not s for s in skipped)]))
        names = tuple(m.name for m in skipped)
        if (stage, names) not in self._reported:  # once per stage, not at every validation epoch
            self._reported.add((stage, names))
            shared = set.intersection(*(set(metric.fields) for metric in skipped))  # e.g. {"gt_mask"}
            fields = sorted(shared) or sorted({field for metric in skipped for field in metric.fields})
            logger.info(
                "%s: %s not computed: no %s batch had %s%s (a dataset without masks gives no pixel metrics).",
                type(pl_module).__name__,
                ", ".join(names),
                stage,
                "" if shared else "all of ",
                "/".join(fields),
            )

    def _restore(self, pl_module: LightningModule, stage: str) -> None:
        original = self._hidden.pop(_STAGES[stage], None)
        if original is not None:
            setattr(pl_module.evaluator, _STAGES[stage], original)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hide validation metrics without data before the evaluator logs (and so computes) them."""
        del trainer
        self._hide(pl_module, "validation")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the evaluator its validation metrics back."""
        del trainer
        self._restore(pl_module, "validation")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hide test metrics without data before the evaluator logs (and so computes) them."""
        del trainer
        self._hide(pl_module, "test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the evaluator its test metrics back."""
        del trainer
        self._restore(pl_module, "test")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Give every hidden metric back when the run fails between the epoch end and its end hook."""
        del trainer, exception
        for stage in _STAGES:
            self._restore(pl_module, stage)
