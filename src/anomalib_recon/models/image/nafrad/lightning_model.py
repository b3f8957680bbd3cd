"""NAFRAD: Neighborhood Attention-based Feature Reconstruction for image anomaly detection and localization.

Paper: *Neighborhood Attention-based Feature Reconstruction for Image Anomaly Detection and Localization*,
ACM TOMM 22(3), article 73, 2026. Authors' code: GitHub Math-Computer/NAFRAD, commit 7cbcfe1.

A frozen backbone's shallow features (plus the raw image) are reconstructed by a neighborhood-attention
autoencoder trained on DRAEM-style synthetic anomalies to output the *normal* features; a DRAEM discriminative
U-Net segments the squared reconstruction residual into the anomaly map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import InterpolationMode, Normalize
from torchvision.transforms.v2 import functional as TF

from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    resize_pre_processor,
    sized_pre_processor,
)
from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr
from anomalib_recon.components.standardization import measure_feature_statistics

from .loss import NAFRADLoss
from .torch_model import NAFRADModel, resolve_backbone, rotation_range

logger = logging.getLogger(__name__)

SKIMAGE_TEXTURES = ("brick", "grass", "gravel")
"""Real texture photographs (512×512 grayscale PNG) inside scikit-image's wheel, used by
``anomaly_source_path="skimage"``."""


def skimage_texture_paths() -> list[Path]:
    """Paths of scikit-image's bundled brick, grass and gravel textures (no download).

    **INFERRED** offline stand-in for DTD: the reference blends DTD textures; without DTD, Perlin noise alone is the
    texture, which the segmentation head learns to spot but which transfers poorly to real defects.
    """
    try:
        import skimage.data
    except ImportError as err:
        msg = "anomaly_source_path='skimage' needs scikit-image: pip install scikit-image."
        raise ValueError(msg) from err
    folder = Path(skimage.data.__file__).parent
    paths = [folder / f"{name}.png" for name in SKIMAGE_TEXTURES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        msg = f"anomaly_source_path='skimage': this scikit-image has no bundled textures {missing}."
        raise ValueError(msg)
    return paths


__all__ = ["NAFRAD"]

DEFAULT_IMAGE_SIZE = (256, 256)


def check_training_settings(lr: float, weight_decay: float, focal_gamma: float, drop_path_rate: float) -> None:
    """One ``ValueError`` at construction for an optimizer or loss setting that would fail (or diverge) in ``fit``."""
    rules = (
        ("lr", lr, lr > 0, "> 0 (Adam's learning rate; the paper uses 1e-4)"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0 (the paper uses 1e-8)"),
        ("focal_gamma", focal_gamma, focal_gamma >= 0, ">= 0 (the paper uses 4)"),
        ("drop_path_rate", drop_path_rate, 0 <= drop_path_rate < 1, "in [0, 1) (the paper uses 0.1)"),
    )
    for name, value, ok, rule in rules:
        if not ok:  # also False for NaN
            msg = f"NAFRAD: {name} must be {rule}, got {value}."
            raise ValueError(msg)


class NAFRAD(ReconModuleMixin, AnomalibModule):
    """NAFRAD (TOMM 2026): NA-autoencoder feature reconstruction + segmentation of the residual.

    Args:
        backbone: ``"auto"`` (the reference's per-category choice from ``category``: Swin-L for carpet, grid, wood,
            capsule, hazelnut, screw, toothbrush; ResNet18 otherwise), ``"resnet18"``, ``"swin_l"`` or any timm CNN
            name (e.g. ``"tf_efficientnet_lite0"``).
        layers: Backbone layers; ``None`` = ResNet ``["layer1", "layer2"]``, Swin ``[0, 1]``, other CNNs ``[1, 2]``.
        weights: ``"imagenet"`` (pretrained, offline-aware), a local weights file, or ``None`` (random init).
        category: MVTec AD category name for ``backbone="auto"`` and the rotation range table.
        image_size: Input size of the default pre-processor (and Swin's fixed input size). Height and width must be
            multiples of 64 × the feature stride (256, 512, 768, ... for the reference layers); any other size raises
            a ``ValueError`` here, at construction. A given ``pre_processor`` with a Resize sets the size instead.
        include_image_in_features: Prepend the resized image (3 channels) to the features, as the reference does.
        normalize_input: ``False`` (reference): the pre-processor only resizes, images stay in [0, 1]. ``True``:
            ImageNet normalisation in the pre-processor.
        channel_order: ``"bgr"`` (reference, images read with cv2) or ``"rgb"``. The flip happens inside the torch
            model, so exported models keep it.
        use_neighborhood_attention: ``False`` = the paper's "w/o NA" ablation (every RNA block removed).
        relative_position_bias: Learnable NA relative-position bias (True, as NATTEN's default).
        kernel_size: NA kernel of the ``g_*`` stages (7).
        hyper_kernel_size: NA kernel of the ``h_*`` stages (3).
        base_channels: Autoencoder width ``N`` (128).
        latent_channels: Autoencoder width ``M`` (320).
        drop_path_rate: Maximum stochastic depth of the autoencoder (0.1).
        seg_base_width: Base width of the DRAEM discriminative U-Net (64).
        na_backend: Neighborhood-attention backend: ``"auto"``, ``"natten"``, ``"flex"`` or ``"pure"``.
        standardize_features: Standardise each channel of the aggregated features ``F`` (input of ``R``, its target
            and the input of ``S``) with a mean/std measured once on the training images when fitting starts, stored
            in the checkpoint and the exported graph. **INFERRED** (not in the reference); see the README for the
            measured effect.
        stats_max_images: At most this many training images (the first ones, in dataset order) are used for those
            statistics.
        anomaly_source_path: Folder of texture images (e.g. DTD) for the synthetic anomalies; ``"skimage"`` = the
            brick, grass and gravel photographs shipped in scikit-image's wheel (offline, needs ``scikit-image``);
            ``None`` = Perlin-noise textures (nothing is downloaded).
        anomaly_probability: Probability that a training image gets a synthetic anomaly (0.5).
        rotation_probability: Probability of rotating a normal training image before the synthesis (0.3).
        rotation_degrees: Rotation range ``(min, max)`` or ``±value``; ``None`` = the reference's table for
            ``category`` (no rotation for unknown categories).
        focal_gamma: γ of the focal loss (4).
        score_kernel_size: Average-pool kernel of the image score ``max(avg_pool2d(map, k, 1, k // 2))`` (32).
        lr: Adam learning rate of ``R`` and ``S`` (1e-4).
        weight_decay: Adam weight decay (1e-8).
        lr_milestones: Epochs (or fractions of training, :mod:`~anomalib_recon.components.schedules`) at which the
            learning rate is multiplied by ``lr_gamma``: (400, 600) of 700 epochs.
        lr_gamma: MultiStepLR factor (0.1).
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) (+ Normalize if ``normalize_input``).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = NAFRAD(backbone="tf_efficientnet_lite0")
        >>> Engine(max_epochs=700).fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "auto",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        category: str | None = None,
        image_size: int | tuple[int, int] = 256,
        include_image_in_features: bool = True,
        normalize_input: bool = False,
        channel_order: str = "bgr",
        use_neighborhood_attention: bool = True,
        relative_position_bias: bool = True,
        kernel_size: int = 7,
        hyper_kernel_size: int = 3,
        base_channels: int = 128,
        latent_channels: int = 320,
        drop_path_rate: float = 0.1,
        seg_base_width: int = 64,
        na_backend: str = "auto",
        standardize_features: bool = False,
        stats_max_images: int = 256,
        anomaly_source_path: str | None = None,
        anomaly_probability: float = 0.5,
        rotation_probability: float = 0.3,
        rotation_degrees: float | tuple[float, float] | None = None,
        focal_gamma: float = 4.0,
        score_kernel_size: int = 32,
        lr: float = 1e-4,
        weight_decay: float = 1e-8,
        lr_milestones: Sequence[float] = (400, 600),
        lr_gamma: float = 0.1,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_training_settings(lr, weight_decay, focal_gamma, drop_path_rate)
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor, normalize_input=normalize_input),
            post_processor,
            evaluator,
            visualizer,
        )
        for name, value in (
            ("anomaly_probability", anomaly_probability),
            ("rotation_probability", rotation_probability),
        ):
            if not 0.0 <= value <= 1.0:
                msg = f"{name} must be in [0, 1], got {value}."
                raise ValueError(msg)
        texture_paths = skimage_texture_paths() if anomaly_source_path == "skimage" else None
        if anomaly_source_path is not None and texture_paths is None and not Path(anomaly_source_path).is_dir():
            msg = (
                f"anomaly_source_path {anomaly_source_path!r} is not a folder; pass a folder of texture images "
                "(e.g. DTD's images/), 'skimage' for scikit-image's brick/grass/gravel, or None for Perlin noise."
            )
            raise ValueError(msg)
        if rotation_degrees is None:
            degrees = rotation_range(category)
        elif isinstance(rotation_degrees, int | float):
            degrees = (-abs(float(rotation_degrees)), abs(float(rotation_degrees)))
        else:
            degrees = tuple(float(d) for d in rotation_degrees)
            if len(degrees) != 2 or degrees[0] > degrees[1]:
                msg = f"rotation_degrees must be a number or (min, max) with min <= max, got {rotation_degrees!r}."
                raise ValueError(msg)
        if stats_max_images < 1:
            msg = f"stats_max_images must be >= 1, got {stats_max_images}."
            raise ValueError(msg)

        self.normalize_input = normalize_input
        self.rotation_probability = float(rotation_probability)
        self.rotation_degrees: tuple[float, float] = degrees  # type: ignore[assignment]
        self.category = category
        self._rotation_from_table = rotation_degrees is None
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.lr_milestones = check_lr_schedule(lr_milestones, lr_gamma)
        self.lr_gamma = float(lr_gamma)
        self.stats_max_images = int(stats_max_images)

        # The input size comes from the pre-processor (its Resize); image_size only builds the default one. Without
        # a Resize (pre_processor=False or a custom one) the model is built for image_size.
        input_size = self.model_input_size(image_size)
        self.model = NAFRADModel(
            backbone=resolve_backbone(backbone, category),
            layers=layers,
            weights=weights,
            image_size=input_size,  # a ValueError naming image_size and the sizes
            include_image_in_features=include_image_in_features,
            channel_order=channel_order,
            use_neighborhood_attention=use_neighborhood_attention,
            relative_position_bias=relative_position_bias,
            kernel_size=kernel_size,
            hyper_kernel_size=hyper_kernel_size,
            base_channels=base_channels,
            latent_channels=latent_channels,
            drop_path_rate=drop_path_rate,
            seg_base_width=seg_base_width,
            score_kernel_size=score_kernel_size,
            na_backend=na_backend,
            standardize_features=standardize_features,
        )
        self.loss = NAFRADLoss(focal_gamma=focal_gamma)
        self.augmenter = PerlinAnomalyGenerator(
            anomaly_source_path=None if texture_paths else anomaly_source_path,
            probability=anomaly_probability,
            blend_factor=(0.2, 1.0),
        )
        if texture_paths:
            self.augmenter.anomaly_source_paths = texture_paths
        if anomaly_source_path is not None and not self.augmenter.anomaly_source_paths:
            msg = f"anomaly_source_path {anomaly_source_path!r} contains no images."
            raise ValueError(msg)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | None = None, normalize_input: bool = False
    ) -> PreProcessor:
        """Resize only (the reference feeds [0, 1] images to the backbone); ImageNet Normalize if asked."""
        return resize_pre_processor(image_size, normalize=normalize_input)

    @property
    def input_normalization(self) -> str:
        """``"none"``: Resize only, [0, 1] images, as the reference (``normalize_input=True``: ``"imagenet"``); the
        torch model flips RGB to BGR itself (``channel_order``)."""
        return "imagenet" if self.normalize_input else "none"

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam on ``R`` and ``S`` (lr 1e-4, weight decay 1e-8) with a per-epoch MultiStepLR."""
        params = list(self.model.reconstructor.parameters()) + list(self.model.segmentor.parameters())
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return multistep_lr(optimizer, self.lr_milestones, self.lr_gamma, self._trainer)

    # ------------------------------------------------------------------------------------------------ training
    def fit_feature_statistics(self, dataloader: Iterable[Batch] | None = None) -> int:
        """Per-channel feature mean/std of at most ``stats_max_images`` normal images (``standardize_features``):
        :func:`~anomalib_recon.components.standardization.measure_feature_statistics`. Runs once at fit start: a
        model restored from a checkpoint keeps its statistics."""
        return measure_feature_statistics(self, self.stats_max_images, dataloader)

    def rotate(self, images: torch.Tensor) -> torch.Tensor:
        """Rotate each image with probability ``rotation_probability`` by an angle from ``rotation_degrees``.

        Bilinear, zero fill, no translation (the reference's imgaug ``Affine(rotate=...)``).
        """
        low, high = self.rotation_degrees
        if self.rotation_probability <= 0 or (low == 0 and high == 0):
            return images
        out = images.clone()
        for i in range(images.shape[0]):
            if torch.rand(1).item() < self.rotation_probability:
                angle = float(torch.empty(1).uniform_(low, high).item())
                out[i] = TF.rotate(images[i], angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        return out

    def synthesize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated normal images, their pseudo-anomalous versions and the masks ``(B, 1, H, W)``.

        Augmentation works on [0, 1] images; with ``normalize_input`` the batch is de-normalised first and both
        outputs are normalised again.
        """
        with torch.no_grad():
            if self.normalize_input:
                images = images * self._std + self._mean
            normal = self.rotate(images)
            augmented, mask = self.augmenter(normal)
            if self.normalize_input:
                normal = (normal - self._mean) / self._std
                augmented = (augmented - self._mean) / self._std
        return normal, augmented.to(normal.dtype), mask.to(normal.dtype)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Synthesize anomalies on the normal batch, reconstruct and segment, return the loss."""
        del args, kwargs
        normal, augmented, mask = self.synthesize(batch.image)
        output = self.model(normal, augmented)
        losses = self.loss(output.reconstruction, output.normal_features, output.prediction, mask)
        size = normal.shape[0]
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name in ("reconstruction", "focal", "l1"):
            self.log(f"train_{name}_loss", losses[name], on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}

    def follow_datamodule_category(self, category: str | None) -> None:
        """Take the rotation range of the datamodule's category when the model was given no ``category``.

        The reference rotates per category: none for capsule, metal_nut, pill, toothbrush,
        transistor; ±5° for cable, zipper; ±90° for the textures, bottle, hazelnut, screw; unknown categories get
        no rotation. An explicit ``rotation_degrees`` always wins; a ``category`` that differs from the datamodule's
        is kept with a warning.
        """
        if not isinstance(category, str) or not category or not self._rotation_from_table:
            return
        if self.category is None:
            self.rotation_degrees = rotation_range(category)
            logger.info("NAFRAD: rotation range %s for the datamodule's category %r.", self.rotation_degrees, category)
        elif self.category.lower() != category.lower():
            logger.warning(
                "NAFRAD: category=%r but the datamodule's category is %r; rotation %s and backbone follow %r.",
                self.category,
                category,
                self.rotation_degrees,
                self.category,
            )

    def on_train_start(self) -> None:
        """Measure the feature statistics (once) and warn when the pre-processor disagrees with ``normalize_input``."""
        self.follow_datamodule_category(getattr(getattr(self.trainer, "datamodule", None), "category", None))
        if not self.model.feature_statistics_fitted:
            self.fit_feature_statistics()
        transform = getattr(self.pre_processor, "transform", None)
        has_norm = transform is not None and any(isinstance(t, Normalize) for t in getattr(transform, "transforms", []))
        if has_norm != self.normalize_input:
            logger.warning(
                "NAFRAD: normalize_input=%s but the pre-processor %s Normalize; synthetic anomalies assume %s images.",
                self.normalize_input,
                "contains" if has_norm else "has no",
                "ImageNet-normalised" if self.normalize_input else "[0, 1]",
            )
