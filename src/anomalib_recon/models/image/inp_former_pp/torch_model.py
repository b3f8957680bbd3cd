"""PyTorch model of INP-Former++, composed from anomalib's INP-Former blocks.

Reconstruction branch (base INP-Former, CVPR 2025; anomalib ``inp_former``):

* a frozen encoder gives the target layers ``F_l`` as token grids; their mean ``F_Q`` is the query;
* the **INP extractor** (one anomalib ``AggregationBlock``) turns ``M`` learnable tokens into the image's own
  Intrinsic Normal Prototypes ``P`` by cross-attending to ``F_Q``;
* a bottleneck MLP (anomalib ``DinomalyMLP``) and the **INP-guided decoder** (anomalib ``PrototypeBlock`` s: keys and
  values are the INPs, ReLU attention, no first residual) reconstruct the tokens;
* encoder layers and decoder outputs (reversed) are averaged in groups (``InpFormerModel._fuse_feature``) and
  compared per group; ``M_rec`` = mean over groups of ``1 − cos`` (``InpFormerModel.calculate_anomaly_maps``).

INP-Former++ additions (arXiv 2506.03660; each a switch, see the Lightning module):

* **residual learning**: ``R = mean_g stopgrad[(1 − cos(F_en, F_de)) ⊙ |F_en − F_de|]`` feeds a small
  segmentation head (2 transposed convs + 1 conv) trained on pseudo-anomalies; the stop-gradient keeps the head from
  updating anything else;
* **fusion** ``map = ½ (M_rec + M_seg)``; score = mean of the top 1 % of the Gaussian-smoothed map (as the base).

CNN encoders (ours, not in the papers): the selected stages are layer-normed per position, resized to one grid
(``cnn_stride``, default the middle stage's stride) and concatenated along channels into a single target ``F``
whose width is the embedding dimension; both decoder halves reconstruct that one target (``groups [[0], [0]]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.dinomaly.components import DinomalyMLP
from anomalib.models.image.inp_former.components import AggregationBlock, PrototypeBlock
from anomalib.models.image.inp_former.lightning_model import InpFormer
from anomalib.models.image.inp_former.torch_model import InpFormerModel
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components import layer_norm_channels, map_to_tokens, tokens_to_map
from anomalib_recon.components.anomaly_map import AnomalyMapGenerator, make_blur
from anomalib_recon.components.feature_extractor import BackboneInfo, FeatureExtractor, probe_backbone
from anomalib_recon.components.tracing import is_tracing

__all__ = [
    "FUSIONS",
    "REC_MAPS",
    "REC_NORMALIZATIONS",
    "InpFormerPPModel",
    "InpFormerPPTrainOutput",
    "ResidualSegHead",
    "reduce_topk_mean",
    "resolve_layers",
]

REC_MAPS = ("cos", "cos_l2")
FUSIONS = ("mean", "rec", "seg")
REC_NORMALIZATIONS = ("none", "minmax")
_PAPER_LAYERS = {12: [2, 3, 4, 5, 6, 7, 8, 9], 24: [4, 6, 8, 10, 12, 14, 16, 18]}


class InpFormerPPTrainOutput(NamedTuple):
    """What the training forward returns.

    Attributes:
        encoder_features: Grouped encoder targets ``(B, C, h, w)`` of the normal images.
        decoder_features: Grouped reconstructions, same shapes (carry the gradient).
        query: Fused encoder tokens ``F_Q`` ``(B, L, C)``.
        prototypes: INPs ``(B, M, C)``.
        seg_prediction: Head probabilities ``(B, 1, H, W)`` on the pseudo-anomalous images (``None`` without them).
        residual: The head's input ``R`` ``(B, C, h, w)`` (``None`` without pseudo-anomalous images).
    """

    encoder_features: list[torch.Tensor]
    decoder_features: list[torch.Tensor]
    query: torch.Tensor
    prototypes: torch.Tensor
    seg_prediction: torch.Tensor | None
    residual: torch.Tensor | None


class ResidualSegHead(nn.Module):
    """INP-Former++ segmentation head on the residual ``R``: 2 transposed convs + 1 conv, bilinear up, sigmoid.

    Channels and kernels are unpublished (luow23/INP-Former#63); default ``C → 256 → 64 → 1`` with
    ``ConvT(k4, s2, p1) + BN + ReLU`` twice (4× the token grid) and a 3×3 conv.
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = (256, 64)) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 2 or min(channels) < 1:
            msg = f"seg_channels must be two positive ints (after each transposed conv), got {channels}."
            raise ValueError(msg)
        c1, c2 = channels
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_channels, c1, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c1, c2, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, 1, kernel_size=3, padding=1),
        )

    def forward(self, residual: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Probability map ``(B, 1, *out_size)`` from ``R`` ``(B, C, h, w)``."""
        logits = F.interpolate(self.layers(residual), size=out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)


def reduce_topk_mean(amap: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """Image score = mean of the top ``ratio`` fraction of pixels, ``k = max(1, int(N·ratio))`` (INP-Former: 1 %)."""
    if not 0 < ratio <= 1:
        msg = f"ratio must be in (0, 1], got {ratio}."
        raise ValueError(msg)
    if amap.dim() not in (3, 4):
        msg = f"expected an anomaly map (B, 1, H, W) or (B, H, W), got {tuple(amap.shape)}."
        raise ValueError(msg)
    flat = amap.flatten(1)
    k = max(1, int(flat.shape[1] * ratio))
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def resolve_layers(backbone: str | BackboneInfo, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given, or the defaults: paper layers for ViTs (12 blocks: 2-9; 24 blocks: 4, 6, ..., 18;
    otherwise 8 evenly spaced middle blocks, or all blocks when there are at most 8); CNNs: ``features_only`` stages
    ``[1, 2, 3]``.

    ``backbone`` is a timm name or its :func:`~anomalib_recon.components.feature_extractor.probe_backbone` result.
    """
    if layers is not None:
        return list(layers)
    info = backbone if isinstance(backbone, BackboneInfo) else probe_backbone(backbone)
    if not info.is_vit:
        return [1, 2, 3]
    depth = info.depth
    if depth in _PAPER_LAYERS:
        return list(_PAPER_LAYERS[depth])
    if depth <= 8:
        return list(range(depth))
    first, last = depth // 6, depth - depth // 6 - 1
    return sorted({round(first + i * (last - first) / 7) for i in range(8)})


def _halves(n: int) -> list[list[int]]:
    """``[[0 .. n/2-1], [n/2 .. n-1]]`` (``[[0], [0]]`` for a single item)."""
    if n == 1:
        return [[0], [0]]
    return [list(range(n // 2)), list(range(n // 2, n))]


def _check_groups(groups: Sequence[Sequence[int]], n: int, name: str) -> list[list[int]]:
    out = [[int(i) for i in g] for g in groups]
    if not out or any(not g for g in out) or any(not 0 <= i < n for g in out for i in g):
        msg = f"{name} must be non-empty lists of indices in 0..{n - 1}, got {groups!r}."
        raise ValueError(msg)
    return out


class InpFormerPPModel(nn.Module):
    """INP-Former++ on anomalib's INP-Former blocks, with any timm ViT or CNN encoder.

    Args:
        backbone: timm name of the frozen encoder; paper ``vit_base_patch14_reg4_dinov2`` (DINOv2-reg ViT-B/14).
        layers: Target layers: ViT block indices (default: :func:`resolve_layers`), CNN ``features_only`` indices.
        weights: ``"imagenet"`` (timm's pretrained weights, offline-aware), a local file, or ``None`` (random).
        image_size: Input size ``(H, W)`` a ViT's position embedding is built for (other sizes are resampled).
        num_inps: Number of INPs ``M`` (6).
        decoder_depth: INP-guided decoder blocks (8).
        num_heads: Attention heads of the extractor and the decoder; ``None`` = the ViT's own heads, or for CNNs the
            largest of 8/4/2/1 dividing the concatenated width.
        mlp_ratio: MLP expansion of the blocks and the bottleneck (4).
        encoder_groups: Groups of target-layer indices averaged into the compared encoder features (default: the
            two halves, ``[[0-3], [4-7]]``; ``[[0], [0]]`` for a CNN's single concatenated target).
        decoder_groups: Groups of (reversed) decoder outputs (default the two halves ``[[0-3], [4-7]]``).
        cnn_stride: CNNs only: stride of the common token grid (default: the middle selected stage's stride).
        residual_head: Build the ++ segmentation head on the residual.
        seg_channels: Output channels of the head's two transposed convs.
        seg_stop_gradient: Detach ``R`` so the head never updates the extractor or the decoder (paper).
        rec_map: ``"cos"`` (``1 − cos``, base) or ``"cos_l2"`` (``½(1 − cos + ‖F_en − F_de‖₂)``, third-party "Eq. 9").
        fusion: ``"mean"`` (``½(M_rec + M_seg)``), ``"rec"`` or ``"seg"``; ``None`` = ``"mean"`` with the head,
            ``"rec"`` without.
        rec_normalization: ``"none"`` or ``"minmax"``: ``M_rec`` min-max scaled before fusion by running statistics
            of the normal training images (an EMA of the per-batch min and max of the unblurred map, checkpointed
            buffers), so that ``1`` is the largest reconstruction error seen on normal images, on the scale of the
            head's probability. ``None`` = ``"minmax"`` with ``fusion="mean"``, else ``"none"`` (a monotone rescaling
            of a single map changes no metric). INFERRED: the sources fuse ``½(M_rec + M_seg)`` unscaled.
        blur_sigma: Gaussian σ of the map (4, base); ``None``/0 = off.
        blur_kernel: Gaussian kernel size (5, base).
        score_topk: Fraction of the highest pixels averaged into the image score (0.01).
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "vit_base_patch14_reg4_dinov2",
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: tuple[int, int] = (392, 392),
        num_inps: int = 6,
        decoder_depth: int = 8,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        encoder_groups: Sequence[Sequence[int]] | None = None,
        decoder_groups: Sequence[Sequence[int]] | None = None,
        cnn_stride: int | None = None,
        residual_head: bool = True,
        seg_channels: Sequence[int] = (256, 64),
        seg_stop_gradient: bool = True,
        rec_map: str = "cos",
        fusion: str | None = None,
        rec_normalization: str | None = None,
        blur_sigma: float | None = 4.0,
        blur_kernel: int = 5,
        score_topk: float = 0.01,
    ) -> None:
        super().__init__()
        fusion = fusion if fusion is not None else ("mean" if residual_head else "rec")
        if rec_normalization is None:
            rec_normalization = "minmax" if fusion == "mean" else "none"
        for name, value, allowed in (
            ("rec_map", rec_map, REC_MAPS),
            ("fusion", fusion, FUSIONS),
            ("rec_normalization", rec_normalization, REC_NORMALIZATIONS),
        ):
            if value not in allowed:
                msg = f"{name} must be one of {allowed}, got {value!r}."
                raise ValueError(msg)
        if fusion != "rec" and not residual_head:
            msg = f"fusion={fusion!r} needs the segmentation head; set residual_head=True or fusion='rec'."
            raise ValueError(msg)
        if num_inps < 1 or decoder_depth < 1 or mlp_ratio <= 0:
            msg = "num_inps and decoder_depth must be >= 1 and mlp_ratio > 0."
            raise ValueError(msg)
        if not 0 < score_topk <= 1:
            msg = f"score_topk must be a fraction in (0, 1], got {score_topk}."
            raise ValueError(msg)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) <= 0:
            msg = f"image_size must be a positive (height, width) pair, got {image_size}."
            raise ValueError(msg)

        import timm

        name = str(backbone)
        if not timm.is_model(name.split(".")[0]):
            msg = f"Unknown timm backbone {backbone!r}; e.g. 'vit_base_patch14_reg4_dinov2' or 'tf_efficientnet_lite0'."
            raise ValueError(msg)
        info = probe_backbone(name)  # one build on the meta device: nothing allocated or downloaded
        is_vit, vit_heads = info.is_vit, info.num_heads
        layers = resolve_layers(info, layers)
        vit_img = image_size[0] if is_vit and image_size[0] == image_size[1] else None
        self.encoder = FeatureExtractor(name, layers=layers, weights=weights, img_size=vit_img)
        self.is_vit = bool(self.encoder.is_vit)
        self.layers = list(self.encoder.layers)
        self.image_size = image_size

        if self.is_vit:
            self.embed_dim = int(self.encoder.out_dims[0])
            self.stride = int(self.encoder.patch_size)
            n_targets = len(self.layers)
            heads = num_heads if num_heads is not None else vit_heads
        else:
            self.embed_dim = int(sum(self.encoder.out_dims))
            reductions = sorted(int(r) for r in self.encoder.reductions)
            self.stride = int(cnn_stride) if cnn_stride is not None else reductions[len(reductions) // 2]
            if self.stride < 1:
                msg = f"cnn_stride must be >= 1, got {cnn_stride}."
                raise ValueError(msg)
            n_targets = 1
            heads = num_heads if num_heads is not None else next(h for h in (8, 4, 2, 1) if self.embed_dim % h == 0)
        if heads < 1 or self.embed_dim % heads:
            msg = f"num_heads ({heads}) must be >= 1 and divide the embedding width {self.embed_dim}."
            raise ValueError(msg)
        self.num_heads = int(heads)
        self.min_image_size = 2 * max(self.stride, *(int(r) for r in self.encoder.reductions))
        if min(image_size) < self.min_image_size:
            msg = (
                f"InpFormerPP: image_size {image_size} (the input size after the pre-processor) is too small for "
                f"{name}: at least {self.min_image_size} px per side are needed (stride "
                f"{max(self.stride, *self.encoder.reductions)}, 2 tokens per side). Use image_size >= "
                f"{self.min_image_size}."
            )
            raise ValueError(msg)
        self.encoder_groups = _check_groups(
            encoder_groups if encoder_groups is not None else _halves(n_targets), n_targets, "encoder_groups"
        )
        self.decoder_groups = _check_groups(
            decoder_groups if decoder_groups is not None else _halves(decoder_depth), decoder_depth, "decoder_groups"
        )
        if len(self.encoder_groups) != len(self.decoder_groups):
            msg = (
                f"encoder_groups ({len(self.encoder_groups)}) and decoder_groups ({len(self.decoder_groups)}) "
                "must have the same number of groups."
            )
            raise ValueError(msg)

        dim, norm = self.embed_dim, partial(nn.LayerNorm, eps=1e-8)
        self.prototype_tokens = nn.Parameter(torch.randn(num_inps, dim))
        self.aggregation = AggregationBlock(
            dim=dim, num_heads=self.num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm
        )
        self.bottleneck = DinomalyMLP(
            in_features=dim, hidden_features=int(dim * mlp_ratio), out_features=dim, act_layer=nn.GELU, bias=True
        )
        self.decoder = nn.ModuleList(
            PrototypeBlock(dim=dim, num_heads=self.num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)
        )
        # anomalib's InpFormer initialisation of the transformer parts (trunc-normal Linear, unit LayerNorm)
        InpFormer._initialize_trainable_modules(nn.ModuleList([self.aggregation, self.bottleneck, self.decoder]))
        self.seg_head = ResidualSegHead(dim, seg_channels) if residual_head else None
        self.seg_stop_gradient = bool(seg_stop_gradient)
        self.rec_map = rec_map
        self.fusion = fusion
        self.rec_normalization = rec_normalization
        self.score_topk = float(score_topk)
        self.blur = make_blur(blur_sigma, blur_kernel) if blur_sigma else None
        self.l2_map_generator = AnomalyMapGenerator(distance="l2", align_corners=True)  # rec_map="cos_l2"
        self.register_buffer("rec_min", torch.zeros(()))
        self.register_buffer("rec_max", torch.ones(()))
        self.register_buffer("rec_stats_updates", torch.zeros((), dtype=torch.long))
        self.rec_momentum = 0.1

    # ------------------------------------------------------------------------------------------------ features
    def trainable_parameters(self, head: bool = True, reconstruction: bool = True) -> list[nn.Parameter]:
        """Parameters an optimizer updates: INP tokens, extractor, bottleneck and decoder (``reconstruction``) and
        the segmentation head (``head``); the encoder is frozen."""
        params: list[nn.Parameter] = []
        if reconstruction:
            params.append(self.prototype_tokens)
            for module in (self.aggregation, self.bottleneck, self.decoder):
                params.extend(module.parameters())
        if head and self.seg_head is not None:
            params.extend(self.seg_head.parameters())
        return params

    def check_input(self, images: torch.Tensor) -> None:
        """One clear error for batches the encoder cannot take."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            msg = "InpFormerPP expects a float image tensor (B, 3, H, W); convert with image.float() / 255."
            raise TypeError(msg)
        if images.dim() != 4 or images.shape[1] != 3:
            msg = (
                f"InpFormerPP expects an RGB batch (B, 3, H, W), got {tuple(images.shape)}; "
                "convert grayscale images to 3 channels (anomalib's datamodules do this)."
            )
            raise ValueError(msg)
        if not is_tracing() and min(int(images.shape[-2]), int(images.shape[-1])) < self.min_image_size:
            msg = (
                f"Input {tuple(images.shape[-2:])} is too small for this encoder: at least {self.min_image_size} px "
                f"per side are needed (stride {max(self.stride, *self.encoder.reductions)}, 2 tokens per side)."
            )
            raise ValueError(msg)

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Target layers as token maps ``(B, C, h, w)``: one per ViT block, or one concatenated map for CNNs."""
        self.check_input(images)
        features = self.encoder(images)
        if not self.is_vit:
            grid = (math.ceil(images.shape[-2] / self.stride), math.ceil(images.shape[-1] / self.stride))
            maps = []
            for f in features:
                f = layer_norm_channels(f)
                if tuple(f.shape[-2:]) != grid:
                    larger = f.shape[-2] >= grid[0] and f.shape[-1] >= grid[1]
                    f = (
                        F.adaptive_avg_pool2d(f, grid)
                        if larger
                        else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                    )
                maps.append(f)
            features = [torch.cat(maps, dim=1)]
        if not is_tracing():
            for f in features:
                if not bool(torch.isfinite(f).all()):
                    msg = (
                        "The encoder produced NaN/inf features; check the input (finite, ImageNet-normalised) and "
                        "the backbone weights."
                    )
                    raise ValueError(msg)
        return features

    def reconstruct(
        self, targets: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """INP extraction + bottleneck + INP-guided decoder.

        Returns:
            Grouped encoder maps, grouped decoder maps (both ``(B, C, h, w)``), the query ``F_Q`` ``(B, L, C)`` and
            the INPs ``(B, M, C)``.
        """
        grid = (int(targets[0].shape[-2]), int(targets[0].shape[-1]))
        tokens = [map_to_tokens(t) for t in targets]
        query = InpFormerModel._fuse_feature(tokens)  # anomalib's layer fusion (mean)
        batch = query.shape[0]
        prototypes = self.aggregation(self.prototype_tokens.unsqueeze(0).expand(batch, -1, -1), query)
        x = self.bottleneck(query)
        outputs = []
        for block in self.decoder:
            x = block(x, prototypes)
            outputs.append(x)
        outputs = outputs[::-1]
        en = [InpFormerModel._fuse_feature([tokens[i] for i in g]) for g in self.encoder_groups]
        de = [InpFormerModel._fuse_feature([outputs[i] for i in g]) for g in self.decoder_groups]
        return [tokens_to_map(e, grid) for e in en], [tokens_to_map(d, grid) for d in de], query, prototypes

    @staticmethod
    def residual(encoder_features: list[torch.Tensor], decoder_features: list[torch.Tensor]) -> torch.Tensor:
        """``R = mean_g (1 − cos(F_en, F_de)) ⊙ |F_en − F_de|`` ``(B, C, h, w)`` (not detached here)."""
        maps = [
            (1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1) * (e - d).abs()
            for e, d in zip(encoder_features, decoder_features, strict=True)
        ]
        return torch.stack(maps, dim=0).mean(dim=0)

    def reconstruction_map(
        self, encoder_features: list[torch.Tensor], decoder_features: list[torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """``M_rec`` ``(B, 1, H, W)`` (unblurred, before any min-max scaling)."""
        amap, _ = InpFormerModel.calculate_anomaly_maps(encoder_features, decoder_features, out_size=size)
        if self.rec_map == "cos_l2":
            l2 = self.l2_map_generator(encoder_features, decoder_features, out_size=size)
            amap = 0.5 * (amap + l2)
        return amap

    def segment(self, residual: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``M_seg`` ``(B, 1, H, W)``: the head's probabilities."""
        if self.seg_head is None:
            msg = "This model has no segmentation head (residual_head=False)."
            raise RuntimeError(msg)
        return self.seg_head(residual, size)

    # ------------------------------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def update_rec_statistics(self, rec_map: torch.Tensor) -> None:
        """EMA of the per-batch min and max of ``M_rec`` on normal training images (for ``rec_normalization``)."""
        low, high = rec_map.amin().to(self.rec_min.dtype), rec_map.amax().to(self.rec_max.dtype)
        if int(self.rec_stats_updates) == 0:
            self.rec_min.copy_(low)
            self.rec_max.copy_(high)
        else:
            self.rec_min.lerp_(low, self.rec_momentum)
            self.rec_max.lerp_(high, self.rec_momentum)
        self.rec_stats_updates += 1

    def normalize_rec(self, rec_map: torch.Tensor) -> torch.Tensor:
        """Min-max scale ``M_rec`` with the running training statistics (identity for ``"none"``)."""
        if self.rec_normalization == "none":
            return rec_map
        return (rec_map - self.rec_min) / (self.rec_max - self.rec_min).clamp_min(1e-6)

    # ------------------------------------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> InpFormerPPModel:
        """The encoder stays in eval mode."""
        super().train(mode)
        self.encoder.train(False)
        return self

    def forward(
        self, images: torch.Tensor, augmented: torch.Tensor | None = None
    ) -> InpFormerPPTrainOutput | InferenceBatch:
        """Train: :class:`InpFormerPPTrainOutput` for the normal ``images`` (plus the head's prediction on the
        pseudo-anomalous ``augmented`` images). Eval: ``InferenceBatch`` (``pred_score (B,)``, ``anomaly_map``)."""
        if not self.training:
            return self.predict(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        en, de, query, prototypes = self.reconstruct(self.extract(images))
        if self.rec_normalization == "minmax":
            with torch.no_grad():
                self.update_rec_statistics(self.reconstruction_map(en, de, size))
        seg, residual = None, None
        if augmented is not None:
            if augmented.shape != images.shape:
                msg = f"augmented {tuple(augmented.shape)} must have the shape of images {tuple(images.shape)}."
                raise ValueError(msg)
            seg, residual = self.pseudo_anomaly_segmentation(augmented)
        return InpFormerPPTrainOutput(en, de, query, prototypes, seg, residual)

    def pseudo_anomaly_segmentation(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head probabilities ``(B, 1, H, W)`` and residual ``R`` for (pseudo-)anomalous training images.

        With ``seg_stop_gradient`` the reconstruction runs without a graph and ``R`` is detached, so a loss on the
        prediction reaches the head only.
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.seg_stop_gradient):
            en, de, _, _ = self.reconstruct(self.extract(images))
            residual = self.residual(en, de)
        if self.seg_stop_gradient:
            residual = residual.detach()
        return self.segment(residual, size), residual

    def predict_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(M_rec, M_seg)`` at the input size, unblurred; ``M_seg`` is ``None`` when the fusion does not use it."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        en, de, _, _ = self.reconstruct(self.extract(images))
        rec = self.reconstruction_map(en, de, size) if self.fusion != "seg" else None
        seg = self.segment(self.residual(en, de), size) if self.fusion != "rec" else None
        return rec, seg

    def fuse(self, rec_map: torch.Tensor | None, seg_map: torch.Tensor | None) -> InferenceBatch:
        """Fusion, Gaussian smoothing and the top-k image score."""
        if self.fusion == "rec":
            amap = self.normalize_rec(rec_map)
        elif self.fusion == "seg":
            amap = seg_map
        else:
            amap = 0.5 * (self.normalize_rec(rec_map) + seg_map)
        if self.blur is not None:
            amap = self.blur(amap)
        return InferenceBatch(pred_score=reduce_topk_mean(amap, self.score_topk), anomaly_map=amap)

    def predict(self, images: torch.Tensor) -> InferenceBatch:
        """Exported path: encoder → INPs → bottleneck → decoder → (head) → fusion → blur → score."""
        return self.fuse(*self.predict_maps(images))
