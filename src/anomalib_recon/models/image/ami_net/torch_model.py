"""PyTorch model of AMI-Net: adaptive mask inpainting of frozen CNN features.

Frozen backbone features ``F`` (three CNN stages resized to the stride-4 grid, 3×3-smoothed, concatenated) are
cut into ``p × p`` patches by two patch embeddings:

* the **mask generator** branch (``auxi_embed``): ``num_centers`` learnable cluster-centre tokens and the patch
  tokens pass one ViT block; the centres come out image-conditioned. Each token's anomaly score is
  ``s_i = min_k d(t_i, c_k)`` with ``d(a, b) = ‖a − b‖ · (1 − cos(a, b))``; at inference a token is masked when
  its score reaches ``mean + σ·std`` of the scores of its cluster (clusters with more than one token only);
* the **inpainting** branch (``patch_embed``): masked tokens are replaced by a learnable mask token, a ViT
  reconstructs every token, a linear head + unpatchify gives ``F̂``.

In training the mask is random in position and quantity (``⌊N·r⌋`` tokens, ``r ~ U(0, 1)`` per image) and both
branches get norm-scaled feature jitter. The anomaly map is the product of the blurred squared-error map and the
blurred cosine-distance map; the image score is the map's standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.models.vision_transformer import Block
from torch import nn

from anomalib_recon.components.aggregation import FeatureAggregator
from anomalib_recon.components.anomaly_map import AnomalyMapGenerator, check_blur_fits, reduce_std
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.guards import check_features, check_model_input
from anomalib_recon.components.initialization import init_mae_weights
from anomalib_recon.components.patch_embed import PatchEmbed, TokenToFeatureHead, patchify
from anomalib_recon.components.position import SinCosPositionEmbedding2D, get_2d_sincos_pos_embed

from .loss import norm_cosine_distance
from .perturbation import norm_scaled_jitter, random_token_mask, token_mask

__all__ = [
    "AMINetDetails",
    "AMINetModel",
    "AMINetTrainOutput",
    "adaptive_mask",
    "resolve_layers",
    "width_matched_jitter_scale",
]

FEATURE_STRIDES = (4, 8, 16)
"""Strides of the default feature layers (WRN50 layer1-3, the paper's φ2-φ4)."""

PAPER_JITTER_SCALE = 20.0
PAPER_EMBED_DIM = 768


def width_matched_jitter_scale(embed_dim: int) -> float:
    """Jitter scale that keeps the paper's noise-to-token-norm ratio at another token width ``D``.

    The jitter is ``ε · ‖t‖ / D · s`` with ``ε ~ N(0, I_D)``; its norm is ``≈ s · ‖t‖ / √D`` (``‖ε‖ ≈ √D``), so
    the noise-to-token-norm ratio is ``s / √D``: ``20 / √768 ≈ 0.72`` in the paper. The same ratio at width ``D``
    needs ``s(D) = 20 · √(D / 768)`` (11.5 at 256, 4.1 at 32); a fixed 20 at ``D = 256`` would jitter 1.7× harder
    than the paper. **INFERRED**: the paper only runs ``D = 768``.
    """
    if embed_dim < 1:
        msg = f"embed_dim must be >= 1, got {embed_dim}."
        raise ValueError(msg)
    return PAPER_JITTER_SCALE * math.sqrt(embed_dim / PAPER_EMBED_DIM)


def resolve_layers(backbone: str, layers: Sequence[int | str] | None) -> list[int | str]:
    """The layers to extract: ``layers`` as given, or for ``None`` the last feature layer at strides 4, 8 and 16.

    That is ``layer1``-``layer3`` for ResNets (the paper's choice) and e.g. ``blocks.1, blocks.2, blocks.4`` for
    EfficientNet-Lite.
    """
    return layers_at_strides(backbone, layers, FEATURE_STRIDES)


def adaptive_mask(scores: torch.Tensor, clusters: torch.Tensor, num_clusters: int, sigma: float) -> torch.Tensor:
    """AMI-Net's adaptive mask: per cluster, mask tokens with ``s ≥ mean + σ·std`` (unbiased std).

    Written with one-hot sums instead of boolean indexing, so it has static shapes and exports to ONNX.

    Args:
        scores: Token anomaly scores ``(B, N)``.
        clusters: Index of each token's nearest centre ``(B, N)``.
        num_clusters: Number of centres ``K``.
        sigma: Threshold multiplier σ (0.5 in the paper).

    Returns:
        Bool mask ``(B, N)``, True = mask (replace by the mask token). Clusters with at most one token mask nothing.
    """
    one_hot = (clusters.unsqueeze(-1) == torch.arange(num_clusters, device=clusters.device)).to(scores.dtype)
    count = one_hot.sum(dim=1)  # (B, K)
    mean = (one_hot * scores.unsqueeze(-1)).sum(dim=1) / count.clamp_min(1)
    sq_dev = one_hot * (scores.unsqueeze(-1) - mean.unsqueeze(1)) ** 2
    std = (sq_dev.sum(dim=1) / (count - 1).clamp_min(1)).sqrt()
    threshold = mean + sigma * std  # (B, K)
    token_threshold = torch.gather(threshold, 1, clusters)
    token_count = torch.gather(count, 1, clusters)
    return (scores >= token_threshold) & (token_count > 1)


class AMINetTrainOutput(NamedTuple):
    """What the loss needs from a training forward pass."""

    pred_tokens: torch.Tensor
    """Inpainted tokens ``(B, N, p·p·C)``."""
    target_tokens: torch.Tensor
    """Patchified frozen features ``(B, N, p·p·C)``."""
    token_scores: torch.Tensor
    """``s_i = min_k d(t_i, c_k)`` of the clean tokens ``(B, N)``."""
    centers: torch.Tensor
    """Image-conditioned cluster centres ``(B, K, D)``."""
    mask: torch.Tensor
    """Random training mask ``(B, N)``."""


class AMINetDetails(NamedTuple):
    """Intermediate results of one inference pass (for analysis and visualisation)."""

    features: torch.Tensor
    """Frozen target features ``F`` ``(B, C, H/s, W/s)``."""
    reconstruction: torch.Tensor
    """Inpainted features ``F̂``, same shape."""
    token_scores: torch.Tensor
    """Token anomaly scores ``(B, h, w)``."""
    clusters: torch.Tensor
    """Nearest centre of each token ``(B, h, w)``."""
    mask: torch.Tensor
    """Inference mask ``(B, h, w)`` (all False without the adaptive mask)."""
    anomaly_map: torch.Tensor
    """``(B, 1, H, W)``."""
    pred_score: torch.Tensor
    """``(B,)``."""


class AMINetModel(nn.Module):
    """AMI-Net: frozen features → adaptive mask generator + inpainting transformer → residual maps.

    Args:
        backbone: timm CNN name; the paper uses ``wide_resnet50_2.tv_in1k`` (torchvision weights).
        layers: Backbone layers (timm feature-module names or ``features_only`` indices); ``None`` = the layers
            at strides 4, 8, 16 (:func:`resolve_layers`).
        weights: ``"imagenet"``, a local weights file, or ``None`` (random init).
        image_size: ``(H, W)`` expected after pre-processing: checked at construction (the feature grid, ``H/4 ×
            W/4`` with the default layers, must be divisible by ``patch_size``) and used to cache the position
            embedding. Other sizes work too (the embedding is then computed on the fly); no weight depends on it.
        patch_size: Patch size ``p`` of both patch embeddings (4).
        embed_dim: Token width ``D`` (768); divisible by 4 and by ``num_heads``.
        depth: ViT blocks of the inpainting branch (8).
        num_heads: Attention heads (12).
        aux_depth: ViT blocks of the mask-generator branch (1).
        mlp_ratio: MLP width ratio of the blocks (4).
        num_centers: Cluster-centre tokens ``K`` (8).
        sigma: Threshold multiplier σ of the adaptive mask (0.5).
        jitter_scale: Scale ``s`` of the norm-scaled feature jitter ``ε · ‖t‖ / D · s`` in training; ``None`` =
            :func:`width_matched_jitter_scale` (20 at the paper's ``D = 768``, the same noise-to-token-norm ratio
            ``20 / √768`` at other widths).
        adaptive_mask_at_inference: Mask tokens with the adaptive mask generator at inference (the paper);
            ``False`` inpaints without any mask (the paper's main ablation).
        blur_sigma: σ of the Gaussian smoothing of both maps (4; kernel ``2·⌊4σ+0.5⌋+1`` = 33).
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: tuple[int, int] = (256, 256),
        patch_size: int = 4,
        embed_dim: int = 768,
        depth: int = 8,
        num_heads: int = 12,
        aux_depth: int = 1,
        mlp_ratio: float = 4.0,
        num_centers: int = 8,
        sigma: float = 0.5,
        jitter_scale: float | None = None,
        adaptive_mask_at_inference: bool = True,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self._check_args(patch_size, embed_dim, depth, num_heads, aux_depth, mlp_ratio, num_centers, sigma, blur_sigma)
        if jitter_scale is None:
            jitter_scale = width_matched_jitter_scale(embed_dim)
        if jitter_scale < 0:
            msg = f"jitter_scale must be >= 0 (or None for the paper's ratio), got {jitter_scale}."
            raise ValueError(msg)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.num_centers = int(num_centers)
        self.sigma = float(sigma)
        self.jitter_scale = float(jitter_scale)
        self.adaptive_mask_at_inference = bool(adaptive_mask_at_inference)

        self.feature_extractor = FeatureExtractor(backbone, layers=resolve_layers(backbone, layers), weights=weights)
        self.aggregator = FeatureAggregator(out_size=None, mode="concat", align_corners=True, smooth=True)
        size = (int(image_size[0]), int(image_size[1]))
        check_blur_fits(blur_sigma, None, size, "AMINet", allow_off=False)  # the maps are blurred at the input size
        self.feature_channels, feature_size = self._probe_features(size)
        self._set_grid(size, feature_size)

        # mask-generator branch
        self.auxi_embed = PatchEmbed(self.feature_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, num_centers, embed_dim))  # the K cluster-centre tokens
        self.auxiliary = nn.ModuleList(self._block(embed_dim, num_heads, mlp_ratio) for _ in range(aux_depth))
        self.norm_auxi = nn.LayerNorm(embed_dim)
        # inpainting branch
        self.patch_embed = PatchEmbed(self.feature_channels, embed_dim, patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(self._block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = TokenToFeatureHead(embed_dim, self.feature_channels, patch_size)
        self.pos_embed = SinCosPositionEmbedding2D(embed_dim, self.grid_size)  # cache for ``image_size``

        self.anomaly_map_generator = AnomalyMapGenerator(
            distance="cos*l2sq", align_corners=True, blur_sigma=blur_sigma, product_after_blur=True
        )
        self._init_weights()

    # ------------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _check_args(
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        aux_depth: int,
        mlp_ratio: float,
        num_centers: int,
        sigma: float,
        blur_sigma: float,
    ) -> None:
        for name, value, low in (
            ("patch_size", patch_size, 1),
            ("embed_dim", embed_dim, 4),
            ("depth", depth, 1),
            ("num_heads", num_heads, 1),
            ("aux_depth", aux_depth, 1),
            ("num_centers", num_centers, 2),
        ):
            if not isinstance(value, int) or value < low:
                msg = f"{name} must be an int >= {low}, got {value!r}."
                raise ValueError(msg)
        if embed_dim % 4:
            msg = f"embed_dim must be divisible by 4 (2-D sin-cos position embedding), got {embed_dim}."
            raise ValueError(msg)
        if embed_dim % num_heads:
            msg = f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        if mlp_ratio <= 0 or sigma < 0 or blur_sigma <= 0:
            msg = f"need mlp_ratio > 0, sigma >= 0 and blur_sigma > 0; got {mlp_ratio}, {sigma}, {blur_sigma}."
            raise ValueError(msg)

    @staticmethod
    def _block(dim: int, heads: int, mlp_ratio: float) -> Block:
        return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)

    def _probe_features(self, image_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Channels and size of ``F`` for an input size (one dry run of the frozen backbone)."""
        device = next(self.feature_extractor.parameters(), torch.empty(0)).device
        with torch.no_grad():
            target = self.aggregator(self.feature_extractor(torch.zeros(1, 3, *image_size, device=device)))
        return int(target.shape[1]), (int(target.shape[2]), int(target.shape[3]))

    def _token_grid(self, feature_size: tuple[int, int], image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid of a feature map, with a clear error when the patch size does not divide it."""
        h, w = feature_size
        if h % self.patch_size or w % self.patch_size or h < self.patch_size or w < self.patch_size:
            where = f"Input size {image_size[0]}x{image_size[1]} gives" if image_size else "The input gives"
            msg = (
                f"{where} a {h}x{w} feature grid, which is not divisible by patch_size={self.patch_size}. "
                "Use an input size whose feature grid (input / 4 with the default layers) is a multiple of the "
                "patch size, e.g. 256x256."
            )
            raise ValueError(msg)
        return h // self.patch_size, w // self.patch_size

    def _set_grid(self, image_size: tuple[int, int], feature_size: tuple[int, int]) -> None:
        grid = self._token_grid(feature_size, image_size)
        if grid[0] * grid[1] < 2:
            msg = f"Input size {image_size} gives only {grid[0] * grid[1]} token(s); use a larger input."
            raise ValueError(msg)
        self.image_size, self.feature_size, self.grid_size = image_size, feature_size, grid
        self.num_tokens = grid[0] * grid[1]

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Re-target the model to another input size (checks the grid, rebuilds the position-embedding cache).

        No weight depends on the input size; other sizes also work without this call (the fixed position
        embedding is then computed on the fly).
        """
        size = (int(image_size[0]), int(image_size[1]))
        if size == self.image_size:
            return
        _, feature_size = self._probe_features(size)
        self._set_grid(size, feature_size)
        device = self.mask_token.device
        self.pos_embed = SinCosPositionEmbedding2D(self.embed_dim, self.grid_size).to(device)

    def add_position(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Add the fixed sin-cos position embedding of a ``grid`` of tokens."""
        if tuple(grid) == self.pos_embed.grid_size:
            return self.pos_embed(tokens)
        return tokens + get_2d_sincos_pos_embed(self.embed_dim, grid).to(device=tokens.device, dtype=tokens.dtype)

    def _init_weights(self) -> None:
        """MAE/AMI-Net init: xavier-uniform Linear (zero bias), LayerNorm 1/0, centres N(0, 0.02), mask token 0."""
        init_mae_weights(self.auxiliary, self.blocks, self.norm_auxi, self.norm)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.mask_token)

    # ------------------------------------------------------------------------------------------------ pieces
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen target features ``F`` ``(B, C, H/s, W/s)`` with shape and finiteness checks."""
        check_model_input("AMI-Net", images)
        features = self.aggregator(self.feature_extractor(images))
        feature_size = (int(features.shape[-2]), int(features.shape[-1]))
        self._token_grid(feature_size, (int(images.shape[-2]), int(images.shape[-1])))
        check_features("AMI-Net", features)
        return features

    def grid_of(self, features: torch.Tensor) -> tuple[int, int]:
        """Token grid ``(h, w)`` of a feature map ``F``."""
        return self._token_grid((int(features.shape[-2]), int(features.shape[-1])))

    def token_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask-generator branch: ``(scores (B, N), clusters (B, N), centers (B, K, D))``.

        In training the tokens that condition the centres are jittered; the scored tokens are always clean.
        """
        grid = self.grid_of(features)
        tokens = self.auxi_embed(features)
        clean = self.add_position(tokens, grid)
        noisy = self.add_position(norm_scaled_jitter(tokens, self.jitter_scale), grid) if self.training else clean
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), noisy], dim=1)
        for block in self.auxiliary:
            x = block(x)
        centers = self.norm_auxi(x[:, : self.num_centers])
        distances = norm_cosine_distance(clean.unsqueeze(2), centers.unsqueeze(1), dim=-1)  # (B, N, K)
        scores, clusters = distances.min(dim=2)
        return scores, clusters, centers

    def inpaint(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inpainting branch: masked tokens → ViT → per-token predictions ``(B, N, p·p·C)``."""
        x = token_mask(self.patch_embed(features), mask, self.mask_token)
        if self.training:
            x = norm_scaled_jitter(x, self.jitter_scale)
        x = self.add_position(x, self.grid_of(features))
        for block in self.blocks:
            x = block(x)
        return self.head.project(self.norm(x))

    def training_mask(self, batch_size: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Random positional & quantitative mask: ``⌊N·r⌋`` random tokens per image, ``r ~ U(0, 1)``."""
        ratio = torch.rand(batch_size, device=device)
        return random_token_mask(batch_size, num_tokens, ratio, device=device, rounding="floor")

    # ------------------------------------------------------------------------------------------------ forward
    def details(self, images: torch.Tensor, adaptive: bool | None = None) -> AMINetDetails:
        """Inference with all intermediate results; ``adaptive`` overrides ``adaptive_mask_at_inference``."""
        adaptive = self.adaptive_mask_at_inference if adaptive is None else adaptive
        features = self.extract(images)
        scores, clusters, _ = self.token_scores(features)
        if adaptive:
            mask = adaptive_mask(scores, clusters, self.num_centers, self.sigma)
        else:
            mask = torch.zeros_like(scores, dtype=torch.bool)
        grid = self.grid_of(features)
        reconstruction = self.head.to_map(self.inpaint(features, mask), grid)
        anomaly_map = self.anomaly_map_generator([features], [reconstruction], out_size=tuple(images.shape[-2:]))
        b, (h, w) = images.shape[0], grid
        return AMINetDetails(
            features=features,
            reconstruction=reconstruction,
            token_scores=scores.reshape(b, h, w),
            clusters=clusters.reshape(b, h, w),
            mask=mask.reshape(b, h, w),
            anomaly_map=anomaly_map,
            pred_score=reduce_std(anomaly_map),
        )

    def forward(self, images: torch.Tensor) -> AMINetTrainOutput | InferenceBatch:
        """Training: :class:`AMINetTrainOutput` for the loss. Inference: ``InferenceBatch(pred_score, anomaly_map)``."""
        if not self.training:
            out = self.details(images)
            return InferenceBatch(pred_score=out.pred_score, anomaly_map=out.anomaly_map)
        features = self.extract(images)
        scores, _, centers = self.token_scores(features)
        h, w = self.grid_of(features)
        mask = self.training_mask(images.shape[0], h * w, images.device)
        return AMINetTrainOutput(
            pred_tokens=self.inpaint(features, mask),
            target_tokens=patchify(features, self.patch_size),
            token_scores=scores,
            centers=centers,
            mask=mask,
        )
