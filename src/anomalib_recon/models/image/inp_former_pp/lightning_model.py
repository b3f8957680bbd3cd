"""INP-Former++: Intrinsic Normal Prototypes with residual learning, as an anomalib model.

Paper: Luo et al., *INP-Former++: Advancing Universal Anomaly Detection via Intrinsic Normal Prototypes and Residual
Learning*, arXiv 2506.03660 (extends INP-Former, CVPR 2025, arXiv 2503.02424). No official ++ code exists; the
deltas over anomalib's ``InpFormer`` and every inferred default are listed in this folder's README.

The reconstruction branch is anomalib's INP-Former (``AggregationBlock``, ``PrototypeBlock``, ``DinomalyMLP``, soft
mining). ++ adds a soft INP-coherence loss, an MSE soft-mining term, and a segmentation head on the stop-gradient
reconstruction residual, trained on Perlin pseudo-anomalies (optionally DTD textures, optionally a few real
anomalies pasted onto normal images); the inference map is ``½ (M_rec + M_seg)``. ``plus_plus=False`` switches all of
them off, leaving the base INP-Former on anomalib's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.models.image.dinomaly.components import StableAdamW, WarmCosineScheduler
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from anomalib_recon.components.anomaly_map import check_blur_fits
from anomalib_recon.components.checkpoint import is_restoring_from_checkpoint
from anomalib_recon.components.few_shot import dihedral_augment, restrict_to_few_shot
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import IMAGENET_MEAN, IMAGENET_STD, as_image_size, sized_pre_processor

from .loss import InpFormerPPLoss
from .torch_model import InpFormerPPModel

__all__ = ["InpFormerPP", "few_shot_augment", "load_real_anomalies"]

DEFAULT_IMAGE_SIZE = 448
DEFAULT_CROP_SIZE = 392
SCHEDULES = ("joint", "two_stage")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class FloatWarmCosineScheduler(WarmCosineScheduler):
    """anomalib's warm-cosine schedule (the same values) kept as Python floats.

    anomalib's scheduler holds its schedule as a numpy array and hands numpy scalars to the optimizer, so the
    checkpoint's scheduler and optimizer states pickle numpy objects and ``torch.load(..., weights_only=True)``
    refuses the file. Plain floats are the same doubles.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = [float(v) for v in self.schedule]

    def get_lr(self) -> list[float]:
        """The learning rate of every parameter group at this step, as floats."""
        return [float(lr) for lr in super().get_lr()]


def check_training_settings(
    lr: float, final_lr: float, warmup_iters: int, weight_decay: float, seg_loss_weight: float
) -> None:
    """One ``ValueError`` at construction for an optimizer or loss setting that would fail (or diverge) in ``fit``."""
    rules = (
        ("lr", lr, lr > 0, "> 0 (StableAdamW's peak learning rate; the paper uses 1e-3)"),
        ("final_lr", final_lr, final_lr >= 0, ">= 0 (the paper uses 1e-4)"),
        ("warmup_iters", warmup_iters, warmup_iters >= 0, ">= 0 (the paper uses 100)"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0 (the paper uses 1e-4)"),
        ("seg_loss_weight", seg_loss_weight, seg_loss_weight >= 0, ">= 0 (1 by default)"),
    )
    for name, value, ok, rule in rules:
        if not ok:  # also False for NaN
            msg = f"InpFormerPP: {name} must be {rule}, got {value}."
            raise ValueError(msg)


def few_shot_augment(
    images: torch.Tensor, max_degrees: float = 15.0, max_translate: float = 0.05, gray_probability: float = 0.1
) -> torch.Tensor:
    """Per-image augmentation of a normalised few-shot batch (RegAD-style: rotation, translation, flip, graying).

    INP-Former credits RegAD for its few-shot augmentation; anomalib's ``InpFormer`` has none. Each image gets a random
    element of the dihedral group (90° rotations, mirror; :func:`~anomalib_recon.components.few_shot.
    dihedral_augment`), then a small random rotation and translation (bilinear, the border filled with the image
    mean), and with ``gray_probability`` its ImageNet-normalised RGB is replaced by its luminance.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        msg = f"few_shot_augment expects a (B, 3, H, W) batch, got {tuple(images.shape)}."
        raise ValueError(msg)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(3, 1, 1)
    out = []
    for image in dihedral_augment(images):
        angle = float(torch.empty(1).uniform_(-max_degrees, max_degrees))
        width, height = int(image.shape[-1]), int(image.shape[-2])
        shift = [round(float(torch.empty(1).uniform_(-max_translate, max_translate)) * s) for s in (width, height)]
        fill = image.mean(dim=(1, 2)).tolist()
        image = TF.affine(image, angle=angle, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=fill)
        if float(torch.rand(1)) < gray_probability:
            rgb = image * std + mean
            gray = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).expand(3, -1, -1)
            image = (gray - mean) / std
        out.append(image)
    return torch.stack(out)


def _find_mask(masks: Path, stem: str) -> Path | None:
    for candidate in (stem, f"{stem}_mask"):
        for suffix in _IMAGE_SUFFIXES:
            path = masks / f"{candidate}{suffix}"
            if path.is_file():
                return path
    return None


def load_real_anomalies(path: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Read a semi-supervised anomaly folder: ``<path>/images/*`` with binary masks ``<path>/masks/<stem>[_mask].*``.

    Returns:
        ``(image, mask)`` pairs, image ``(3, H, W)`` float in [0, 1], mask ``(1, H, W)`` float in {0, 1}.
    """
    from torchvision.io import ImageReadMode, read_image

    root = Path(path).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        msg = (
            f"real_anomaly_path {str(root)!r} must contain 'images/' (anomalous images) and 'masks/' (binary masks "
            "with the same file stem, optionally suffixed '_mask')."
        )
        raise ValueError(msg)
    pairs = []
    for image_path in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
        mask_path = _find_mask(masks_dir, image_path.stem)
        if mask_path is None:
            msg = f"No mask for {image_path.name} in {masks_dir} (expected {image_path.stem}.png or _mask.png)."
            raise ValueError(msg)
        image = read_image(str(image_path), mode=ImageReadMode.RGB).float() / 255
        mask = (read_image(str(mask_path), mode=ImageReadMode.GRAY).float() > 127).float()
        if image.shape[-2:] != mask.shape[-2:]:
            msg = f"{image_path.name}: image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} differ."
            raise ValueError(msg)
        if mask.sum() == 0:
            msg = f"{mask_path.name} is empty; a real anomaly needs a non-empty mask."
            raise ValueError(msg)
        pairs.append((image, mask))
    if not pairs:
        msg = f"real_anomaly_path {str(root)!r}: no images found in {images_dir}."
        raise ValueError(msg)
    return pairs


class InpFormerPP(ReconModuleMixin, AnomalibModule):
    """INP-Former++ (residual learning on INP-Former), built on anomalib's INP-Former blocks.

    Args:
        backbone: Frozen encoder (timm name). Paper: ``"vit_base_patch14_reg4_dinov2"``; any timm ViT, or a CNN such
            as ``"tf_efficientnet_lite0"`` (stages concatenated on one token grid; see README).
        layers: Target layers (ViT blocks, default 2-9 of 12 / 4, 6, ..., 18 of 24; CNN stages, default ``[1, 2, 3]``).
        weights: ``"imagenet"`` (timm's pretrained weights, offline-aware), a local weights file, or ``None``.
        image_size: Resize of the default pre-processor (448).
        crop_size: Center crop after the resize; ``None`` = the paper's 392 when ``image_size`` is 448, else no crop.
        num_inps: Number of INPs (6).
        decoder_depth: INP-guided decoder blocks (8).
        num_heads: Attention heads (``None``: the ViT's; for CNNs the largest of 8/4/2/1 dividing the width).
        mlp_ratio: MLP expansion (4).
        encoder_groups: Target-layer groups compared with the decoder groups (default the two halves).
        decoder_groups: Decoder-output groups (default the two halves).
        cnn_stride: CNN token-grid stride (default the middle stage's).
        plus_plus: Master switch for the ++ additions; ``False`` = base INP-Former (hard coherence, cosine soft
            mining only, no head). The options below left at ``None`` follow it.
        coherence: ``"soft"`` (++) or ``"hard"`` (base); ``None`` follows ``plus_plus``.
        tau: Soft-coherence temperature τ (1; τ → 0 gives the hard loss).
        coherence_weight: Weight of the coherence loss (0.2).
        mse_mining: Add the soft-mining MSE term; ``None`` follows ``plus_plus``.
        mse_weight: Weight of the MSE term (1).
        mining_power: Soft-mining exponent γ (3).
        residual_head: Train the segmentation head on the residual; ``None`` follows ``plus_plus``.
        seg_channels: Channels after the head's two transposed convs (256, 64; unpublished).
        seg_loss: ``"dice_focal"`` (default), ``"focal"`` or ``"dice"``.
        focal_gamma: Focal γ (2).
        seg_loss_weight: Weight of the segmentation loss in the joint objective (1).
        seg_stop_gradient: Detach the residual so the head never updates the rest (paper: yes).
        anomaly_source_path: Texture folder (e.g. DTD ``images/``) for the Perlin pseudo-anomalies; ``None`` = Perlin
            noise textures (nothing downloaded).
        anomaly_probability: Probability that a pseudo-anomaly is drawn into a training image (0.5).
        real_anomaly_path: Semi-supervised setting: folder with ``images/`` and ``masks/`` of a few real anomalies;
            their anomalous regions (randomly rotated/flipped) are pasted onto normal training images.
        real_anomaly_probability: Probability that a training image gets a real (instead of Perlin) anomaly (0.5).
        schedule: ``"joint"`` (normal losses + head every step, stop-gradient; default) or ``"two_stage"`` (the
            first ``seg_start`` of training fits the reconstruction only, the rest the head only).
        seg_start: Fraction of training where the head starts in ``"two_stage"`` (2/3: 200 + 100 epochs).
        rec_map: ``M_rec`` = ``"cos"`` (base) or ``"cos_l2"`` (``½(1 − cos + ‖·‖₂)``).
        fusion: ``"mean"`` (``½(M_rec + M_seg)``), ``"rec"`` or ``"seg"``; ``None`` = mean with the head, else rec.
        rec_normalization: ``"none"`` or ``"minmax"`` (scale ``M_rec`` by running statistics of the normal training
            images before fusion: 0 at their smallest, 1 at their largest error); ``None`` = ``"minmax"`` when the
            map fuses the head's probability (``fusion="mean"``), else ``"none"``.
        blur_sigma: Gaussian σ of the map (4).
        blur_kernel: Gaussian kernel (5); a kernel whose half-width reaches the input size is a ``ValueError`` at
            construction.
        score_topk: Fraction of top pixels averaged into the image score (0.01).
        lr: Peak StableAdamW learning rate (1e-3).
        final_lr: Learning rate at the end of the cosine decay (1e-4).
        warmup_iters: Linear warm-up steps (100).
        weight_decay: StableAdamW weight decay (1e-4).
        few_shot_k: Few-shot: train on ``k`` normal images (seeded), each repeated ``few_shot_folds`` times per epoch
            and augmented with :func:`few_shot_augment`. ``None`` = all images.
        few_shot_folds: Replication of each few-shot image per epoch (32).
        few_shot_seed: Seed choosing the few-shot images.
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) → CenterCrop(``crop_size``) → Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = InpFormerPP(backbone="tf_efficientnet_lite0", image_size=256)
        >>> Engine(max_steps=300).fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "vit_base_patch14_reg4_dinov2",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
        crop_size: int | tuple[int, int] | None = None,
        num_inps: int = 6,
        decoder_depth: int = 8,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        encoder_groups: list[list[int]] | None = None,
        decoder_groups: list[list[int]] | None = None,
        cnn_stride: int | None = None,
        plus_plus: bool = True,
        coherence: str | None = None,
        tau: float = 1.0,
        coherence_weight: float = 0.2,
        mse_mining: bool | None = None,
        mse_weight: float = 1.0,
        mining_power: float = 3.0,
        residual_head: bool | None = None,
        seg_channels: tuple[int, int] = (256, 64),
        seg_loss: str = "dice_focal",
        focal_gamma: float = 2.0,
        seg_loss_weight: float = 1.0,
        seg_stop_gradient: bool = True,
        anomaly_source_path: str | None = None,
        anomaly_probability: float = 0.5,
        real_anomaly_path: str | None = None,
        real_anomaly_probability: float = 0.5,
        schedule: str = "joint",
        seg_start: float = 2 / 3,
        rec_map: str = "cos",
        fusion: str | None = None,
        rec_normalization: str | None = None,
        blur_sigma: float | None = 4.0,
        blur_kernel: int = 5,
        score_topk: float = 0.01,
        lr: float = 1e-3,
        final_lr: float = 1e-4,
        warmup_iters: int = 100,
        weight_decay: float = 1e-4,
        few_shot_k: int | None = None,
        few_shot_folds: int = 32,
        few_shot_seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        resize, crop = self._sizes(image_size, crop_size)
        check_training_settings(lr, final_lr, warmup_iters, weight_decay, seg_loss_weight)
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor, crop_size=crop_size),
            post_processor,
            evaluator,
            visualizer,
        )
        coherence = coherence if coherence is not None else ("soft" if plus_plus else "hard")
        mse_mining = bool(plus_plus) if mse_mining is None else bool(mse_mining)
        residual_head = bool(plus_plus) if residual_head is None else bool(residual_head)
        if schedule not in SCHEDULES:
            msg = f"schedule must be one of {SCHEDULES}, got {schedule!r}."
            raise ValueError(msg)
        if schedule == "two_stage" and not residual_head:
            msg = "schedule='two_stage' trains the segmentation head in its second stage; it needs residual_head=True."
            raise ValueError(msg)
        if not 0 < seg_start < 1:
            msg = f"seg_start must be a fraction in (0, 1), got {seg_start}."
            raise ValueError(msg)
        for name, value in (
            ("anomaly_probability", anomaly_probability),
            ("real_anomaly_probability", real_anomaly_probability),
        ):
            if not 0 <= value <= 1:
                msg = f"{name} must be a probability in [0, 1], got {value}."
                raise ValueError(msg)
        if few_shot_k is not None and (few_shot_k < 1 or few_shot_folds < 1):
            msg = f"few_shot_k and few_shot_folds must be >= 1, got {few_shot_k} and {few_shot_folds}."
            raise ValueError(msg)
        # training-data folders are checked when building a model to train, not when restoring one elsewhere
        loading = is_restoring_from_checkpoint()
        if anomaly_source_path is not None and not Path(anomaly_source_path).expanduser().is_dir() and not loading:
            msg = (
                f"anomaly_source_path {anomaly_source_path!r} is not a folder; pass a folder of texture images "
                "(e.g. DTD's images/) or None for Perlin-noise textures."
            )
            raise ValueError(msg)
        if real_anomaly_path is not None and not residual_head:
            msg = "real_anomaly_path trains the segmentation head; it needs residual_head=True."
            raise ValueError(msg)

        self.resize_size, self.crop_size = resize, crop
        # The input size comes from the pre-processor (after its Resize/CenterCrop), as in every model; image_size and
        # crop_size only build the default one.
        input_size = self.input_size
        self.model_image_size = (int(input_size[0]), int(input_size[1])) if input_size is not None else crop or resize
        # the fused map is blurred at the input size: a kernel larger than the input is refused here
        check_blur_fits(blur_sigma, blur_kernel, self.model_image_size, "InpFormerPP")
        self.schedule = schedule
        self.seg_start = float(seg_start)
        self.seg_loss_weight = float(seg_loss_weight)
        self.lr, self.final_lr = float(lr), float(final_lr)
        self.warmup_iters = int(warmup_iters)
        self.weight_decay = float(weight_decay)
        self.few_shot_k, self.few_shot_folds, self.few_shot_seed = few_shot_k, int(few_shot_folds), int(few_shot_seed)
        self.real_anomaly_path = real_anomaly_path
        self.real_anomaly_probability = float(real_anomaly_probability)
        self._real_anomalies: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if real_anomaly_path is not None and not loading:
            self._real_anomalies = load_real_anomalies(real_anomaly_path)  # fail early on a bad folder
        self._total_steps: int | None = None

        self.model = InpFormerPPModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=self.model_image_size,
            num_inps=num_inps,
            decoder_depth=decoder_depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            encoder_groups=encoder_groups,
            decoder_groups=decoder_groups,
            cnn_stride=cnn_stride,
            residual_head=residual_head,
            seg_channels=seg_channels,
            seg_stop_gradient=seg_stop_gradient,
            rec_map=rec_map,
            fusion=fusion,
            rec_normalization=rec_normalization,
            blur_sigma=blur_sigma,
            blur_kernel=blur_kernel,
            score_topk=score_topk,
        )
        self.loss = InpFormerPPLoss(
            coherence=coherence,
            tau=tau,
            coherence_weight=coherence_weight,
            mse_mining=mse_mining,
            mse_weight=mse_weight,
            mining_power=mining_power,
            seg_loss=seg_loss,
            focal_gamma=focal_gamma,
        )
        self.augmenter = (
            PerlinAnomalyGenerator(
                anomaly_source_path=anomaly_source_path, probability=anomaly_probability, blend_factor=(0.2, 1.0)
            )
            if residual_head
            else None
        )
        if anomaly_source_path is not None and not self.augmenter.anomaly_source_paths and not loading:
            msg = f"anomaly_source_path {anomaly_source_path!r} contains no images."
            raise ValueError(msg)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------------ configuration
    @staticmethod
    def _sizes(
        image_size: int | Sequence[int] | None, crop_size: int | Sequence[int] | None
    ) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(resize, crop) with the defaults: 448 → 392 for the paper's resize, no crop for any other size."""
        resize = as_image_size(image_size if image_size is not None else DEFAULT_IMAGE_SIZE)
        if crop_size is None:
            crop = as_image_size(DEFAULT_CROP_SIZE) if resize == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE) else None
        else:
            crop = as_image_size(crop_size, "crop_size")
            if crop[0] > resize[0] or crop[1] > resize[1]:
                msg = f"crop_size {crop} cannot be larger than image_size {resize}."
                raise ValueError(msg)
            crop = None if crop == resize else crop
        return resize, crop

    @classmethod
    def configure_pre_processor(
        cls, image_size: int | tuple[int, int] | None = None, crop_size: int | tuple[int, int] | None = None
    ) -> PreProcessor:
        """Resize (448) → CenterCrop (392 for the 448 default, else none unless given) → ImageNet Normalize."""
        from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

        resize, crop = cls._sizes(image_size, crop_size)
        transforms: list = [Resize(resize, antialias=False)]  # as in forward/export: see resize_pre_processor
        if crop is not None:
            transforms.append(CenterCrop(crop))
        transforms.append(Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
        return PreProcessor(transform=Compose(transforms))

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping 0.1 (paper) and no sanity validation; epochs/steps are left to the user."""
        return {"gradient_clip_val": 0.1, "num_sanity_val_steps": 0}

    def _total_training_steps(self) -> int:
        trainer = self._trainer
        total = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
        if total is None or total == float("inf") or total <= 0:
            msg = "InpFormerPP needs a finite training length: set max_steps or max_epochs on the Engine/Trainer."
            raise ValueError(msg)
        return int(total)

    def configure_optimizers(self) -> dict[str, Any]:
        """StableAdamW (amsgrad, eps 1e-10) on the INP tokens, extractor, bottleneck, decoder and head, with the
        warm-cosine schedule ``lr → final_lr`` stepped every optimizer step."""
        optimizer = StableAdamW(
            self.model.trainable_parameters(),
            lr=self.lr,
            betas=(0.9, 0.999),
            weight_decay=self.weight_decay,
            amsgrad=True,
            eps=1e-10,
        )
        self._total_steps = self._total_training_steps()
        scheduler = FloatWarmCosineScheduler(
            optimizer,
            base_value=self.lr,
            final_value=self.final_lr,
            total_iters=self._total_steps,
            warmup_iters=min(self.warmup_iters, self._total_steps),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ few-shot
    def setup(self, stage: str) -> None:
        """Few-shot: reduce the datamodule's training set to ``few_shot_k`` images × ``few_shot_folds``."""
        if self.few_shot_k is None or stage != "fit":
            return
        restrict_to_few_shot(self.trainer, self.few_shot_k, self.few_shot_folds, self.few_shot_seed, "InpFormerPP")

    # ------------------------------------------------------------------------------------------------ pseudo-anomalies
    def _real_anomaly_batch(self, count: int, size: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``count`` normalised real anomalies with masks at ``size``: resized/cropped like the training images,
        randomly rotated by multiples of 90° and mirrored (image and mask together)."""
        pairs = self._real_anomalies
        picks = torch.randint(len(pairs), (count,)).tolist()
        images, masks = [], []
        for i in picks:
            image, mask = pairs[i]
            image = TF.resize(image, list(self.resize_size), antialias=False)  # like the pre-processor
            mask = TF.resize(mask, list(self.resize_size), interpolation=TF.InterpolationMode.NEAREST)
            if self.crop_size is not None:
                image, mask = TF.center_crop(image, list(self.crop_size)), TF.center_crop(mask, list(self.crop_size))
            if tuple(image.shape[-2:]) != size:  # a custom pre-processor: match the batch
                image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
                mask = F.interpolate(mask[None], size=size, mode="nearest")[0]
            images.append(image)
            masks.append(mask)
        stacked = dihedral_augment(torch.cat([torch.stack(images), torch.stack(masks)], dim=1))
        image = stacked[:, :3].to(like)
        return (image - self._mean) / self._std, stacked[:, 3:].to(like)

    @torch.no_grad()
    def synthesize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-anomalous copies of a normalised normal batch and their masks ``(B, 1, H, W)``.

        Perlin anomalies (anomalib's ``PerlinAnomalyGenerator`` on the de-normalised [0, 1] images); with
        ``real_anomaly_path``, each image instead gets a real anomalous region with probability
        ``real_anomaly_probability`` (semi-supervised setting).
        """
        if self.augmenter is None:
            msg = "No segmentation head (residual_head=False): nothing to synthesize anomalies for."
            raise RuntimeError(msg)
        if self._real_anomalies is None and self.real_anomaly_path is not None:
            self._real_anomalies = load_real_anomalies(self.real_anomaly_path)
        raw = (images * self._std + self._mean).clamp(0, 1)
        augmented, masks = self.augmenter(raw)
        augmented = ((augmented.to(images.dtype) - self._mean) / self._std).to(images.dtype)
        masks = masks.to(images.dtype)
        if self._real_anomalies:
            real = torch.rand(images.shape[0]) < self.real_anomaly_probability
            if real.any():
                idx = real.nonzero().flatten().to(images.device)
                size = (int(images.shape[-2]), int(images.shape[-1]))
                source, region = self._real_anomaly_batch(len(idx), size, images)
                augmented[idx] = images[idx] * (1 - region) + source * region
                masks[idx] = region
        return augmented, masks

    # ------------------------------------------------------------------------------------------------ training
    def _stage(self) -> str:
        """``"joint"``, or in the two-stage schedule ``"reconstruction"`` then ``"head"``."""
        if self.schedule == "joint":
            return "joint"
        total = self._total_steps or self._total_training_steps()
        return "reconstruction" if self.global_step < self.seg_start * total else "head"

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Normal-modelling losses on the normal images; the head's loss on their pseudo-anomalous copies."""
        del args, kwargs
        images = batch.image
        if self.few_shot_k is not None:
            images = few_shot_augment(images)
        stage = self._stage()
        size = images.shape[0]
        logs: dict[str, torch.Tensor] = {}
        loss = images.new_zeros(())
        if stage == "head":
            augmented, masks = self.synthesize(images)
            prediction, _ = self.model.pseudo_anomaly_segmentation(augmented)
            logs["train_seg_loss"] = seg = self.loss.segmentation_loss(prediction, masks)
            loss = self.seg_loss_weight * seg
        else:
            with_head = stage == "joint" and self.model.seg_head is not None
            augmented, masks = self.synthesize(images) if with_head else (None, None)
            output = self.model(images, augmented)
            terms = self.loss.normal_loss(
                output.encoder_features, output.decoder_features, output.query, output.prototypes
            )
            loss = terms["loss"]
            logs |= {f"train_{k}_loss": v for k, v in terms.items() if k != "loss"}
            if output.seg_prediction is not None:
                logs["train_seg_loss"] = seg = self.loss.segmentation_loss(output.seg_prediction, masks)
                loss = loss + self.seg_loss_weight * seg
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in logs.items():
            self.log(name, value, on_step=False, on_epoch=True, batch_size=size)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict maps and scores; logs the mean of ``M_rec`` and ``M_seg`` (their scales differ)."""
        del args, kwargs
        rec, seg = self.model.predict_maps(batch.image)
        size = batch.image.shape[0]
        if rec is not None:
            self.log("val_rec_map_mean", rec.mean(), on_epoch=True, batch_size=size)
        if seg is not None:
            self.log("val_seg_map_mean", seg.mean(), on_epoch=True, batch_size=size)
        predictions = self.model.fuse(rec, seg)
        return batch.update(**predictions._asdict())
