"""PyTorch model of NAFRAD (Neighborhood Attention-based Feature Reconstruction).

The pipeline, as in the authors' code (GitHub Math-Computer/NAFRAD, commit 7cbcfe1):

1. ``F = agg([image, E(image)_0, E(image)_1])``: frozen backbone features and the raw image, bilinearly resized to
   the grid of the shallowest feature map (``input / 4``, i.e. 64×64 at 256 px) and concatenated on channels.
2. ``F̂ = R(F)``: a learned-image-compression style autoencoder whose stages are strided convolutions and residual
   neighborhood-attention (RNA) blocks, squeezing the grid to a 1×1 bottleneck (:class:`NAAutoencoder`).
3. ``P = sigmoid(S(cat[(F̂ − F)², F]))``: DRAEM's discriminative U-Net turns the squared residual into a defect
   probability on the feature grid.
4. The map is ``P`` upsampled to the input size; the image score is ``max(avg_pool2d(map, 32, 1, 16))``, computed
   as two 1-D box filters (:func:`~anomalib_recon.components.reduce_max_avgpool`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.aggregation import FeatureAggregator
from anomalib_recon.components.anomaly_map import reduce_max_avgpool
from anomalib_recon.components.feature_extractor import FeatureExtractor
from anomalib_recon.components.guards import check_features, check_model_input
from anomalib_recon.components.neighborhood_attention import NABlock
from anomalib_recon.components.standardization import FeatureStandardization

RESNET18 = "resnet18.tv_in1k"
SWIN_L = "swin_large_patch4_window7_224.ms_in22k_ft_in1k"

BACKBONE_ALIASES: dict[str, str] = {
    "resnet18": RESNET18,
    "swin_l": SWIN_L,
    "swin_large": SWIN_L,
}
"""Short names accepted for ``backbone`` (the torchvision ResNet18 weights are pinned, as in the reference)."""

RESNET18_CATEGORIES = ("leather", "tile", "bottle", "cable", "metal_nut", "pill", "transistor", "zipper")
SWIN_CATEGORIES = ("carpet", "grid", "wood", "capsule", "hazelnut", "screw", "toothbrush")
"""The reference code's hard-coded per-category backbone choice on MVTec AD (``backbone="auto"``)."""

ROTATION_DEGREES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("capsule", "metal_nut", "pill", "toothbrush", "transistor"), (0.0, 0.0)),
    **dict.fromkeys(("cable", "zipper"), (-5.0, 5.0)),
    **dict.fromkeys(("carpet", "grid", "leather", "tile", "wood", "bottle", "hazelnut", "screw"), (-90.0, 90.0)),
}
"""The reference's rotation range per MVTec AD category for the p=0.3 rotation of normal training images.
Categories not listed get no rotation."""

HEAD_DIM = 16
"""Channels per attention head in every NA block of the reference (heads = dim / 16)."""


def resolve_backbone(backbone: str, category: str | None = None) -> str:
    """Map ``"auto"`` (with the MVTec AD ``category``) and the short aliases to a timm model name."""
    if not isinstance(backbone, str) or not backbone:
        msg = f"backbone must be a timm model name, 'resnet18', 'swin_l' or 'auto', got {backbone!r}."
        raise TypeError(msg)
    if backbone == "auto":
        key = (category or "").lower()
        return SWIN_L if key in SWIN_CATEGORIES else RESNET18
    return BACKBONE_ALIASES.get(backbone, backbone)


def is_swin(backbone: str) -> bool:
    """Whether the timm name is a Swin Transformer (NHWC stages, per-token LayerNorm needed)."""
    return backbone.split(".")[0].startswith("swin")


def resolve_layers(backbone: str, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given (``None`` or empty: the reference's stride-4 and stride-8 stages).

    ResNets: ``["layer1", "layer2"]``; Swin: stages ``[0, 1]`` (192@64 and 384@32 for Swin-L at 256 px); any other
    timm CNN: ``features_only`` indices ``[1, 2]`` (strides 4 and 8 for most timm CNNs).
    """
    if layers:
        return list(layers)
    name = backbone.split(".")[0]
    if name.startswith(("resnet", "wide_resnet", "resnext")):
        return ["layer1", "layer2"]
    if is_swin(backbone):
        return [0, 1]
    return [1, 2]


def rotation_range(category: str | None) -> tuple[float, float]:
    """Rotation range of the reference for a category; ``(0, 0)`` (no rotation) when unknown."""
    return ROTATION_DEGREES.get((category or "").lower(), (0.0, 0.0))


# ---------------------------------------------------------------------------------------------------------- autoencoder
def conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2) -> nn.Conv2d:
    """``Conv2d`` with ``padding = k // 2``: stride 2 halves the map (rounding up)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2) -> nn.ConvTranspose2d:
    """``ConvTranspose2d`` with ``padding = k // 2`` and ``output_padding = stride − 1``: exactly doubles the map."""
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, output_padding=stride - 1
    )


class ResidualNABlock(nn.Module):
    """RNA block: ``depth`` NSA blocks (:class:`~anomalib_recon.components.neighborhood_attention.NABlock`) on the
    NHWC view of an NCHW map, plus a long residual from the block input."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        drop_path: Sequence[float],
        mlp_ratio: float = 2.0,
        relative_position_bias: bool = True,
        na_backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(drop_path) != depth:
            msg = f"ResidualNABlock: {len(drop_path)} drop-path rates given for depth {depth}."
            raise ValueError(msg)
        self.blocks = nn.ModuleList(
            NABlock(dim, num_heads, kernel_size, mlp_ratio, rate, relative_position_bias, na_backend)
            for rate in drop_path
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        y = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            y = block(y)
        return y.permute(0, 3, 1, 2) + x


class NAAutoencoder(nn.Module):
    """NAFRAD's reconstruction network ``R`` (``g_a → h_a → h_s → g_s``, no skip connections).

    Six stride-2 convolutions squeeze the feature grid to ``grid / 64`` (1×1 for a 64×64 grid) and six transposed
    convolutions restore it; an RNA block follows every convolution except the last encoder one (``h_a2``, whose RNA
    is ``h_a3``) and precedes every transposed convolution, as in the authors' code.

    Args:
        in_channels: Channels ``C`` of the aggregated features (195 for ResNet18, 579 for Swin-L).
        base_channels: ``N`` (128); stage widths are ``N, 3N/2, 2N, M, 3N/2, 3N/2``.
        latent_channels: ``M`` (320).
        depths: RNA depths of the encoder stages ``g_a1, g_a3, g_a5, g_a7, h_a1, h_a3``; the decoder uses them reversed.
        kernel_size: NA kernel of the ``g_*`` stages (7).
        hyper_kernel_size: NA kernel of the ``h_*`` stages (3 = ``7 // 2``).
        mlp_ratio: MLP expansion of every NSA block (2).
        drop_path_rate: Stochastic depth grows linearly from 0 to this over the 16 encoder blocks; the decoder reuses
            the same schedule sliced by its reversed depths.
        use_neighborhood_attention: ``False`` removes every RNA block (the paper's "w/o NA" ablation): only the
            convolutions and transposed convolutions remain.
        relative_position_bias: Learnable NA relative-position bias (NATTEN default, True).
        na_backend: Backend of :class:`NeighborhoodAttention2D` (``"auto"``, ``"natten"``, ``"flex"``, ``"pure"``).

    Heads are ``dim / 16`` everywhere, so ``N`` must be a multiple of 32 and ``M`` a multiple of 16.
    """

    num_downsamplings = 6
    size_divisor = 2**num_downsamplings

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 128,
        latent_channels: int = 320,
        depths: Sequence[int] = (2, 2, 6, 2, 2, 2),
        kernel_size: int = 7,
        hyper_kernel_size: int = 3,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.1,
        use_neighborhood_attention: bool = True,
        relative_position_bias: bool = True,
        na_backend: str = "auto",
    ) -> None:
        super().__init__()
        n, m = int(base_channels), int(latent_channels)
        if n <= 0 or n % (2 * HEAD_DIM) or m <= 0 or m % HEAD_DIM:
            msg = (
                f"base_channels must be a positive multiple of {2 * HEAD_DIM} and latent_channels of {HEAD_DIM} "
                f"(head dim {HEAD_DIM}), got {base_channels} and {latent_channels}."
            )
            raise ValueError(msg)
        depths = [int(d) for d in depths]
        if len(depths) != 6 or min(depths) < 1:
            msg = f"depths must list 6 positive RNA depths, got {depths}."
            raise ValueError(msg)
        self.use_neighborhood_attention = use_neighborhood_attention
        dims = [n, n * 3 // 2, n * 2, m, n * 3 // 2, n * 3 // 2]
        kernels = [kernel_size] * 4 + [hyper_kernel_size] * 2
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        def rna(stage: int, decoder: bool) -> nn.Module:
            """RNA block of width ``dims[stage]``; drop-path rates sliced as in the reference.

            The encoder slices the 16 rates by ``depths``; the decoder (stages in reverse order) by the reversed list,
            so e.g. ``h_s0`` gets rates [0:2] and ``g_s2`` rates [6:12].
            """
            if not use_neighborhood_attention:
                return nn.Identity()
            start = sum(depths[stage + 1 :]) if decoder else sum(depths[:stage])
            return ResidualNABlock(
                dims[stage],
                depths[stage],
                dims[stage] // HEAD_DIM,
                kernels[stage],
                rates[start : start + depths[stage]],
                mlp_ratio,
                relative_position_bias,
                na_backend,
            )

        # Analysis (encoder) transform g_a and hyper-analysis h_a.
        self.g_a0 = conv(in_channels, dims[0], kernel_size=5)
        self.g_a1 = rna(0, False)
        self.g_a2 = conv(dims[0], dims[1])
        self.g_a3 = rna(1, False)
        self.g_a4 = conv(dims[1], dims[2])
        self.g_a5 = rna(2, False)
        self.g_a6 = conv(dims[2], dims[3])
        self.g_a7 = rna(3, False)
        self.h_a0 = conv(dims[3], dims[4])
        self.h_a1 = rna(4, False)
        self.h_a2 = conv(dims[4], dims[5])
        self.h_a3 = rna(5, False)
        # Hyper-synthesis h_s and synthesis (decoder) transform g_s.
        self.h_s0 = rna(5, True)
        self.h_s1 = deconv(dims[5], dims[4])
        self.h_s2 = rna(4, True)
        self.h_s3 = deconv(dims[4], dims[3])
        self.g_s0 = rna(3, True)
        self.g_s1 = deconv(dims[3], dims[2])
        self.g_s2 = rna(2, True)
        self.g_s3 = deconv(dims[2], dims[1])
        self.g_s4 = rna(1, True)
        self.g_s5 = deconv(dims[1], dims[0])
        self.g_s6 = rna(0, True)
        self.g_s7 = deconv(dims[0], in_channels, kernel_size=5)
        self._order = [f"g_a{i}" for i in range(8)] + [f"h_a{i}" for i in range(4)]
        self._order += [f"h_s{i}" for i in range(4)] + [f"g_s{i}" for i in range(8)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(B, C, H, W)`` features; ``H`` and ``W`` must be multiples of 64."""
        h, w = features.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            msg = (
                f"NAAutoencoder halves the feature grid {self.num_downsamplings} times, so it must be a multiple of "
                f"{self.size_divisor}; got {h}x{w}."
            )
            raise ValueError(msg)
        x = features
        for name in self._order:
            x = getattr(self, name)(x)
        return x


# ---------------------------------------------------------------------------------------------------------------- model
class NAFRADTrainOutput(NamedTuple):
    """What the training loss needs.

    Attributes:
        normal_features: ``F_n``, aggregated features of the normal images (the reconstruction target).
        augmented_features: ``F_p``, aggregated features of the pseudo-anomalous images (the input of ``R``).
        reconstruction: ``F̂ = R(F_p)``.
        prediction: ``P``, defect probability ``(B, 1, h, w)`` on the feature grid.
    """

    normal_features: torch.Tensor
    augmented_features: torch.Tensor
    reconstruction: torch.Tensor
    prediction: torch.Tensor


class NAFRADModel(FeatureStandardization, nn.Module):
    """NAFRAD: frozen backbone + aggregator, NA autoencoder ``R`` and DRAEM segmentation U-Net ``S``.

    Args:
        backbone: timm model name (``"resnet18.tv_in1k"``, ``"swin_large_patch4_window7_224.ms_in22k_ft_in1k"``,
            ``"tf_efficientnet_lite0"``, ...) or the aliases ``"resnet18"``/``"swin_l"``. Resolve ``"auto"`` with
            :func:`resolve_backbone` first.
        layers: Backbone layers; ``None`` = :func:`resolve_layers`'s default.
        weights: ``"imagenet"``, a local weights file or ``None`` (random init), see
            :class:`~anomalib_recon.components.feature_extractor.FeatureExtractor`.
        image_size: Input size ``(H, W)``; needed by Swin (fixed-size position/window layout).
        include_image_in_features: Prepend the resized input image (3 channels) to the features (reference: True).
        channel_order: ``"bgr"`` flips the RGB input to BGR before the backbone, as the reference (cv2) did;
            ``"rgb"`` keeps it.
        use_neighborhood_attention: ``False`` = the "w/o NA" ablation (see :class:`NAAutoencoder`).
        relative_position_bias: NA relative-position bias.
        kernel_size: NA kernel of the ``g_*`` stages.
        hyper_kernel_size: NA kernel of the ``h_*`` stages.
        base_channels: ``N`` of the autoencoder.
        latent_channels: ``M`` of the autoencoder.
        drop_path_rate: Maximum stochastic-depth rate of the autoencoder.
        seg_base_width: ``base_width`` of the DRAEM discriminative U-Net (64).
        score_kernel_size: Average-pool kernel of the image score (32 at 256 px; padding ``k // 2``, stride 1).
        na_backend: Neighborhood-attention backend.
        standardize_features: Standardise every channel of ``F`` with a mean and standard deviation measured once on
            the training features (:meth:`fit_feature_statistics`, stored as buffers so checkpoints and exports carry
            them). **INFERRED** (not in the reference): Lite0 features have std ≈ 5 and made the loss spike.

    Raises:
        ValueError: when ``image_size`` is not a multiple of :attr:`image_size_divisor` (the feature grid, input /
            feature stride, is halved six times by the autoencoder and doubled six times back).
    """

    model_name = "NAFRAD"

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = RESNET18,
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: tuple[int, int] | None = None,
        include_image_in_features: bool = True,
        channel_order: str = "bgr",
        use_neighborhood_attention: bool = True,
        relative_position_bias: bool = True,
        kernel_size: int = 7,
        hyper_kernel_size: int = 3,
        base_channels: int = 128,
        latent_channels: int = 320,
        drop_path_rate: float = 0.1,
        seg_base_width: int = 64,
        score_kernel_size: int = 32,
        na_backend: str = "auto",
        standardize_features: bool = False,
    ) -> None:
        super().__init__()
        if channel_order not in ("bgr", "rgb"):
            msg = f"channel_order must be 'bgr' (reference) or 'rgb', got {channel_order!r}."
            raise ValueError(msg)
        if score_kernel_size < 1:
            msg = f"score_kernel_size must be >= 1, got {score_kernel_size}."
            raise ValueError(msg)
        backbone = resolve_backbone(backbone)
        swin = is_swin(backbone)
        layers = resolve_layers(backbone, layers)
        img_size = None
        if swin:
            size = tuple(image_size) if image_size is not None else (256, 256)
            if size[0] != size[1]:
                msg = f"Swin backbones need a square input size, got {size}."
                raise ValueError(msg)
            img_size = int(size[0])
        self.backbone = backbone
        self.channel_order = channel_order
        self.score_kernel_size = int(score_kernel_size)
        self.feature_extractor = FeatureExtractor(backbone, layers, weights=weights, img_size=img_size)
        self.feature_aggregator = FeatureAggregator(
            out_size=None,  # the grid of the shallowest (largest) map: input / 4 with the reference layers
            mode="concat",
            align_corners=True,
            layer_norm=swin,  # mmpretrain's affine-free stage norms (the authors' Swin-L backbone)
            include_image=include_image_in_features,
        )
        self.in_channels = self.feature_aggregator.output_channels(self.feature_extractor.out_dims)
        reductions = list(getattr(self.feature_extractor, "reductions", []) or [])
        self.feature_stride = int(min(reductions)) if reductions else 4
        if image_size is not None:
            self.check_image_size(tuple(image_size))
        self.reconstructor = NAAutoencoder(
            self.in_channels,
            base_channels=base_channels,
            latent_channels=latent_channels,
            kernel_size=kernel_size,
            hyper_kernel_size=hyper_kernel_size,
            drop_path_rate=drop_path_rate,
            use_neighborhood_attention=use_neighborhood_attention,
            relative_position_bias=relative_position_bias,
            na_backend=na_backend,
        )
        self.segmentor = DiscriminativeSubNetwork(
            in_channels=2 * self.in_channels, out_channels=1, base_width=seg_base_width
        )
        self.standardize_features = bool(standardize_features)
        self.register_feature_statistics()

    @property
    def image_size_divisor(self) -> int:
        """Input height and width must be multiples of this (feature stride × 64)."""
        return self.feature_stride * NAAutoencoder.size_divisor

    def accepted_sizes(self, count: int = 3) -> str:
        """The first ``count`` accepted side lengths, e.g. ``"256, 512, 768, ..."``."""
        div = self.image_size_divisor
        return ", ".join(str(div * i) for i in range(1, count + 1)) + ", ..."

    def check_image_size(self, image_size: tuple[int, int]) -> None:
        """Raise one ``ValueError`` naming ``image_size`` and the accepted sizes when the input size cannot be taken.

        The feature grid is ``input / feature_stride``; the autoencoder halves it six times (stride-2 convolutions,
        rounding up) and its transposed convolutions double it exactly, so only grids that are multiples of 64 come
        back at their own size: inputs must be multiples of ``feature_stride × 64`` (256 for stride-4 layers).
        """
        h, w = (int(image_size[0]), int(image_size[1]))
        div = self.image_size_divisor
        if h % div or w % div:
            msg = (
                f"NAFRAD cannot take image_size={h}x{w} (the input size after the pre-processor's Resize): with "
                f"backbone {self.backbone!r} the feature grid is input / "
                f"{self.feature_stride} and the NA autoencoder halves it {NAAutoencoder.num_downsamplings} times, so "
                f"height and width must be multiples of {div} ({self.accepted_sizes()}). "
                f"Use e.g. image_size={max(div, round(h / div) * div)}x{max(div, round(w / div) * div)}."
            )
            raise ValueError(msg)

    def _check_images(self, images: torch.Tensor, name: str = "images") -> None:
        check_model_input("NAFRAD", images, what=name)
        h, w = images.shape[-2:]
        div = self.image_size_divisor
        if h % div or w % div:
            msg = (
                f"NAFRAD needs an input size that is a multiple of {div} (feature grid = input / "
                f"{self.feature_stride}, halved 6 times by the NA autoencoder), got {h}x{w}. "
                f"Resize to e.g. {max(div, h // div * div)}x{max(div, w // div * div)} in the pre-processor."
            )
            raise ValueError(msg)

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated backbone features of an RGB batch ``(B, 3, H, W)`` -> ``(B, C, H/4, W/4)``, unstandardised."""
        if self.channel_order == "bgr":
            images = images.flip(1)
        features = self.feature_aggregator(self.feature_extractor(images), image=images)
        check_features("NAFRAD", features)
        return features

    def get_features(self, images: torch.Tensor, standardize: bool = True) -> torch.Tensor:
        """Target features ``F``: :meth:`raw_features`, standardised per channel with the stored training statistics
        (``standardize_features`` and ``standardize=True``)."""
        features = self.raw_features(images)
        return self.standardize(features) if standardize else features

    def segment(self, reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``P = sigmoid(S(cat[(F̂ − F)², F]))`` of shape ``(B, 1, h, w)``."""
        return torch.sigmoid(self.segmentor(torch.cat([(reconstruction - features) ** 2, features], dim=1)))

    def forward(
        self, images: torch.Tensor, augmented_images: torch.Tensor | None = None
    ) -> NAFRADTrainOutput | InferenceBatch:
        """Train mode: :class:`NAFRADTrainOutput` for (normal, pseudo-anomalous) pairs; eval: ``InferenceBatch``.

        Args:
            images: RGB batch ``(B, 3, H, W)`` in [0, 1] (or ImageNet-normalised, see ``normalize_input``).
            augmented_images: Train mode only: the same images with synthetic anomalies; ``None`` = ``images``.
        """
        self._check_images(images)
        if self.training:
            if augmented_images is None:
                augmented_images = images
            elif augmented_images.shape != images.shape:
                msg = f"augmented_images {tuple(augmented_images.shape)} must match images {tuple(images.shape)}."
                raise ValueError(msg)
            both = self.get_features(torch.cat([images, augmented_images], dim=0))
            normal_features, augmented_features = both.chunk(2, dim=0)
            reconstruction = self.reconstructor(augmented_features)
            prediction = self.segment(reconstruction, augmented_features)
            return NAFRADTrainOutput(normal_features, augmented_features, reconstruction, prediction)

        features = self.get_features(images)
        reconstruction = self.reconstructor(features)
        prediction = self.segment(reconstruction, features)
        anomaly_map = F.interpolate(prediction, size=images.shape[-2:], mode="bilinear", align_corners=False)
        pred_score = reduce_max_avgpool(anomaly_map, self.score_kernel_size, padding=self.score_kernel_size // 2)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
