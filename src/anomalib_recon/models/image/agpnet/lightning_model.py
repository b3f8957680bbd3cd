"""AGPNet: Attention-Guided Perturbation Network for industrial anomaly detection.

Paper: Huang et al., *Not All Regions Are Equal: Attention-Guided Perturbation Network for Industrial Anomaly
Detection* (v1: *Attention-Guided Perturbation for Unsupervised Image Anomaly Detection*), arXiv 2408.07490.
No public code exists; unknown details follow the ADer/ViTAD defaults (listed in this folder's README).

A frozen encoder's multi-layer features are reconstructed by a plain ViT decoder. During training an auxiliary
branch perturbs the features and the image with Gaussian noise weighted by an attention mask (the encoder's prior
attention plus the attention of an EMA "mean-teacher" decoder); the noise intensity and the perturbed image area
grow over training ("easy → hard"). Only the encoder and decoder are used at test time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.anomaly_map import check_blur_fits
from anomalib_recon.components.few_shot import dihedral_augment, restrict_to_few_shot
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import sized_pre_processor
from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr, training_horizon

from .loss import AGPNetLoss
from .schedule import linear_ramp
from .torch_model import AGPNetModel

logger = logging.getLogger(__name__)

__all__ = ["AGPNet"]

SCHEDULES = ("linear", "constant")
DEFAULT_IMAGE_SIZE = (256, 256)


def check_training_settings(lr: float, weight_decay: float, betas: Sequence[float]) -> None:
    """One ``ValueError`` at construction for an AdamW setting that would fail (or diverge) in ``fit``."""
    pair = tuple(float(b) for b in betas)
    rules = (
        ("lr", lr, lr > 0, "> 0 (AdamW's learning rate; the paper's set-up uses 1e-4)"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0 (1e-4 by default)"),
        ("betas", betas, len(pair) == 2 and all(0 <= b < 1 for b in pair), "two values in [0, 1), e.g. (0.9, 0.999)"),
    )
    for name, value, ok, rule in rules:
        if not ok:  # also False for NaN
            msg = f"AGPNet: {name} must be {rule}, got {value}."
            raise ValueError(msg)


def _pair(
    value: Sequence[float], name: str, low: float | None = None, high: float | None = None
) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        msg = f"{name} must be a pair (start, end), got {value!r}."
        raise ValueError(msg)
    if (low is not None and min(pair) < low) or (high is not None and max(pair) > high):
        msg = f"{name} must lie in [{low}, {high}], got {value!r}."
        raise ValueError(msg)
    return pair  # type: ignore[return-value]


class AGPNet(ReconModuleMixin, AnomalibModule):
    """AGPNet: ViT feature reconstruction trained with attention-guided feature- and image-level noise.

    Args:
        backbone: Frozen encoder, a timm name. Paper: ``"vit_small_patch16_224.dino"`` (DINO ViT-S/16, input 256).
            CNNs such as ``"tf_efficientnet_lite0"`` also work (prior attention = channel mean of ``|features|``).
        layers: Encoder layers: ViT 0-based block indices (default ``[2, 5, 8, 11]``, i.e. blocks 3/6/9/12), CNN
            ``features_only`` indices (default ``[1, 2, 3]``).
        weights: ``"imagenet"`` (pretrained, offline-aware), a local weights file, or ``None`` (random init).
        image_size: Input size of the default pre-processor and of the decoder's position embedding: a multiple of
            the encoder stride (16), and larger than the blur's reach (at least 17 px with ``blur_sigma=4``); any
            other size is a ``ValueError`` at construction.
        aggregation: ``"sum"`` of layer-normed layers (paper, ViT default), ``"concat"`` (CNN default) or ``None``.
        decoder_embed_dim: Decoder width (``None``: the ViT's width, 384 for CNNs).
        decoder_depth: Decoder blocks (4, paper).
        decoder_num_heads: Decoder heads (6).
        decoder_mlp_ratio: Decoder MLP ratio (4; 7.3 M decoder parameters with ViT-S, the paper reports 4.42 M).
        feature_noise: Feature-level noise ``"attention"`` (guided), ``"random"`` or ``"none"`` (ablation).
        image_noise: Image-level noise ``"attention"``, ``"random"`` or ``"none"`` (ablation).
        attention_source: ``"both"``, ``"prior"`` (encoder only) or ``"learnable"`` (decoder only) (ablation).
        prior_attention: ViT prior ``"cls"`` (CLS→patch attention) or ``"received"``.
        use_mean_teacher: Learnable attention from the EMA teacher (True) or from the decoder itself (ablation).
        ema_decay: Teacher EMA decay η (0.999; the paper's text: 0.9999 every 10 steps, see ``configs/agpnet.yaml``).
        ema_update_every: Teacher update period in steps.
        feature_noise_range: ``(min, max)`` intensity α of the guided feature noise (0 → 1).
        feature_noise_ramp: Fractions of training where α ramps from min to max (paper: epochs 1-400 of 500).
        feature_noise_schedule: ``"linear"`` ramp or ``"constant"`` (α = max throughout; ablation).
        feature_noise_floor: Constant noise level β under the guided part.
        mask_ratio_range: ``(start, end)`` fraction of pixels receiving image-level noise (0.6 → 1.0).
        mask_ratio_ramp: Fractions of training where the ratio ramps (paper: epochs 100-400 of 500).
        image_noise_scale: σ of the image-level Gaussian noise relative to each input image's standard deviation
            (0.5; **INFERRED**, the paper gives no σ; see the README's "Image noise").
        distance: ``"l2"`` (paper, Eq. 8: MSE loss and ``‖F − F̂‖₂`` map) or ``"cos"`` (``1 − cos`` loss and map).
            One argument sets both the training loss and the anomaly map, so the map measures what the loss trains.
        blur_sigma: Gaussian σ of the anomaly map (4; ``None``/0 = off).
        score_kernel_size: Average-pool kernel of the image score (16 at 256 px).
        lr: AdamW learning rate (1e-4).
        weight_decay: AdamW weight decay (1e-4).
        betas: AdamW betas.
        lr_milestones: Where the learning rate is multiplied by ``lr_gamma``: fractions of training in (0, 1) or
            epoch numbers (:mod:`~anomalib_recon.components.schedules`); ``(0.8,)`` as ADer (the paper's 200 of 500
            epochs is 0.4); empty = constant.
        lr_gamma: Learning-rate factor (0.1).
        few_shot_k: Train on only ``k`` normal images (drawn with ``few_shot_seed``), each repeated
            ``few_shot_folds`` times per epoch with random rotations/flips. ``None`` = all images.
        few_shot_folds: Replication factor of the few-shot images (32, paper).
        few_shot_seed: Seed choosing the few-shot images.
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = AGPNet(backbone="tf_efficientnet_lite0")
        >>> Engine(max_epochs=100).fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "vit_small_patch16_224.dino",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] = 256,
        aggregation: str | None = None,
        decoder_embed_dim: int | None = None,
        decoder_depth: int = 4,
        decoder_num_heads: int = 6,
        decoder_mlp_ratio: float = 4.0,
        feature_noise: str = "attention",
        image_noise: str = "attention",
        attention_source: str = "both",
        prior_attention: str = "cls",
        use_mean_teacher: bool = True,
        ema_decay: float = 0.999,
        ema_update_every: int = 1,
        feature_noise_range: tuple[float, float] = (0.0, 1.0),
        feature_noise_ramp: tuple[float, float] = (0.0, 0.8),
        feature_noise_schedule: str = "linear",
        feature_noise_floor: float = 0.1,
        mask_ratio_range: tuple[float, float] = (0.6, 1.0),
        mask_ratio_ramp: tuple[float, float] = (0.2, 0.8),
        image_noise_scale: float = 0.5,
        distance: str = "l2",
        blur_sigma: float | None = 4.0,
        score_kernel_size: int = 16,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_milestones: Sequence[float] = (0.8,),
        lr_gamma: float = 0.1,
        few_shot_k: int | None = None,
        few_shot_folds: int = 32,
        few_shot_seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_training_settings(lr, weight_decay, betas)
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        if feature_noise_schedule not in SCHEDULES:
            msg = f"feature_noise_schedule must be one of {SCHEDULES}, got {feature_noise_schedule!r}."
            raise ValueError(msg)
        self.feature_noise_range = _pair(feature_noise_range, "feature_noise_range", low=0.0)
        self.feature_noise_ramp = _pair(feature_noise_ramp, "feature_noise_ramp", 0.0, 1.0)
        self.mask_ratio_range = _pair(mask_ratio_range, "mask_ratio_range", 0.0, 1.0)
        self.mask_ratio_ramp = _pair(mask_ratio_ramp, "mask_ratio_ramp", 0.0, 1.0)
        for name, ramp in (("feature_noise_ramp", self.feature_noise_ramp), ("mask_ratio_ramp", self.mask_ratio_ramp)):
            if ramp[0] > ramp[1]:
                msg = f"{name} must be (begin, end) with begin <= end, got {ramp}."
                raise ValueError(msg)
        if few_shot_k is not None and (few_shot_k < 1 or few_shot_folds < 1):
            msg = f"few_shot_k and few_shot_folds must be >= 1, got {few_shot_k} and {few_shot_folds}."
            raise ValueError(msg)

        self.feature_noise_schedule = feature_noise_schedule
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = _pair(betas, "betas")
        self.lr_milestones = check_lr_schedule(lr_milestones, lr_gamma)
        self.lr_gamma = float(lr_gamma)
        self.few_shot_k = few_shot_k
        self.few_shot_folds = int(few_shot_folds)
        self.few_shot_seed = int(few_shot_seed)
        self._warned_no_horizon = False

        # The input size comes from the pre-processor (its Resize), as in every model: a user's own pre-processor of
        # another size must not leave the decoder's position embedding at image_size's grid.
        size = self.model_input_size(image_size)
        # the map is blurred at the input size: a blur larger than the input is refused here, not at the first forward
        check_blur_fits(blur_sigma, None, size, "AGPNet")
        self.model = AGPNetModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=size,
            aggregation=aggregation,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            decoder_mlp_ratio=decoder_mlp_ratio,
            feature_noise=feature_noise,
            image_noise=image_noise,
            attention_source=attention_source,
            prior_attention=prior_attention,
            use_mean_teacher=use_mean_teacher,
            ema_decay=ema_decay,
            ema_update_every=ema_update_every,
            feature_noise_floor=feature_noise_floor,
            image_noise_scale=image_noise_scale,
            distance=distance,
            blur_sigma=blur_sigma,
            score_kernel_size=score_kernel_size,
        )
        self.loss = AGPNetLoss(self.model.distance)  # the map's distance: they cannot disagree
        self.set_progress(0.0)

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the decoder only; ×``lr_gamma`` at ``lr_milestones`` (fractions of the epochs, or of the steps)."""
        optimizer = torch.optim.AdamW(
            self.model.decoder.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        return multistep_lr(optimizer, self.lr_milestones, self.lr_gamma, self._trainer)

    # ------------------------------------------------------------------------------------------------ schedules
    @staticmethod
    def _ramp(values: tuple[float, float], ramp: tuple[float, float], position: int, total: int) -> float:
        """Linear ramp between the training fractions ``ramp`` (0-based position of ``total``)."""
        last = max(total - 1, 0)
        begin, end = round(ramp[0] * last), round(ramp[1] * last)
        return linear_ramp(values[0], values[1], position, total, begin_epoch=begin, end_epoch=end)

    def set_progress(self, position: int | float, total: int | None = None) -> None:
        """Set α (feature-noise intensity) and ρ (image mask ratio) for ``position`` of ``total`` epochs/steps.

        ``total=None`` with a float ``position`` in [0, 1] sets the values at that fraction of training.
        """
        if total is None:
            total = 1001
            position = round(float(position) * (total - 1))
        position = int(position)
        if self.feature_noise_schedule == "constant":
            alpha = self.feature_noise_range[1]
        else:
            alpha = self._ramp(self.feature_noise_range, self.feature_noise_ramp, position, total)
        self.model.feature_noise_intensity = alpha
        self.model.mask_ratio = self._ramp(self.mask_ratio_range, self.mask_ratio_ramp, position, total)

    def _update_schedules(self, unit: str) -> None:
        horizon = training_horizon(self._trainer)
        if horizon is None:
            if not self._warned_no_horizon:
                logger.warning(
                    "AGPNet: neither max_epochs nor max_steps is set; noise intensity and mask ratio are held at "
                    "their final values (%s, %s).",
                    self.feature_noise_range[1],
                    self.mask_ratio_range[1],
                )
                self._warned_no_horizon = True
            self.set_progress(1.0)
            return
        kind, total = horizon
        if kind == unit:
            self.set_progress(self.current_epoch if kind == "epoch" else self.global_step, total)

    def on_train_epoch_start(self) -> None:
        """Evaluate the easy → hard ramps for this epoch (epoch-based training)."""
        self._update_schedules("epoch")

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Evaluate the ramps for this step (step-based training, ``max_epochs=-1``)."""
        del batch, batch_idx
        self._update_schedules("step")

    # ------------------------------------------------------------------------------------------------ few-shot
    def setup(self, stage: str) -> None:
        """Few-shot: reduce the datamodule's training set to ``few_shot_k`` images × ``few_shot_folds``."""
        if self.few_shot_k is None or stage != "fit":
            return
        restrict_to_few_shot(self.trainer, self.few_shot_k, self.few_shot_folds, self.few_shot_seed, "AGPNet")

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Perturb (attention-guided), reconstruct, return the loss."""
        del args, kwargs
        images = batch.image
        if self.few_shot_k is not None:
            images = dihedral_augment(images)
        output = self.model(images)
        loss = self.loss(output.target, output.reconstructions)
        size = images.shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, logger=True, batch_size=size)
        self.log("feature_noise_intensity", self.model.feature_noise_intensity, on_epoch=True, batch_size=size)
        self.log("mask_ratio", self.model.mask_ratio, on_epoch=True, batch_size=size)
        return {"loss": loss}

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: Batch, batch_idx: int) -> None:
        """EMA update of the mean teacher after the optimizer step."""
        del outputs, batch, batch_idx
        self.model.update_teacher()
