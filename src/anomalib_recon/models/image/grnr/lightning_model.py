"""GRNR: Global-Regularized Neighborhood Regression for efficient zero-shot texture anomaly detection.

Paper: H. Yao et al., *Global-Regularized Neighborhood Regression for Efficient Zero-Shot Texture Anomaly
Detection*, arXiv 2406.07333. Authors' code: GitHub hmyao22/GRNR, ``demo.py``, commit 8c02ba1 (no licence file;
read, not copied).

Training-free: every feature of a test image is regressed from its 3×3 neighbours, regularised toward the image's
own most typical features ("self filtering"); the regression residual is the anomaly map. No training images.

With normal images at hand (``prior_source="normal"``, an extension of ours), each feature's priors are instead its
``K`` nearest vectors in a bank of pooled normal training features, built in one pass over (at most
``normal_images``) normal images; ``regression=False`` scores the plain distance to the nearest bank vector.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, STEP_OUTPUT
from torch import nn

from anomalib_recon.components.guards import UntrainedModelError
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.normal_images import collect_normal_images, has_training_data
from anomalib_recon.components.preprocessing import sized_pre_processor

from .post_processor import UNCALIBRATED_MEANING, GRNRPostProcessor
from .torch_model import REFERENCE_SIZE, GRNRModel

logger = logging.getLogger(__name__)

__all__ = ["GRNR"]

DEFAULT_IMAGE_SIZE = (REFERENCE_SIZE, REFERENCE_SIZE)


class GRNR(ReconModuleMixin, AnomalibModule):
    """GRNR (arXiv 2406.07333): zero-shot, training-free texture anomaly detection; with normal images, priors from a
    bank of normal features (``prior_source="normal"``).

    ``learning_type`` is ``ZERO_SHOT``: ``Engine.test``/``predict`` work without a fit (anomalib runs a validation
    pass first to calibrate the normalisation and thresholds), and ``Engine.fit``/``anomalib train`` only run that
    validation, as for WinCLIP. ``Engine.predict(model, data_path=...)`` / ``anomalib predict --data <folder>`` have
    no validation images: the model then answers that validation with no data (instead of Lightning's
    "``val_dataloader`` must be implemented") and predicts uncalibrated outputs whose meaning is logged
    (:class:`~.post_processor.GRNRPostProcessor`). The anomaly map has the input size: the paper evaluates the
    central 256 px of a 320-px map; here the outer 10 % band repeats the centre's edge, so it can be compared with
    full-size masks.

    ``prior_source="normal"`` takes each feature's ``K`` priors from a per-layer bank of the pooled features of the
    normal training images instead (the same closed form, a set of priors per position). The banks are built by
    the shared loop over the normal training images
    (:func:`~anomalib_recon.components.normal_images.collect_normal_images`: dataset order, no augmentation, every
    DDP rank gets all ranks' images) and are buffers, so checkpoints and ONNX/OpenVINO exports carry them. With all
    training images (``normal_images=None``) the model is ``ONE_CLASS``: ``Engine.fit`` builds the banks at the start
    of its one (step-free) epoch and writes a checkpoint (on one device: Lightning's DDP cannot wrap a model without
    trainable parameters, so a multi-process one-class fit is refused with what to do). With ``normal_images=N`` it
    is ``FEW_SHOT``: anomalib's ``Engine.fit``/``test``/``predict`` only validate such a model, and the banks are
    built from the first ``N`` training images of the datamodule when that validation starts, once (a model that
    has banks keeps them; call :meth:`build_banks` to rebuild). Before its banks exist, validate/test/predict are
    refused (:class:`~anomalib_recon.components.guards.UntrainedModelError`).

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
        prior_source: ``"image"`` (the paper, zero-shot: the priors are the test image's own most typical features)
            or ``"normal"`` (the ``K`` nearest vectors of a bank of pooled normal training features, per position).
        normal_images: ``"normal"`` only: build the banks from at most this many normal training images (dataset
            order; few-shot). ``None`` = all of them (one-class).
        coreset_ratio: ``"normal"`` only: keep this fraction of each bank with anomalib's greedy k-center coreset
            (as Patchcore). ``None`` = the whole bank (exact).
        regression: ``"normal"`` only: ``False`` scores each position by the distance to its nearest bank vector
            (plain 1-NN on the same pooled features, no regression): the ablation of the regression.
        knn_chunk_size: ``"normal"`` only: bank rows per block of the nearest-neighbour search (16384), in eager
            mode and in exported graphs (bounds the distances held at once to ``positions x knn_chunk_size``).
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) + ImageNet Normalize.
        post_processor: Post-processor or flag (:class:`~.post_processor.GRNRPostProcessor` by default: anomalib's
            ``PostProcessor`` once calibrated).
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = GRNR(backbone="tf_efficientnet_lite0", image_size=256)
        >>> Engine().test(model, datamodule=datamodule)   # no fit needed    # doctest: +SKIP
        >>> few_shot = GRNR(backbone="tf_efficientnet_lite0", image_size=256, prior_source="normal", normal_images=8)
        >>> Engine().fit(few_shot, datamodule=datamodule)  # banks from 8 normal images   # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
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
        prior_source: str = "image",
        normal_images: int | None = None,
        coreset_ratio: float | None = None,
        regression: bool = True,
        knn_chunk_size: int = 16384,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        self._check_bank_args(prior_source, normal_images, coreset_ratio)
        self.normal_images = None if normal_images is None else int(normal_images)
        self.coreset_ratio = None if coreset_ratio is None else float(coreset_ratio)
        self.bank_stats: dict[str, float] = {}
        self._bank_fit_pending = False
        input_size = self.model_input_size(image_size)
        self.model = GRNRModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=input_size,
            pool_kernel=pool_kernel,
            num_global_priors=num_global_priors,
            lam=lam,
            border_cut=border_cut,
            blur_sigma=blur_sigma,
            crop=crop,
            eps=eps,
            distance_chunk=distance_chunk,
            prior_source=prior_source,
            regression=regression,
            knn_chunk_size=knn_chunk_size,
        )

    @staticmethod
    def _check_bank_args(prior_source: str, normal_images: int | None, coreset_ratio: float | None) -> None:
        problems = []
        if normal_images is not None and not (isinstance(normal_images, int) and normal_images >= 1):
            problems.append(f"normal_images must be an integer >= 1 or None (all images), got {normal_images!r}")
        if coreset_ratio is not None and not (
            isinstance(coreset_ratio, int | float) and math.isfinite(coreset_ratio) and 0 < coreset_ratio <= 1
        ):
            problems.append(f"coreset_ratio must be in (0, 1] or None (the whole bank), got {coreset_ratio!r}")
        if prior_source == "image" and (normal_images is not None or coreset_ratio is not None):
            problems.append(
                "normal_images and coreset_ratio describe the bank of normal features of prior_source='normal'; "
                "prior_source='image' (zero-shot) uses no training images"
            )
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def resizable_buffers(self) -> tuple[str, ...]:
        """The bank buffers, whose size depends on the training set: checkpoint loading re-sizes them."""
        if self.model.prior_source != "normal":
            return ()
        return tuple(f"normal_bank_{layer}" for layer in range(len(self.model.feature_extractor.layers)))

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE  # 320 x 320, the paper; the mixin's Resize + ImageNet pre-processor

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
        """Zero-/few-shot: one epoch with no training batches and no sanity check (a plain Lightning ``fit`` does
        nothing). One-class (``"normal"``, all images): one epoch of one (step-free) batch, whose start builds the
        banks in one pass over the training set, then the validation that calibrates thresholds."""
        if self.learning_type == LearningType.ONE_CLASS:
            return {"max_epochs": 1, "limit_train_batches": 1, "num_sanity_val_steps": 0}
        return {"max_epochs": 1, "limit_train_batches": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """``ZERO_SHOT`` (``"image"``: the priors come from the test image itself); with ``"normal"``, ``FEW_SHOT``
        when ``normal_images`` is set, else ``ONE_CLASS``."""
        if self.model.prior_source == "image":
            return LearningType.ZERO_SHOT
        return LearningType.ONE_CLASS if self.normal_images is None else LearningType.FEW_SHOT

    # ------------------------------------------------------------------------------------------------ banks
    def build_banks(self, dataloader: Iterable | None = None) -> list[int]:
        """Build the per-layer banks of pooled normal features (``prior_source="normal"``); returns their sizes.

        The rows come from the shared loop over the normal training images (dataset order, pre-processed, at most
        ``normal_images``; under DDP every rank gathers all ranks' rows, so every rank holds the single-process
        banks). ``dataloader``: raw normal images to use instead of the training set.
        """
        if self.model.prior_source != "normal":
            msg = "GRNR(prior_source='image') is zero-shot: its priors come from each test image, it has no banks."
            raise ValueError(msg)
        start = time.perf_counter()
        rows = collect_normal_images(self, self.model.bank_rows, self.normal_images, dataloader)
        sizes = self.model.set_banks(rows, coreset_ratio=self.coreset_ratio)
        megabytes = sum(self.model.bank(i).numel() * self.model.bank(i).element_size() for i in range(len(sizes)))
        self.bank_stats = {
            "bank_build_s": round(time.perf_counter() - start, 2),
            "bank_images": float(rows.shape[0]),
            "bank_mb": round(megabytes / 2**20, 2),
        } | {f"bank_vectors_{i}": float(n) for i, n in enumerate(sizes)}
        self._recon_trained = True
        self._bank_fit_pending = False
        logger.info(
            "GRNR: banks of %s normal feature vectors from %d images (%.1f MB) built in %.1f s.",
            sizes,
            rows.shape[0],
            self.bank_stats["bank_mb"],
            self.bank_stats["bank_build_s"],
        )
        return sizes

    def _ensure_banks(self, what: str) -> None:
        """Banks before scoring: built during a fit (e.g. a sanity check) or, few-shot, from the datamodule's
        training images at hand; otherwise one clear refusal (before the shared guard's generic one)."""
        if self.model.has_banks:
            return
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if fitting or (self.normal_images is not None and has_training_data(self)):
            self.build_banks()
            return
        source = (
            f"the first normal_images={self.normal_images} normal training images of a datamodule (anomalib's "
            "Engine.fit/test/predict with a datamodule that has training images build them when they validate)"
            if self.normal_images is not None
            else "the normal training images (Engine.fit / anomalib train: one pass, no gradient steps)"
        )
        msg = (
            f"GRNR has not been trained: {what} would score without its bank of normal features "
            f"(prior_source='normal'). The banks are built from {source}; or pass the checkpoint of a fitted model "
            f"(anomalib {what} --ckpt_path <model.ckpt>, Engine.{what}(model, ckpt_path=...)), or call "
            "model.build_banks(dataloader) with normal images."
        )
        raise UntrainedModelError(msg)

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, stage: str | None = None) -> None:
        """Refuse a one-class fit on several processes before Lightning wraps the model in DDP: the model has no
        trainable parameter, which ``DistributedDataParallel`` refuses with a deep traceback."""
        super().setup(stage)
        if stage == "fit" and self.learning_type == LearningType.ONE_CLASS and self.trainer.world_size > 1:
            msg = (
                f"GRNR(prior_source='normal', normal_images=None) is fitted by one pass over the normal images with no "
                f"trainable parameter, which Lightning's DDP cannot wrap ({self.trainer.world_size} processes). Fit "
                "it on one device (devices=1), or set normal_images to the number of training images: that model "
                "only validates under Engine.fit, and every process then gathers all processes' images."
            )
            raise ValueError(msg)

    def on_fit_start(self) -> None:
        """A one-class fit builds the banks at its start (every fit: a re-fit rebuilds them from its data)."""
        self._bank_fit_pending = self.model.prior_source == "normal"

    def on_train_start(self) -> None:
        """Build the banks from the training set (unless a sanity validation of this fit built them already)."""
        if self._bank_fit_pending:
            self.build_banks()

    def on_validation_model_eval(self) -> None:
        """Eval mode, then the banks (``"normal"``): before the validation loop and the shared guard's checks."""
        super().on_validation_model_eval()
        if self.model.prior_source == "normal":
            self._ensure_banks("validate")

    def on_test_model_eval(self) -> None:
        """Eval mode, then the banks (``"normal"``): before the test loop and the shared guard's checks."""
        super().on_test_model_eval()
        if self.model.prior_source == "normal":
            self._ensure_banks("test")

    def on_predict_model_eval(self) -> None:
        """Eval mode, then the banks (``"normal"``): before the predict loop and the shared guard's checks."""
        super().on_predict_model_eval()
        if self.model.prior_source == "normal":
            self._ensure_banks("predict")

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """No-op: GRNR has nothing to train (anomalib's Engine does not even call it for zero-/few-shot models; a
        one-class fit builds its banks in ``on_train_start``)."""
        del batch, args, kwargs
        return None

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
        """ONNX export (also the first step of OpenVINO's) of what the model computes now, calibrated or not.

        Uncalibrated, the graph outputs the raw ``pred_score`` and the relative ``anomaly_map`` (no labels), as a
        direct call does, and a warning says so; anomalib names the graph's outputs from an eager forward, so the
        graph must compute the same outputs for the names to fit.
        """
        post = self.post_processor
        if not isinstance(post, GRNRPostProcessor):
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        calibrated = post.calibrated
        if not calibrated:
            logger.warning(
                "GRNR: exporting an uncalibrated model: the graph outputs %s. Calibrate first (Engine.validate or "
                "Engine.test with images, or load a calibrated checkpoint), then export, for normalised scores, "
                "labels and masks.",
                UNCALIBRATED_MEANING,
            )
        post.calibrated_for_export = calibrated
        try:
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        finally:
            post.calibrated_for_export = None
