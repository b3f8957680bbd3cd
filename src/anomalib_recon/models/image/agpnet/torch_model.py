"""PyTorch model of AGPNet (attention-guided perturbation network).

Two branches (paper Sec. 3.1):

* **reconstruction branch** (kept for inference): a frozen encoder gives multi-layer features; each layer is
  layer-normed and the layers are summed (ViT) or concatenated (CNN) into the target ``F`` on a token grid; a
  plain ViT decoder reconstructs ``F̂``. Anomaly map = per-token ``‖F − F̂‖₂`` (or ``1 − cos``: the distance the
  loss trains, see ``distance``), bilinearly upsampled and Gaussian-smoothed; image score = max of the
  average-pooled map.
* **auxiliary branch** (training only): an attention mask ``Φ_norm(Φ_norm(A_prior) + Φ_norm(A_learn))`` from the
  encoder's attention (prior) and from an EMA "mean-teacher" copy of the decoder (learnable) weights Gaussian noise
  added to the features (``F + E ⊙ (α·mask + β)``) and, binarised at a growing mask ratio, Gaussian noise added to
  the image. The decoder learns to map both perturbed versions back to the clean ``F``.

The eval forward touches only ``encoder``, ``aggregator`` and ``decoder``; the teacher and the attention
recording are used behind ``self.training`` only, so exported graphs contain neither.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components import (
    AnomalyMapGenerator,
    FeatureAggregator,
    map_to_tokens,
    reduce_max_avgpool,
    tokens_to_map,
)
from anomalib_recon.components.feature_extractor import (
    BackboneInfo,
    FeatureExtractor,
    attention_weights,
    probe_backbone,
)
from anomalib_recon.components.guards import check_features, check_model_input

from .ema import EMATeacher
from .perturbation import image_region_noise, min_max_normalize, top_fraction_mask, weighted_noise

__all__ = [
    "AGPNetDecoder",
    "AGPNetModel",
    "AGPNetTrainOutput",
    "count_parameters",
    "resolve_layers",
]

NOISE_MODES = ("attention", "random", "none")
ATTENTION_SOURCES = ("both", "prior", "learnable")
PRIOR_MODES = ("cls", "received")
DISTANCES = ("l2", "cos")
AGGREGATIONS = ("sum", "concat")


class AGPNetTrainOutput(NamedTuple):
    """What the training forward returns.

    Attributes:
        target: Clean aggregated features ``F`` ``(B, C, h, w)`` (the reconstruction target).
        reconstructions: ``F̂`` per perturbation branch ``(B, C, h, w)``: feature-level, then image+feature-level
            (only when image noise is on).
        attention_mask: The guidance map actually used for the feature noise ``(B, h, w)`` in [0, 1] (all zeros
            when feature noise is off).
        image_mask: Binary pixel mask of the image-level noise ``(B, 1, H, W)`` (``None`` without image noise).
    """

    target: torch.Tensor
    reconstructions: list[torch.Tensor]
    attention_mask: torch.Tensor
    image_mask: torch.Tensor | None


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AGPNetDecoder(nn.Module):
    """Plain ViT decoder: (input projection) + learnable position embedding + ``depth`` pre-norm blocks + LN + linear
    output head.

    The output head (**INFERRED**, as MAE's ``decoder_pred``) lets the MSE-trained reconstruction reach the target's
    scale: a final LN alone caps every token at unit RMS per channel, while ``Σ_l LN(F_l)`` of correlated ViT layers
    has an RMS of up to ``len(layers)`` (about 3 for ``test_vit``), which the LN's affine weight learns only slowly.

    Args:
        in_dim: Channels of the target features ``C``.
        dim: Width of the blocks; when it differs from ``in_dim`` an input projection is added.
        depth: Number of timm ``Block`` s (paper: 4).
        num_heads: Attention heads.
        mlp_ratio: MLP expansion of each block.
        grid_size: Token grid ``(h, w)`` of the position embedding (resampled bilinearly for other grids).
    """

    def __init__(
        self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, grid_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.input_proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, in_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        h, w = self.grid_size
        pe = self.pos_embed.reshape(1, h, w, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=grid, mode="bilinear", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Reconstruct tokens ``(B, L, C)`` on ``grid``; optionally also return each block's attention weights."""
        x = self.input_proj(tokens) + self._pos_embed(grid)
        attentions = []
        for block in self.blocks:
            if return_attention:
                attentions.append(attention_weights(block.attn, block.norm1(x)))
            x = block(x)
        x = self.output_proj(self.norm(x))
        return (x, attentions) if return_attention else x


def resolve_layers(backbone: str | BackboneInfo, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given, or the defaults: 4 evenly spaced ViT blocks (``[2, 5, 8, 11]`` for 12 blocks) or CNN
    stages ``[1, 2, 3]``.

    ``backbone`` is a timm name or its :func:`~anomalib_recon.components.feature_extractor.probe_backbone` result.
    """
    if layers is not None:
        return list(layers)
    info = backbone if isinstance(backbone, BackboneInfo) else probe_backbone(backbone)
    if info.is_vit:
        return sorted({max(info.depth * i // 4 - 1, 0) for i in (1, 2, 3, 4)})
    return [1, 2, 3]


class AGPNetModel(nn.Module):
    """AGPNet: frozen encoder + ViT decoder, with the attention-guided perturbation branch for training.

    Args:
        backbone: timm name of the frozen encoder. ViTs (paper: ``vit_small_patch16_224.dino``) give patch tokens and
            attention maps; CNNs (e.g. ``tf_efficientnet_lite0``) give feature maps, and their prior attention is the
            channel mean of ``|features|`` (activation-based spatial attention; the paper gives no rule for CNNs).
        layers: Encoder layers. ViT: 0-based block indices, default the 4 evenly spaced blocks ``[2, 5, 8, 11]``
            (blocks 3, 6, 9, 12, "shallow + deep"). CNN: ``features_only`` indices or names, default ``[1, 2, 3]``.
        weights: ``"imagenet"``, a local weights file, or ``None`` (random init; tests).
        image_size: Input size ``(H, W)`` the decoder's position embedding (and a ViT's input size) is built for.
        aggregation: ``"sum"`` of the layer-normed layers (paper; needs equal widths, the ViT default) or ``"concat"``
            (CNN default). ``None`` = automatic.
        decoder_embed_dim: Decoder width; ``None`` = the feature width for ViTs, 384 for CNNs.
        decoder_depth: Decoder blocks (paper: 4).
        decoder_num_heads: Decoder attention heads.
        decoder_mlp_ratio: Decoder MLP ratio (4 gives 7.3 M decoder parameters with ViT-S; the paper reports 4.42 M).
        feature_noise: ``"attention"`` (guided), ``"random"`` (the mask replaced by uniform noise) or ``"none"``.
        image_noise: ``"attention"``, ``"random"`` or ``"none"``.
        attention_source: ``"both"`` (prior + learnable), ``"prior"`` or ``"learnable"``.
        prior_attention: ViT prior ``"cls"`` (CLS→patch attention) or ``"received"`` (mean attention each patch
            receives).
        use_mean_teacher: Read the learnable attention from an EMA copy of the decoder (``False``: from the decoder).
        ema_decay: EMA decay η of the teacher.
        ema_update_every: Teacher update period in optimizer steps (paper: 10).
        feature_noise_floor: Constant noise level β added to ``α·mask``.
        image_noise_scale: Standard deviation of the image-level noise relative to each image's own standard
            deviation (over its pixels and channels, as the model sees it: after normalisation). **INFERRED**: the
            paper gives no σ; a fixed pixel σ of 0.2 leaves Magnetic Tile features at cosine 0.44 to the clean
            ones, while a relative σ perturbs low- and high-contrast data alike (README, "Image noise").
        distance: ``"l2"`` (paper, Eq. 8: MSE loss, ``‖F − F̂‖₂`` map) or ``"cos"`` (``1 − cos`` loss and map). It sets
            both the anomaly map here and the training loss (``AGPNetLoss(model.distance)``), so the map always
            measures what the loss trains.
        blur_sigma: Gaussian smoothing σ of the map (``None`` or 0 = off).
        score_kernel_size: Average-pool kernel of the image score (clamped to the map size).

    Attributes:
        feature_noise_intensity: α(t), set by the training loop (the easy → hard ramp).
        mask_ratio: ρ(t), the fraction of pixels receiving image noise, set by the training loop.
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "vit_small_patch16_224.dino",
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: tuple[int, int] = (256, 256),
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
        feature_noise_floor: float = 0.1,
        image_noise_scale: float = 0.5,
        distance: str = "l2",
        blur_sigma: float | None = 4.0,
        score_kernel_size: int = 16,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("feature_noise", feature_noise, NOISE_MODES),
            ("image_noise", image_noise, NOISE_MODES),
            ("attention_source", attention_source, ATTENTION_SOURCES),
            ("prior_attention", prior_attention, PRIOR_MODES),
            ("distance", distance, DISTANCES),
        ):
            if value not in allowed:
                msg = f"{name} must be one of {allowed}, got {value!r}."
                raise ValueError(msg)
        if aggregation is not None and aggregation not in AGGREGATIONS:
            msg = f"aggregation must be one of {AGGREGATIONS} or None, got {aggregation!r}."
            raise ValueError(msg)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) <= 0:
            msg = f"image_size must be a positive (height, width) pair, got {image_size}."
            raise ValueError(msg)
        if decoder_depth < 1 or decoder_num_heads < 1 or decoder_mlp_ratio <= 0:
            msg = "decoder_depth and decoder_num_heads must be >= 1 and decoder_mlp_ratio > 0."
            raise ValueError(msg)
        if feature_noise_floor < 0 or image_noise_scale < 0:
            msg = "feature_noise_floor and image_noise_scale must be >= 0."
            raise ValueError(msg)
        if score_kernel_size < 1:
            msg = f"score_kernel_size must be >= 1, got {score_kernel_size}."
            raise ValueError(msg)

        self.image_size: tuple[int, int] = image_size  # type: ignore[assignment]
        self.feature_noise = feature_noise
        self.image_noise = image_noise
        self.attention_source = attention_source
        self.prior_attention = prior_attention
        self.feature_noise_floor = float(feature_noise_floor)
        self.image_noise_scale = float(image_noise_scale)
        self.distance = distance
        self.score_kernel_size = int(score_kernel_size)
        self.feature_noise_intensity = 0.0
        self.mask_ratio = 1.0

        # ---------------------------------------------------------------- encoder (frozen)
        import timm

        name = str(backbone)
        if not timm.is_model(name.split(".")[0]):
            msg = f"Unknown timm backbone {backbone!r}; pass a timm model name such as 'vit_small_patch16_224.dino'."
            raise ValueError(msg)
        info = probe_backbone(name)  # one build on the meta device: nothing allocated or downloaded
        vit_img = image_size[0] if info.is_vit and image_size[0] == image_size[1] else None
        layers = resolve_layers(info, layers)
        # ViT encoders record their blocks' attention (A_prior) only inside extract(record_prior=True)
        self.encoder = FeatureExtractor(
            name, layers=layers, weights=weights, img_size=vit_img, return_attention=bool(info.is_vit)
        )
        self.encoder.return_attention = False
        self.is_vit = bool(self.encoder.is_vit)
        self.layers = list(self.encoder.layers)
        if aggregation is None:
            aggregation = "sum" if len(set(self.encoder.out_dims)) == 1 else "concat"
        if aggregation == "sum" and len(set(self.encoder.out_dims)) != 1:
            msg = f"aggregation='sum' needs equal layer widths, got {self.encoder.out_dims}; use 'concat'."
            raise ValueError(msg)
        self.aggregation = aggregation
        # Σ_l LN(F_l) (or their concatenation) on the token grid; CNN maps are average-pooled to the coarsest grid
        # and normalised there.
        self.aggregator = FeatureAggregator(
            mode=aggregation, grid="smallest", resize_mode="area", layer_norm=True, norm_after_resize=True
        )
        self.stride = int(max(self.encoder.reductions))
        if image_size[0] % self.stride or image_size[1] % self.stride:
            msg = f"image_size {image_size} must be a multiple of the encoder stride {self.stride}."
            raise ValueError(msg)
        self.feature_dim = int(self.encoder.out_dims[0]) if aggregation == "sum" else int(sum(self.encoder.out_dims))
        grid = (image_size[0] // self.stride, image_size[1] // self.stride)

        # ---------------------------------------------------------------- decoder (trained) and teacher (EMA)
        dim = decoder_embed_dim if decoder_embed_dim is not None else (self.feature_dim if self.is_vit else 384)
        if dim % decoder_num_heads:
            msg = f"decoder_embed_dim ({dim}) must be divisible by decoder_num_heads ({decoder_num_heads})."
            raise ValueError(msg)
        self.decoder = AGPNetDecoder(self.feature_dim, dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio, grid)
        self.teacher = (
            EMATeacher(self.decoder, decay=ema_decay, update_every=ema_update_every) if use_mean_teacher else None
        )
        self.anomaly_map_generator = AnomalyMapGenerator(
            distance=distance, align_corners=True, blur_sigma=blur_sigma if blur_sigma else None
        )

    # ------------------------------------------------------------------------------------------------ features
    def extract(self, images: torch.Tensor, record_prior: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder features aggregated into the target ``(B, C, h, w)``, and the raw per-layer maps."""
        check_model_input("AGPNet", images)
        if images.shape[-2] % self.stride or images.shape[-1] % self.stride:
            msg = (
                f"Input size {tuple(images.shape[-2:])} is not a multiple of the encoder stride {self.stride}; "
                "resize the images (the default pre-processor resizes to image_size)."
            )
            raise ValueError(msg)
        self.encoder.return_attention = record_prior and self.is_vit
        try:
            features = self.encoder(images)
        finally:
            self.encoder.return_attention = False
        target = self.aggregator(features)
        check_features("AGPNet", target)
        return target, features

    def reconstruct(self, target: torch.Tensor) -> torch.Tensor:
        """Decoder reconstruction ``F̂`` of a ``(B, C, h, w)`` map."""
        grid = (int(target.shape[-2]), int(target.shape[-1]))
        return tokens_to_map(self.decoder(map_to_tokens(target), grid), grid)

    # ------------------------------------------------------------------------------------------------ attention
    def prior_attention_map(self, features: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """``A_prior`` ``(B, h, w)``, averaged over the selected layers (each layer min-max normalised for CNNs).

        ViT: CLS→patch attention (``"cls"``) or the attention each patch receives (``"received"``), averaged over
        heads. CNN: channel mean of ``|F_l|`` pooled to the token grid.
        """
        if self.is_vit:
            if not self.encoder.attention_maps:
                msg = "No encoder attention was recorded; call extract(images, record_prior=True) first."
                raise RuntimeError(msg)
            p = self.encoder.num_prefix_tokens
            maps = []
            for attn in self.encoder.attention_maps:
                attn = attn.mean(dim=1)  # over heads: (B, N, N)
                if self.prior_attention == "cls":
                    maps.append(attn[:, 0, p:])
                else:
                    maps.append(attn[:, p:, p:].mean(dim=1))
            return torch.stack(maps, 0).mean(0).reshape(-1, *grid)
        maps = []
        for f in features:
            m = f.abs().mean(dim=1, keepdim=True)
            if tuple(m.shape[-2:]) != grid:
                m = F.adaptive_avg_pool2d(m, grid)
            maps.append(min_max_normalize(m[:, 0]))
        return torch.stack(maps, 0).mean(0)

    def learnable_attention_map(self, target: torch.Tensor) -> torch.Tensor:
        """``A_learn`` ``(B, h, w)``: mean attention each token receives in the (teacher) decoder run on clean ``F``."""
        grid = (int(target.shape[-2]), int(target.shape[-1]))
        decoder = self.teacher.module if self.teacher is not None else self.decoder
        with torch.no_grad():
            _, attentions = decoder(map_to_tokens(target), grid, return_attention=True)
        received = torch.stack([a.mean(dim=1).mean(dim=1) for a in attentions], 0).mean(0)  # (B, L)
        return received.reshape(-1, *grid)

    def attention_mask(self, target: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Φ_norm(Φ_norm(A_prior) + Φ_norm(A_learn))`` ``(B, h, w)`` in [0, 1] (one term for the ablations)."""
        grid = (int(target.shape[-2]), int(target.shape[-1]))
        with torch.no_grad():
            mask = torch.zeros(target.shape[0], *grid, device=target.device, dtype=target.dtype)
            if self.attention_source in ("both", "prior"):
                mask = mask + min_max_normalize(self.prior_attention_map(features, grid).to(target.dtype))
            if self.attention_source in ("both", "learnable"):
                mask = mask + min_max_normalize(self.learnable_attention_map(target).to(target.dtype))
            return min_max_normalize(mask)

    # ------------------------------------------------------------------------------------------------ perturbations
    def perturb_features(self, target: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """``F + E ⊙ (α·guide + β)`` with ``E ~ N(0, I)`` broadcast over channels (identity when feature noise is
        off)."""
        if self.feature_noise == "none":
            return target
        weight = self.feature_noise_intensity * guide + self.feature_noise_floor
        return weighted_noise(target, weight)

    def image_noise_mask(self, guide: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Binary mask ``(B, 1, H, W)``: the top ``mask_ratio`` fraction of pixels of the upsampled guide."""
        up = F.interpolate(guide.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        return top_fraction_mask(up, float(self.mask_ratio))

    def perturb_image(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x + M ⊙ N(0, σ²)`` with ``σ = image_noise_scale · std(x)`` per image (the input as the model sees it)."""
        std = self.image_noise_scale * images.detach().flatten(1).std(dim=1).view(-1, 1, 1, 1)
        return image_region_noise(images, mask, std=std)

    # ------------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def update_teacher(self) -> bool:
        """EMA step of the mean teacher towards the decoder; returns whether it moved."""
        if self.teacher is None:
            return False
        return self.teacher.update(self.decoder)

    def train(self, mode: bool = True) -> AGPNetModel:
        """The encoder (and the teacher) stay in eval mode."""
        super().train(mode)
        self.encoder.train(False)
        return self

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> AGPNetTrainOutput | InferenceBatch:
        """Train: perturbed reconstructions (:class:`AGPNetTrainOutput`). Eval: ``InferenceBatch`` with
        ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``."""
        if not self.training:
            return self.predict(images)
        needs_attention = "attention" in (self.feature_noise, self.image_noise)
        needs_prior = needs_attention and self.attention_source in ("both", "prior")
        target, features = self.extract(images, record_prior=needs_prior and self.is_vit)
        batch, grid = target.shape[0], (int(target.shape[-2]), int(target.shape[-1]))
        guide = self.attention_mask(target, features) if needs_attention else None
        random_guide = None
        if "random" in (self.feature_noise, self.image_noise):
            random_guide = min_max_normalize(torch.rand(batch, *grid, device=target.device, dtype=target.dtype))

        def pick(mode: str) -> torch.Tensor:
            if mode == "attention":
                return guide
            if mode == "random":
                return random_guide
            return torch.zeros(batch, *grid, device=target.device, dtype=target.dtype)

        feature_guide = pick(self.feature_noise)
        reconstructions = [self.reconstruct(self.perturb_features(target, feature_guide))]
        image_mask = None
        if self.image_noise != "none":
            image_mask = self.image_noise_mask(pick(self.image_noise), (int(images.shape[-2]), int(images.shape[-1])))
            with torch.no_grad():
                noisy_target, _ = self.extract(self.perturb_image(images, image_mask))
            reconstructions.append(self.reconstruct(self.perturb_features(noisy_target, feature_guide)))
        return AGPNetTrainOutput(target, reconstructions, feature_guide, image_mask)

    def predict(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map from the per-token reconstruction error (no noise, no teacher)."""
        target, _ = self.extract(images)
        recon = self.reconstruct(target)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        anomaly_map = self.anomaly_map_generator([target], [recon], out_size=size)
        kernel = min(self.score_kernel_size, *size)
        pred_score = reduce_max_avgpool(anomaly_map, kernel_size=kernel)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
