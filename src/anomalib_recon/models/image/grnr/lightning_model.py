"""GRNR: Global-Regularized Neighborhood Regression for efficient zero-shot texture anomaly detection.

Paper: H. Yao et al., *Global-Regularized Neighborhood Regression for Efficient Zero-Shot Texture Anomaly
Detection*, arXiv 2406.07333. Authors' code: GitHub hmyao22/GRNR, ``demo.py``, commit 8c02ba1 (no licence file;
read, not copied).

Training-free: every feature of a test image is regressed from its 3×3 neighbours, regularised toward the image's
own most typical features ("self filtering"); the regression residual is the anomaly map. No training images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, STEP_OUTPUT
from torch import nn

from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import resize_pre_processor, sized_pre_processor

from .post_processor import UNCALIBRATED_MEANING, GRNRPostProcessor
from .torch_model import REFERENCE_SIZE, GRNRModel

logger = logging.getLogger(__name__)

__all__ = ["GRNR"]

DEFAULT_IMAGE_SIZE = (REFERENCE_SIZE, REFERENCE_SIZE)


class GRNR(ReconModuleMixin, AnomalibModule):
    """GRNR (arXiv 2406.07333): zero-shot, training-free texture anomaly detection.

    ``learning_type`` is ``ZERO_SHOT``: ``Engine.test``/``predict`` work without a fit (anomalib runs a validation
    pass first to calibrate the normalisation and thresholds), and ``Engine.fit``/``anomalib train`` only run that
    validation, as for WinCLIP. ``Engine.predict(model, data_path=...)`` / ``anomalib predict --data <folder>`` have
    no validation images: the model then answers that validation with no data (instead of Lightning's
    "``val_dataloader`` must be implemented") and predicts uncalibrated outputs whose meaning is logged
    (:class:`~.post_processor.GRNRPostProcessor`). The anomaly map has the input size: the paper evaluates the
    central 256 px of a 320-px map; here the outer 10 % band repeats the centre's edge, so it can be compared with
    full-size masks.

    Args:
        backbone: timm CNN; ``wide_resnet50_2.tv_in1k`` (torchvision V1 weights) as in the paper.
        layers: Layers (names or ``features_only`` indices). ``None`` = the layers at strides 8 and 16:
            ``layer2, layer3`` for ResNets (the paper), ``blocks.2, blocks.4`` for EfficientNet-Lite.
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random init, for tests).
        image_size: Input size of the default pre-processor (``None`` = 320×320, the paper). Ignored when a
            pre-processor is passed (the size then comes from its Resize).
        pool_kernel: Local average pooling (3).
        num_global_priors: ``K``, the self-filtered global priors (40).
        lam: ``λ``, weight of the global regularisation (5); 0 = plain neighbourhood regression (the ablation).
        border_cut: Border band per layer, in feature cells at 320 px, set to the interior's minimum ((3, 2)); scales
            with the input size.
        blur_sigma: Gaussian σ of the map in pixels at 320 px (3); scales with the input size.
        crop: Outer band in pixels at 320 px (32) outside the evaluated centre, filled by edge replication.
        eps: Relative ridge ``ε > 0`` on the 8×8 systems (1e-6).
        distance_chunk: Rows of the ``N × N`` distance matrix computed at once (1024; exact).
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) + ImageNet Normalize.
        post_processor: Post-processor or flag (:class:`~.post_processor.GRNRPostProcessor` by default: anomalib's
            ``PostProcessor`` once calibrated).
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = GRNR(backbone="tf_efficientnet_lite0", image_size=256)
        >>> Engine().test(model, datamodule=datamodule)   # no fit needed    # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        pool_kernel: int = 3,
        num_global_priors: int = 40,
        lam: float = 5.0,
        border_cut: Sequence[int] = (3, 2),
        blur_sigma: float = 3.0,
        crop: int = 32,
        eps: float = 1e-6,
        distance_chunk: int | None = 1024,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        input_size = self.input_size
        if input_size is None:
            logger.warning("GRNR: no Resize in the pre-processor; building for %s inputs.", DEFAULT_IMAGE_SIZE)
            input_size = DEFAULT_IMAGE_SIZE
        self.model = GRNRModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=(int(input_size[0]), int(input_size[1])),
            pool_kernel=pool_kernel,
            num_global_priors=num_global_priors,
            lam=lam,
            border_cut=border_cut,
            blur_sigma=blur_sigma,
            crop=crop,
            eps=eps,
            distance_chunk=distance_chunk,
        )

    # ------------------------------------------------------------------------------------------------ configuration
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (320×320, the paper) and normalise with ImageNet statistics."""
        return resize_pre_processor(image_size or DEFAULT_IMAGE_SIZE)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's min-max normalisation and F1-adaptive thresholds once calibrated; honest raw outputs before
        (:class:`~.post_processor.GRNRPostProcessor`). anomalib has no default for ZERO_SHOT models."""
        return GRNRPostProcessor()

    @staticmethod
    def configure_optimizers() -> None:
        """Training-free: no optimiser."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One epoch with no training batches and no sanity check: a plain Lightning ``fit`` does nothing."""
        return {"max_epochs": 1, "limit_train_batches": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Zero-shot: the priors come from the test image itself."""
        return LearningType.ZERO_SHOT

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """No-op: GRNR has nothing to train (anomalib's Engine does not even call it for zero-shot models)."""
        del batch, args, kwargs
        return None

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """``pred_score`` and ``anomaly_map`` for the post-processor (normalisation, thresholds) and metrics."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # ------------------------------------------------------------------------------------------------ zero-shot use
    def val_dataloader(self) -> EVAL_DATALOADERS:
        """No validation images: an empty validation, so nothing is calibrated (and Lightning does not fail).

        Lightning asks the model only when neither a datamodule nor dataloaders were given: anomalib's
        ``Engine.predict(model, data_path=...)`` (and ``anomalib predict --data <folder>``) validates a zero-shot
        model before predicting even when there is nothing to validate on. Any datamodule or dataloader passed to
        the Engine still takes precedence and calibrates as usual.
        """
        logger.info("GRNR: no validation images were given; the post-processor is not calibrated by this run.")
        return []

    def on_predict_start(self) -> None:
        """Say in the log what the outputs mean when no calibration data was seen."""
        if isinstance(self.post_processor, GRNRPostProcessor) and not self.post_processor.calibrated:
            logger.warning(
                "GRNR: predicting without calibration data (no validation images, no calibrated checkpoint): %s. For "
                "normalised scores, labels and masks, predict with a datamodule that has validation images "
                "(Engine.predict(model, datamodule=...), anomalib predict --data <datamodule>) or a calibrated "
                "checkpoint (ckpt_path).",
                UNCALIBRATED_MEANING,
            )

    def to_onnx(self, export_root: Any, model_file_name: str = "model", input_size: Any = None, **kwargs: Any) -> Any:
        """ONNX export (also the first step of OpenVINO's); warns when the post-processor is not calibrated."""
        if isinstance(self.post_processor, GRNRPostProcessor) and not self.post_processor.calibrated:
            logger.warning(
                "GRNR: exporting an uncalibrated model: the graph's pred_score and anomaly_map are raw and its "
                "pred_label/pred_mask compare raw values with 0.5 (meaningless). Calibrate first (Engine.validate or "
                "Engine.test with images), then export."
            )
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
