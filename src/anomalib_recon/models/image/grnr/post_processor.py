"""GRNR's post-processor: anomalib's ``PostProcessor`` once calibrated, honest outputs before any calibration.

anomalib calibrates a zero-shot model on validation images before ``test``/``predict``: min-max normalisation and
F1-adaptive thresholds. ``predict`` on a plain folder has no validation images, so nothing is calibrated, and
anomalib's ``PostProcessor`` then passes raw scores through but still labels them against its normalised threshold
0.5 (GRNR's raw scores are in the hundreds: every image and every pixel would be called anomalous), and its
visualizer renders maps as if they were in [0, 1]. Until calibrated, this post-processor returns instead:

* ``pred_score``: the raw GRNR score (max of the anomaly map): higher is more anomalous; it ranks images of one
  model configuration (backbone, layers, input size, K, λ) and is not a probability;
* ``anomaly_map``: each image's map divided by its own maximum, in [0, 1] (1 = the image's most anomalous pixel):
  where, not whether; the raw map is ``anomaly_map * pred_score``;
* ``pred_label`` and ``pred_mask``: not set (no threshold exists without calibration data).

Once a validation pass has run (``Engine.test``, ``Engine.predict`` with a datamodule, ``Engine.validate``) or a
calibrated checkpoint is loaded, it is anomalib's ``PostProcessor`` unchanged.

An exported graph carries what the model computes at export time: ``GRNR.to_onnx`` (and so ``to_openvino``) records
whether the post-processor is calibrated before tracing (a graph cannot branch on its own buffers), so an
uncalibrated export has exactly the two outputs above, named as anomalib names them from an eager forward.
"""

from __future__ import annotations

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_recon.components.tracing import is_tracing

__all__ = ["UNCALIBRATED_MEANING", "GRNRPostProcessor", "relative_map"]

UNCALIBRATED_MEANING = (
    "pred_score is the raw GRNR score (the maximum of the residual map; higher = more anomalous; it ranks images of "
    "this model configuration and is not a probability); anomaly_map is each image's map divided by its own maximum "
    "(in [0, 1]: where, not whether; raw map = anomaly_map * pred_score); pred_label and pred_mask are not set (no "
    "threshold without calibration data)"
)


def relative_map(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Each map divided by its own maximum (maps of ``(B, ...)``), in [0, 1]; an all-zero map stays zero."""
    peak = anomaly_map.flatten(1).amax(dim=1).clamp_min(torch.finfo(anomaly_map.dtype).tiny)
    return anomaly_map / peak.view(-1, *([1] * (anomaly_map.dim() - 1)))


class GRNRPostProcessor(PostProcessor):
    """anomalib's ``PostProcessor`` (same arguments and buffers) with honest uncalibrated outputs (module docstring)."""

    #: Set by ``GRNR.to_onnx`` for the duration of an export: whether the traced graph is the calibrated one. ``None``
    #: (a trace that did not come through ``to_onnx``) keeps anomalib's computation.
    calibrated_for_export: bool | None = None

    @property
    def calibrated(self) -> bool:
        """Whether a validation pass (or a loaded checkpoint) set the normalisation statistics."""
        if not self.enable_normalization:
            return True  # the user asked for raw outputs: anomalib's behaviour
        stats = torch.stack([self.image_min, self.image_max]).detach()
        return bool(torch.isfinite(stats).all())

    def post_process_batch(self, batch: Batch) -> None:
        """anomalib's normalisation and thresholds when calibrated; otherwise raw scores and relative maps."""
        if self.calibrated:
            super().post_process_batch(batch)
            return
        if batch.anomaly_map is not None:
            batch.anomaly_map = relative_map(batch.anomaly_map)

    def forward(self, predictions: InferenceBatch) -> InferenceBatch:
        """The same for direct calls (``model(images)``) and for graphs exported through ``GRNR.to_onnx``."""
        calibrated = (self.calibrated_for_export is not False) if is_tracing() else self.calibrated
        if calibrated:
            return super().forward(predictions)
        anomaly_map = predictions.anomaly_map
        return InferenceBatch(
            pred_score=predictions.pred_score,
            anomaly_map=None if anomaly_map is None else relative_map(anomaly_map),
        )
