"""SCL-VI: Self-supervised Context Learning for Visual Inspection (jigsaw + SVDD, trained from scratch).

Paper: *SCL-VI: Self-supervised Context Learning for Visual Inspection*, arXiv 2311.06504. Authors' code: GitHub
wangpeng000/VisualInspection, commit a593340 (no LICENSE file; read for understanding only).

An AlexNet-like patch encoder is trained from scratch to predict the relative position of two of nine jigsaw patches
at two patch sizes (64 and 32), plus an SVDD term that pulls embeddings of neighbouring patches together. After
training, every 64- and 32-px window of the training images is embedded into two memory banks; a test window is
scored by an affinity-weighted mean of its k nearest bank distances, the scores are spread over the window footprints,
and the two maps are multiplied. Image score = max of the map.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.normal_images import collect_normal_images, has_training_data
from anomalib_recon.components.preprocessing import resize_pre_processor, sized_pre_processor

from .loss import SCLVILoss
from .torch_model import PAPER_SCALES, SCLVIModel

logger = logging.getLogger(__name__)

__all__ = ["SCLVI"]

DEFAULT_IMAGE_SIZE = (256, 256)


class SCLVI(ReconModuleMixin, AnomalibModule):
    """SCL-VI (arXiv 2311.06504): jigsaw + SVDD patch encoder trained from scratch, affinity-kNN memory banks.

    There is **no pretrained backbone**: the encoder is trained from scratch on the training images, so the
    ``backbone``, ``layers`` and ``weights`` arguments of the other models do not apply and do not exist here.

    Stages: (1) fit start: the per-pixel mean training image (at the input size) is computed once over the normal
    training images and stored as the ``model.mean_image`` buffer; (2) training: each step samples jigsaw and SVDD
    patch pairs on the fly from the batch of full standardised images; (3) after training (and before any
    validation that follows training steps) both memory banks are built from the training images' window
    embeddings; they are buffers, so checkpoints and ONNX/OpenVINO exports carry them. Stages (1) and (3) read the
    training set through the shared loop :func:`~anomalib_recon.components.normal_images.collect_normal_images`
    (dataset order, no augmentation; under DDP every rank gathers all ranks' rows, so every rank holds the
    single-process mean image and banks).

    Args:
        image_size: Input size of the default pre-processor (``None`` = 256x256, the paper). Ignored when a
            pre-processor is passed (its Resize then sets the size). With the default strides it must be a multiple
            of 64.
        feature_dim: Embedding size D (64).
        width: Hidden-width multiplier of the encoder (1.0 = the paper's AlexNet widths). **INFERRED** knob for CPU
            budgets.
        scales: Patch sizes used for training and scoring: ``(64, 32)`` (paper), ``(64,)`` or ``(32,)``.
        strides: Memory-bank/test grid stride per patch size, e.g. ``{64: 16, 32: 4}``. ``None`` = the paper's 16 and
            4 at 256 px scaled with the input size (8 and 2 at 128 px).
        k: Nearest neighbours in the affinity score (5, **INFERRED**: the authors' code scans 1..20 per category;
            ``k=1`` is plain Patch SVDD scoring).
        svdd_weight: lambda of the SVDD term (1, the authors' README command; 0 = jigsaw alone).
        pair_batch_size: Pairs per sub-task and scale per step (64, the paper's batch). Pairs cycle over the
            images of the Lightning batch.
        coreset_ratio: Keep this fraction of each memory bank with anomalib's greedy k-center coreset (``None`` = the
            full bank, the paper). **INFERRED** option to bound search time and export size.
        knn_chunk_size: Bank rows per block of the exact kNN search, in eager mode and in exported graphs (an
            exported model holds ``windows x knn_chunk_size`` distances per image at a time).
        noise_std: Photometric noise std on jigsaw patches (0.02).
        lr: Adam learning rate (1e-4, constant).
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) without normalisation (the model
            standardises with its mean training image instead of ImageNet statistics).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = SCLVI()                                           # paper settings, 256 px
        >>> Engine(max_steps=476_400).fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    # Memory banks change size with the training set: checkpoint loading re-sizes them instead of refusing them.
    resizable_buffers = ("memory_bank_64", "memory_bank_32")

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        image_size: int | tuple[int, int] | None = None,
        feature_dim: int = 64,
        width: float = 1.0,
        scales: tuple[int, ...] | list[int] = PAPER_SCALES,
        strides: dict[int, int] | None = None,
        k: int = 5,
        svdd_weight: float = 1.0,
        pair_batch_size: int = 64,
        coreset_ratio: float | None = None,
        knn_chunk_size: int = 65536,
        noise_std: float = 0.02,
        lr: float = 1e-4,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        if not (math.isfinite(lr) and lr > 0):
            msg = f"lr must be a finite number > 0, got {lr}."
            raise ValueError(msg)
        if coreset_ratio is not None and not 0 < coreset_ratio <= 1:
            msg = f"coreset_ratio must be in (0, 1] or None, got {coreset_ratio}."
            raise ValueError(msg)
        input_size = self.model_input_size(image_size)
        self.lr = float(lr)
        self.coreset_ratio = coreset_ratio
        self.model = SCLVIModel(
            image_size=input_size,
            feature_dim=feature_dim,
            width=width,
            scales=tuple(scales),
            strides=strides,
            k=k,
            pair_batch_size=pair_batch_size,
            knn_chunk_size=knn_chunk_size,
            noise_std=noise_std,
        )
        self.loss = SCLVILoss(svdd_weight=svdd_weight)
        self.model.use_svdd = svdd_weight > 0
        self.bank_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (256x256) without normalisation: the model subtracts its mean training image."""
        return resize_pre_processor(image_size or cls.default_image_size, normalize=False)

    @property
    def input_normalization(self) -> str:
        """``"none"``: Resize only; the torch model subtracts its mean training image itself."""
        return "none"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam, constant learning rate (1e-4), on the trainable encoder and classifier parameters."""
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)

    # ------------------------------------------------------------------------------------------------ fitted state
    def _input_size_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-processed training images, refused unless they have the size the model was built for."""
        if tuple(images.shape[-2:]) != self.model.image_size:
            msg = (
                f"training images are {images.shape[-2]}x{images.shape[-1]} after the pre-processor, but SCLVI was "
                f"built for {self.model.image_size}: give the pre-processor a Resize to image_size."
            )
            raise ValueError(msg)
        return images

    def compute_mean_image(self, dataloader: Iterable | None = None) -> None:
        """Per-pixel, per-channel mean of the training images at the input size, stored in ``model.mean_image``.

        The images come from the shared loop over the normal training images (dataset order, pre-processed, every
        rank's share gathered under DDP) and are averaged in float64 in dataset order, so every process stores the
        single-process mean exactly. ``dataloader``: raw normal images to use instead of the training set.
        """
        images = collect_normal_images(self, self._input_size_images, dataloader=dataloader)
        self.model.set_mean_image(images.double().mean(dim=0, keepdim=True).float())
        logger.info("SCLVI: mean image over %d training images.", images.shape[0])

    def build_memory_bank(self, dataloader: Iterable | None = None) -> dict[int, int]:
        """Embed every training window into the per-scale memory banks (after training); logs sizes and time.

        The embeddings come from the shared loop over the normal training images, so every DDP rank holds the
        banks of the whole training set, in dataset order. ``dataloader``: raw normal images instead.
        """
        start = time.perf_counter()
        rows = collect_normal_images(
            self, lambda images: self.model.bank_rows(self._input_size_images(images)), dataloader=dataloader
        )
        sizes = self.model.set_memory_banks(rows, coreset_ratio=self.coreset_ratio)
        self.bank_stats = {"bank_build_s": round(time.perf_counter() - start, 2)}
        self.bank_stats |= {f"bank_size_{s}": float(n) for s, n in sizes.items()}
        logger.info("SCLVI memory banks %s built in %.1f s.", sizes, self.bank_stats["bank_build_s"])
        return sizes

    def _refresh_bank(self) -> None:
        """(Re)build the banks of a trained model when they are missing or older than its last training step.

        The step counters are buffers, so this also holds for loaded checkpoints and weight snapshots (e.g.
        ``benchmarks/learning_curve.py``): testing a snapshot with a datamodule rebuilds its banks from its own
        weights. An untrained model (no mean image yet) is left alone: its forward raises the clear error.
        """
        if bool(self.model.mean_ready) and not self.model.bank_is_current and has_training_data(self):
            self.build_memory_bank()

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_start(self) -> None:
        """Mean training image, computed once (a resumed or re-fitted model keeps its own)."""
        if not bool(self.model.mean_ready):
            self.compute_mean_image()

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: Any, batch_idx: int) -> None:
        """Build the banks right after the last training step, so the checkpoint saved at epoch end carries them."""
        del outputs, batch, batch_idx
        trainer = self.trainer
        last_step = 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs > 0
        if last_step or (last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            self._refresh_bank()

    def on_train_end(self) -> None:
        """Banks for the final weights (if training stopped otherwise, e.g. ``max_time``)."""
        self._refresh_bank()

    def on_validation_start(self) -> None:
        """Banks for the current weights before validating (memory-bank models validate after fitting)."""
        self._refresh_bank()

    def on_test_start(self) -> None:
        """Rebuild the banks if training steps ran since they were built (needs the training data)."""
        self._refresh_bank()

    def on_predict_start(self) -> None:
        """Rebuild the banks if training steps ran since they were built (when the training data is at hand)."""
        self._refresh_bank()

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Jigsaw + SVDD pairs sampled on the fly from the batch's full images; returns the total loss."""
        del args, kwargs
        if not bool(self.model.mean_ready):
            self.compute_mean_image()
        self.model.trained_steps += 1
        losses = self.loss(self.model(batch.image))
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}
