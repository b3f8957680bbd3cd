"""PyTorch model of LGFDR (Local and Global Feature Denoising Reconstruction).

Paper: Chen Yichi, Chen Bin, Xian Weizhi, Wang Junjie, Huang Yao, Chen Min, *LGFDR: local and global feature
denoising reconstruction for unsupervised anomaly detection*, The Visual Computer 40(12), 2024, DOI
10.1007/s00371-024-03281-x. The authors announced their code (GitHub Karma1628/work-1) but have not released it; only
the abstract is public. What the abstract states: a dual-tower network reconstructs the local and the global features
of normal images, noise is added to the features during training (denoising reconstruction), and a selective
reconstruction head (SRH) adaptively fuses the two reconstructions. Everything below that is more specific than that is
**INFERRED** (see the model README), in the conventions of the same group's NAFRAD:

1. ``F = standardise(agg(E(image)))``: frozen backbone stages (Swin-L stages 0-2 by default, per-token LayerNorm
   without affine) bilinearly resized to the stride-4 grid and concatenated (1344 channels for Swin-L), then each
   channel standardised with a mean/std measured once on the normal training images.
2. Training only: ``F̃ = F + σ·ε``, ``ε ~ N(0, I)``; inference uses ``F̃ = F``.
3. Shared stem ``S = LN(W_s F̃)`` (a 1×1 projection to ``local_embed_dim``).
4. Local tower: neighbourhood-attention blocks on the full grid (each position attends to its ``k × k``
   neighbourhood), ``LN``, ``Linear`` back to ``C`` → ``R_l``.
5. Global tower: ``p × p`` patch embedding of ``S``, fixed 2-D sin-cos positions, ViT blocks (global attention over
   all patch tokens), ``LN``, ``Linear(D, p²·C)`` + unpatchify → ``R_g``.
6. SRH: a per-position gate ``[w_l, w_g] = softmax(conv3×3(cat[R_l, R_g]))`` over the two towers,
   ``R = w_l ⊙ R_l + w_g ⊙ R_g`` (``srh_mode``: ``"spatial"``; ``"channel"`` = SKNet-style per-channel weights;
   ``"average"`` = fixed ½/½).
7. Map ``M = mean_c (R − F)²`` upsampled to the input, Gaussian σ = 4; score ``max(avg_pool2d(M, k, 1, k // 2))``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.models.vision_transformer import Block
from torch import nn

from anomalib_recon.components.aggregation import FeatureAggregator
from anomalib_recon.components.anomaly_map import AnomalyMapGenerator, check_blur_fits, reduce_max_avgpool
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.guards import check_features, check_model_input
from anomalib_recon.components.initialization import init_mae_weights
from anomalib_recon.components.neighborhood_attention import NABlock
from anomalib_recon.components.patch_embed import PatchEmbed, TokenToFeatureHead
from anomalib_recon.components.position import SinCosPositionEmbedding2D, get_2d_sincos_pos_embed
from anomalib_recon.components.standardization import FeatureStandardization
from anomalib_recon.components.tracing import is_tracing

__all__ = [
    "SRH_MODES",
    "SWIN_L",
    "TOWERS",
    "GlobalTower",
    "LGFDRDetails",
    "LGFDRModel",
    "LGFDRTrainOutput",
    "LocalTower",
    "SelectiveReconstructionHead",
    "resolve_backbone",
    "resolve_layers",
]

SWIN_L = "swin_large_patch4_window7_224.ms_in22k_ft_in1k"
BACKBONE_ALIASES: dict[str, str] = {"swin_l": SWIN_L, "swin_large": SWIN_L, "wide_resnet50": "wide_resnet50_2.tv_in1k"}
"""Short names accepted for ``backbone``."""

TOWERS = ("both", "local", "global")
SRH_MODES = ("spatial", "channel", "average")
FEATURE_STRIDES = (4, 8, 16)
"""Strides of the default feature layers (Swin-L stages 0-2; WRN50 layer1-3; Lite0 blocks.1, 2, 4)."""


def resolve_backbone(backbone: str) -> str:
    """Map the short aliases (``"swin_l"``, ``"wide_resnet50"``) to timm names; other names pass through."""
    if not isinstance(backbone, str) or not backbone:
        msg = f"backbone must be a timm model name or 'swin_l', got {backbone!r}."
        raise TypeError(msg)
    return BACKBONE_ALIASES.get(backbone, backbone)


def is_swin(backbone: str) -> bool:
    """Whether the timm name is a Swin Transformer (NHWC stages that get an affine-free LayerNorm)."""
    return backbone.split(".")[0].startswith("swin")


def resolve_layers(backbone: str, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given, else the stages at strides 4, 8 and 16.

    Swin: stages ``[0, 1, 2]`` (192@64, 384@32, 768@16 for Swin-L at 256 px); CNNs: the last feature layer at each of
    those strides (``layer1``-``layer3`` for ResNets, ``blocks.1, blocks.2, blocks.4`` for EfficientNet-Lite).
    """
    if layers is not None and not list(layers):
        msg = "layers must name at least one backbone layer, e.g. [0, 1, 2] or ['layer1', 'layer2', 'layer3']."
        raise ValueError(msg)
    if layers is None and is_swin(backbone):
        return [0, 1, 2]
    return layers_at_strides(backbone, layers, FEATURE_STRIDES)


# ---------------------------------------------------------------------------------------------------------- towers
class LocalTower(nn.Module):
    """Local tower: ``depth`` :class:`NABlock` s on the full feature grid, LayerNorm, ``Linear(D, C)`` → ``R_l``.

    Every output position sees at most ``depth · (k − 1) + 1`` grid cells per axis (25 for 4 blocks of 7×7), so
    ``R_l`` is reconstructed from the local context only.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        mlp_ratio: float,
        na_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            NABlock(dim, num_heads, kernel_size, mlp_ratio, na_backend=na_backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_channels)

    def forward(self, stem: torch.Tensor) -> torch.Tensor:
        """Channels-last stem ``(B, H, W, D)`` → ``R_l`` ``(B, C, H, W)``."""
        x = stem
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).permute(0, 3, 1, 2)


class GlobalTower(nn.Module):
    """Global tower: ``p × p`` patch embedding, fixed sin-cos positions, ViT blocks, LN, token head → ``R_g``.

    Every token attends to every other token, so ``R_g`` is reconstructed from the whole image's context.
    ``grid_size`` caches the position table for the model's input size; other grids compute it on the fly.
    """

    def __init__(
        self,
        in_dim: int,
        out_channels: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_size: int,
        grid_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.patch_embed = PatchEmbed(in_dim, embed_dim, patch_size)
        self.pos_embed = SinCosPositionEmbedding2D(embed_dim, grid_size)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = TokenToFeatureHead(embed_dim, out_channels, patch_size)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Re-target the cached position table to another token grid."""
        if tuple(grid_size) != self.pos_embed.grid_size:
            device = self.pos_embed.pos_embed.device
            self.pos_embed = SinCosPositionEmbedding2D(self.embed_dim, tuple(grid_size)).to(device)

    def forward(self, stem: torch.Tensor) -> torch.Tensor:
        """Channels-first stem ``(B, D, H, W)`` → ``R_g`` ``(B, C, H, W)``."""
        grid = self.patch_embed.grid_size(int(stem.shape[-2]), int(stem.shape[-1]))
        x = self.patch_embed(stem)
        if tuple(grid) == self.pos_embed.grid_size:
            x = self.pos_embed(x)
        else:
            x = x + get_2d_sincos_pos_embed(self.embed_dim, grid).to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x), grid)


class SelectiveReconstructionHead(nn.Module):
    """SRH: fuse the two towers' reconstructions with weights that sum to one per position (or per channel).

    ``mode="spatial"`` (default): ``[a_l, a_g] = conv3×3(cat[R_l, R_g])`` (2 output maps), ``[w_l, w_g] =
    softmax([a_l, a_g])`` over the two towers at every position, ``R = w_l ⊙ R_l + w_g ⊙ R_g``; the gate map is
    ``w_l`` ``(B, 1, H, W)``. The conv starts at zero, so training starts from the average of the towers.

    ``mode="channel"`` (SKNet's selective kernel): ``s = GAP(R_l + R_g)``, ``z = GELU(LN(Linear(C, r)(s)))`` with
    ``r = max(C / 16, 32)``, ``[a_l, a_g] = [Linear(r, C)(z), Linear(r, C)(z)]``, softmax over the towers per channel;
    the gate ``w_l`` is ``(B, C, 1, 1)``. ``mode="average"``: ``w_l = w_g = ½``, nothing learned (a control).
    """

    def __init__(self, channels: int, mode: str = "spatial", reduction: int = 16, min_hidden: int = 32) -> None:
        super().__init__()
        if mode not in SRH_MODES:
            msg = f"srh_mode must be one of {SRH_MODES}, got {mode!r}."
            raise ValueError(msg)
        self.mode = mode
        if mode == "spatial":
            self.gate = nn.Conv2d(2 * channels, 2, kernel_size=3, padding=1)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        elif mode == "channel":
            hidden = max(channels // reduction, min_hidden)
            self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.LayerNorm(hidden), nn.GELU())
            self.local_logits = nn.Linear(hidden, channels)
            self.global_logits = nn.Linear(hidden, channels)

    def weights(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """``w_l`` (the local tower's weight): ``(B, 1, H, W)`` spatial, ``(B, C, 1, 1)`` channel, ``(1, 1, 1, 1)``."""
        if self.mode == "spatial":
            logits = self.gate(torch.cat([local, global_], dim=1))
            return torch.softmax(logits, dim=1)[:, :1]
        if self.mode == "channel":
            z = self.squeeze((local + global_).mean(dim=(2, 3)))
            logits = torch.stack([self.local_logits(z), self.global_logits(z)], dim=1)  # (B, 2, C)
            return torch.softmax(logits, dim=1)[:, 0, :, None, None]
        return local.new_full((1, 1, 1, 1), 0.5)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, w_l)`` with ``R = w_l ⊙ R_l + (1 − w_l) ⊙ R_g``."""
        w = self.weights(local, global_)
        return w * local + (1 - w) * global_, w


# ---------------------------------------------------------------------------------------------------------------- model
class LGFDRTrainOutput(NamedTuple):
    """What the training loss needs (``local``/``global_``/``gate`` are ``None`` for a tower left out)."""

    features: torch.Tensor
    """Clean standardised features ``F`` ``(B, C, h, w)``: the reconstruction target."""
    noisy_features: torch.Tensor
    """``F̃ = F + σ·ε``: the towers' input."""
    reconstruction: torch.Tensor
    """The fused reconstruction ``R`` (a single tower's output when only one is built)."""
    local: torch.Tensor | None
    """``R_l``."""
    global_: torch.Tensor | None
    """``R_g``."""
    gate: torch.Tensor | None
    """``w_l`` of the SRH."""


class LGFDRDetails(NamedTuple):
    """Intermediate results of one inference pass (analysis and the SRH gate figures)."""

    features: torch.Tensor
    reconstruction: torch.Tensor
    local: torch.Tensor | None
    global_: torch.Tensor | None
    gate: torch.Tensor | None
    anomaly_map: torch.Tensor
    pred_score: torch.Tensor


def _positive_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        msg = f"LGFDR: {name} must be an int >= {low}, got {value!r}."
        raise ValueError(msg)
    return value


class LGFDRModel(FeatureStandardization, nn.Module):
    """LGFDR: frozen backbone → standardised features → noisy stem → local (NA) and global (ViT) towers → SRH.

    Args:
        backbone: timm name or alias; ``"swin_l"`` = ``swin_large_patch4_window7_224.ms_in22k_ft_in1k`` (default).
        layers: Backbone layers; ``None`` = :func:`resolve_layers` (strides 4, 8, 16).
        weights: ``"imagenet"``, a local weights file, or ``None`` (random init).
        image_size: Input ``(H, W)`` after pre-processing: checked here (multiples of feature stride × ``patch_size``),
            Swin's fixed input size, the global tower's position cache and the default score kernel.
        local_embed_dim: Width ``D_l`` of the shared stem and the local tower (256).
        local_depth: NA blocks of the local tower (4).
        local_num_heads: Heads of those blocks (8).
        kernel_size: NA kernel ``k`` (7).
        embed_dim: Width ``D`` of the global tower's tokens (512).
        depth: ViT blocks of the global tower (4).
        num_heads: Heads of those blocks (8).
        mlp_ratio: MLP ratio of every block (4).
        patch_size: Patch size ``p`` of the global tower's tokens on the feature grid (4: 16×16 tokens at 256 px).
        towers: ``"both"`` (the paper), ``"local"`` or ``"global"`` (ablations: only that tower is built, no SRH).
        srh_mode: ``"spatial"`` (per-position gate, default), ``"channel"`` (SKNet-style) or ``"average"``.
        feature_noise_std: σ of the Gaussian feature noise in training, in units of each standardised channel's
            std (0.1); 0 = no noise (the "w/o denoising" ablation).
        standardize_features: Standardise each channel of ``F`` with training statistics (True).
        blur_sigma: Gaussian σ of the map (4); ``None`` = no blur.
        score_kernel_size: Average-pool kernel of the image score; ``None`` = input side / 8 (32 at 256 px).
        na_backend: Neighbourhood-attention backend (``"auto"``, ``"natten"``, ``"flex"``, ``"pure"``).
    """

    model_name = "LGFDR"

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = SWIN_L,
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: tuple[int, int] = (256, 256),
        local_embed_dim: int = 256,
        local_depth: int = 4,
        local_num_heads: int = 8,
        kernel_size: int = 7,
        embed_dim: int = 512,
        depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        towers: str = "both",
        srh_mode: str = "spatial",
        feature_noise_std: float = 0.1,
        standardize_features: bool = True,
        blur_sigma: float | None = 4.0,
        score_kernel_size: int | None = None,
        na_backend: str = "auto",
    ) -> None:
        super().__init__()
        self._check_settings(
            local_embed_dim, local_depth, local_num_heads, kernel_size, embed_dim, depth, num_heads, mlp_ratio
        )
        if towers not in TOWERS:
            msg = f"LGFDR: towers must be one of {TOWERS}, got {towers!r}."
            raise ValueError(msg)
        if srh_mode not in SRH_MODES:
            msg = f"LGFDR: srh_mode must be one of {SRH_MODES}, got {srh_mode!r}."
            raise ValueError(msg)
        if isinstance(feature_noise_std, bool) or not isinstance(feature_noise_std, int | float):
            feature_noise_std = float("nan")
        if not math.isfinite(feature_noise_std) or feature_noise_std < 0:
            msg = f"LGFDR: feature_noise_std must be a finite number >= 0 (0 = no noise), got {feature_noise_std!r}."
            raise ValueError(msg)
        patch_size = _positive_int("patch_size", patch_size)
        backbone = resolve_backbone(backbone)
        size = (int(image_size[0]), int(image_size[1]))
        swin = is_swin(backbone)
        if swin and size[0] != size[1]:
            msg = f"LGFDR: Swin backbones need a square image_size, got {size[0]}x{size[1]}."
            raise ValueError(msg)
        self.backbone = backbone
        self.towers = towers
        self.srh_mode = srh_mode
        self.feature_noise_std = float(feature_noise_std)
        self.patch_size = patch_size
        self.standardize_features = bool(standardize_features)

        self.feature_extractor = FeatureExtractor(
            backbone, resolve_layers(backbone, layers), weights=weights, img_size=size[0] if swin else None
        )
        self.feature_aggregator = FeatureAggregator(out_size=None, mode="concat", align_corners=True, layer_norm=swin)
        self.in_channels = self.feature_aggregator.output_channels(self.feature_extractor.out_dims)
        reductions = list(getattr(self.feature_extractor, "reductions", []) or [])
        self.feature_stride = int(min(reductions)) if reductions else 4
        self.image_size = size
        self.check_image_size(size)
        grid = (size[0] // self.feature_stride, size[1] // self.feature_stride)

        c, d_l = self.in_channels, int(local_embed_dim)
        self.stem = nn.Sequential(nn.Linear(c, d_l), nn.LayerNorm(d_l))
        self.local_tower = (
            LocalTower(d_l, c, local_depth, local_num_heads, kernel_size, mlp_ratio, na_backend)
            if towers in ("both", "local")
            else None
        )
        self.global_tower = (
            GlobalTower(
                d_l,
                c,
                embed_dim,
                depth,
                num_heads,
                mlp_ratio,
                patch_size,
                (grid[0] // patch_size, grid[1] // patch_size),
            )
            if towers in ("both", "global")
            else None
        )
        self.srh = SelectiveReconstructionHead(c, srh_mode) if towers == "both" else None
        self._init_weights()

        check_blur_fits(blur_sigma, None, size, "LGFDR")
        self.anomaly_map_generator = AnomalyMapGenerator(
            distance="l2sq_mean", align_corners=False, blur_sigma=blur_sigma
        )
        if score_kernel_size is None:
            score_kernel_size = max(1, min(size) // 8)
        self.score_kernel_size = _positive_int("score_kernel_size", score_kernel_size)
        if self.score_kernel_size > min(size):
            msg = f"LGFDR: score_kernel_size={self.score_kernel_size} is larger than image_size={size[0]}x{size[1]}."
            raise ValueError(msg)

        self.register_feature_statistics()

    # ------------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _check_settings(
        local_embed_dim: int,
        local_depth: int,
        local_num_heads: int,
        kernel_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
    ) -> None:
        for name, value, low in (
            ("local_embed_dim", local_embed_dim, 1),
            ("local_depth", local_depth, 1),
            ("local_num_heads", local_num_heads, 1),
            ("embed_dim", embed_dim, 4),
            ("depth", depth, 1),
            ("num_heads", num_heads, 1),
        ):
            _positive_int(name, value, low)
        if local_embed_dim % local_num_heads:
            msg = (
                f"LGFDR: local_embed_dim ({local_embed_dim}) must be divisible by local_num_heads ({local_num_heads})."
            )
            raise ValueError(msg)
        if embed_dim % 4 or embed_dim % num_heads:
            msg = (
                f"LGFDR: embed_dim ({embed_dim}) must be divisible by 4 (2-D sin-cos positions) and by num_heads "
                f"({num_heads})."
            )
            raise ValueError(msg)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            msg = f"LGFDR: kernel_size must be a positive odd int (the NA window), got {kernel_size!r}."
            raise ValueError(msg)
        if not isinstance(mlp_ratio, int | float) or not mlp_ratio > 0:
            msg = f"LGFDR: mlp_ratio must be > 0, got {mlp_ratio!r}."
            raise ValueError(msg)

    def _init_weights(self) -> None:
        """MAE initialisation (xavier-uniform Linear, zero bias, LayerNorm 1/0) of the stem and both towers.

        The SRH's spatial gate stays at zero (both towers weighted ½ at the start); the patch embedding and the token
        head initialise themselves (xavier-uniform).
        """
        modules = [m for m in (self.stem, self.local_tower) if m is not None]
        if self.global_tower is not None:
            modules += [self.global_tower.blocks, self.global_tower.norm]
        init_mae_weights(*modules)

    @property
    def image_size_divisor(self) -> int:
        """Input height and width must be multiples of this: feature stride × ``patch_size`` (the global tower's
        tokens tile the feature grid; 16 with the default stride-4 grid and 4×4 patches)."""
        return self.feature_stride * (self.patch_size if self.towers in ("both", "global") else 1)

    def check_image_size(self, image_size: tuple[int, int]) -> None:
        """One ``ValueError`` naming ``image_size`` when the input size cannot be taken."""
        h, w = int(image_size[0]), int(image_size[1])
        div = self.image_size_divisor
        if h % div or w % div or h < div or w < div:
            example = f"{max(div, round(h / div) * div)}x{max(div, round(w / div) * div)}"
            msg = (
                f"LGFDR cannot take image_size={h}x{w} (the input size after the pre-processor's Resize): the feature "
                f"grid is input / {self.feature_stride} and the global tower cuts it into {self.patch_size}x"
                f"{self.patch_size} patches, so height and width must be multiples of {div}. Use e.g. "
                f"image_size={example}."
            )
            raise ValueError(msg)

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Re-target the model to another input size (size check, position cache); no weight depends on it."""
        size = (int(image_size[0]), int(image_size[1]))
        self.check_image_size(size)
        self.image_size = size
        if self.global_tower is not None:
            grid = (
                size[0] // self.feature_stride // self.patch_size,
                size[1] // self.feature_stride // self.patch_size,
            )
            self.global_tower.set_grid(grid)

    # ------------------------------------------------------------------------------------------------ pieces
    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated frozen features ``(B, C, H/s, W/s)`` before standardisation, with input and NaN checks."""
        check_model_input("LGFDR", images)
        if not is_tracing():
            self.check_image_size((int(images.shape[-2]), int(images.shape[-1])))
        features = self.feature_aggregator(self.feature_extractor(images))
        check_features("LGFDR", features)
        return features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction target ``F``: raw features standardised per channel (``standardize_features``)."""
        features = self.raw_features(images)
        if not self.standardize_features:
            return features
        if not is_tracing() and not self.feature_statistics_fitted:
            msg = (
                "LGFDR: the feature statistics are not fitted (standardize_features=True). Train through Engine.fit "
                "(they are measured when training starts), load a trained checkpoint, or call "
                "LGFDR.fit_feature_statistics()."
            )
            raise RuntimeError(msg)
        return self.standardize(features)

    def add_noise(self, features: torch.Tensor) -> torch.Tensor:
        """``F̃ = F + σ·ε`` in training (σ = ``feature_noise_std``); ``F`` itself in eval mode or when σ = 0."""
        if not self.training or self.feature_noise_std <= 0:
            return features
        return features + self.feature_noise_std * torch.randn_like(features)

    def reconstruct(
        self, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Towers and SRH on (noisy) features ``(B, C, h, w)`` → ``(R, R_l, R_g, w_l)``."""
        stem = self.stem(inputs.permute(0, 2, 3, 1))  # (B, h, w, D_l)
        local = self.local_tower(stem) if self.local_tower is not None else None
        global_ = self.global_tower(stem.permute(0, 3, 1, 2)) if self.global_tower is not None else None
        if self.srh is not None:
            fused, gate = self.srh(local, global_)
            return fused, local, global_, gate
        return (local if local is not None else global_), local, global_, None

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """``max(avg_pool2d(map, k, 1, k // 2))`` per image (separable box filter, exact in fp32)."""
        return reduce_max_avgpool(anomaly_map, self.score_kernel_size, padding=self.score_kernel_size // 2)

    # ------------------------------------------------------------------------------------------------ forward
    def details(self, images: torch.Tensor) -> LGFDRDetails:
        """Inference with every intermediate result (features, both towers, the gate, map, score)."""
        features = self.features(images)
        fused, local, global_, gate = self.reconstruct(features)
        anomaly_map = self.anomaly_map_generator([features], [fused], out_size=tuple(images.shape[-2:]))
        return LGFDRDetails(features, fused, local, global_, gate, anomaly_map, self.score(anomaly_map))

    def forward(self, images: torch.Tensor) -> LGFDRTrainOutput | InferenceBatch:
        """Training: :class:`LGFDRTrainOutput` (noisy input, clean target). Eval: ``InferenceBatch``."""
        if not self.training:
            out = self.details(images)
            return InferenceBatch(pred_score=out.pred_score, anomaly_map=out.anomaly_map)
        features = self.features(images)
        noisy = self.add_noise(features)
        fused, local, global_, gate = self.reconstruct(noisy)
        return LGFDRTrainOutput(features, noisy, fused, local, global_, gate)
