"""Only the metrics the data can give are evaluated: no torchmetrics 'compute before update' warning without masks."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import Folder, ImageBatch
from anomalib.metrics import AUROC, Evaluator, F1Score

from anomalib_recon.components.evaluation import SkipUnavailableMetrics, unavailable_metrics
from tests.conftest import cpu_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _default_evaluator() -> Evaluator:
    """anomalib's default test metrics: image AUROC/F1 (strict) and pixel AUROC/F1 (non-strict)."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )


def _batch(with_masks: bool) -> ImageBatch:
    maps = torch.rand(4, 8, 8)
    return ImageBatch(
        image=torch.rand(4, 3, 8, 8),
        gt_label=torch.tensor([0, 1, 0, 1]),
        pred_score=torch.tensor([0.1, 0.9, 0.2, 0.8]),
        pred_label=torch.tensor([0, 1, 0, 1]),
        anomaly_map=maps,
        pred_mask=maps > 0.5,
        gt_mask=(torch.rand(4, 8, 8) > 0.5) if with_masks else None,
    )


def test_pixel_metrics_without_masks_are_hidden_for_the_epoch_end_only(caplog):
    evaluator = _default_evaluator()
    module = SimpleNamespace(evaluator=evaluator)
    original = evaluator.test_metrics
    for metric in evaluator.test_metrics:
        metric.update(_batch(with_masks=False))
    assert [m.name for m in unavailable_metrics(evaluator.test_metrics)] == ["pixel_AUROC", "pixel_F1Score"]
    callback = SkipUnavailableMetrics()
    caplog.set_level(logging.INFO)
    callback.on_test_epoch_end(None, module)
    assert [m.name for m in evaluator.test_metrics] == ["image_AUROC", "image_F1Score"]
    assert "pixel_AUROC, pixel_F1Score not computed: no test batch had gt_mask (" in caplog.text
    callback.on_test_end(None, module)
    assert evaluator.test_metrics is original and len(original) == 4  # the evaluator keeps its metrics


def test_validation_metrics_are_hidden_and_given_back_also_after_an_error():
    pixel = AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False)
    evaluator = Evaluator(val_metrics=[pixel, AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    module = SimpleNamespace(evaluator=evaluator)
    for metric in evaluator.val_metrics:
        metric.update(_batch(with_masks=False))
    callback = SkipUnavailableMetrics()
    callback.on_validation_epoch_end(None, module)
    assert [m.name for m in evaluator.val_metrics] == ["image_AUROC"]
    callback.on_validation_end(None, module)
    assert [m.name for m in evaluator.val_metrics] == ["pixel_AUROC", "image_AUROC"]
    callback.on_validation_epoch_end(None, module)
    callback.on_exception(None, module, RuntimeError("interrupted"))
    assert len(evaluator.val_metrics) == 2


def test_metrics_with_data_are_all_kept():
    evaluator = _default_evaluator()
    for metric in evaluator.test_metrics:
        metric.update(_batch(with_masks=True))
    assert unavailable_metrics(evaluator.test_metrics) == []
    callback = SkipUnavailableMetrics()
    callback.on_test_epoch_end(None, SimpleNamespace(evaluator=evaluator))
    assert len(evaluator.test_metrics) == 4
    # a strict metric that was never updated is not hidden: its missing field is an error of its own
    strict = AUROC(fields=["pred_score", "gt_label"])
    assert unavailable_metrics([strict]) == []


def test_no_mask_data_fit_and_test_warn_nothing_and_report_image_metrics(tiny_category, tmp_path, recwarn):
    """A datamodule without masks through a short fit + test: image metrics reported, no 'compute' warning."""
    from anomalib_recon.models import AMINet

    datamodule = Folder(
        name="no_masks",
        root=tiny_category,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )
    model = AMINet(backbone="tf_efficientnet_lite0", weights=None, embed_dim=32, depth=1, num_heads=2, image_size=64)
    wired = any(isinstance(c, SkipUnavailableMetrics) for c in model.configure_callbacks())
    engine = cpu_engine(tmp_path, max_steps=2, callbacks=[] if wired else [SkipUnavailableMetrics()])
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)[0]
    assert {"image_AUROC", "image_F1Score"} <= set(results)
    assert not any(key.startswith("pixel_") for key in results)
    compute = [str(w.message) for w in recwarn if "compute" in str(w.message)]
    assert not compute, compute
    assert [m.name for m in model.evaluator.test_metrics][-2:] == ["pixel_AUROC", "pixel_F1Score"]
