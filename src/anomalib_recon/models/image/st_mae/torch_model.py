"""PyTorch model of ST-MAE: Siamese Transition Masked Autoencoders over frozen CNN features.

Frozen backbone features from four stages are bilinearly resized to one grid (stride ``fusion_stride`` of the input)
and concatenated into ``Ψ`` (VGG19: 64 + 128 + 256 + 512 = 960 channels on a 64×64 grid at 256 px). ``Ψ`` is cut
into ``p × p`` feature-patch tokens (Conv ``k = s = p``, LayerNorm, fixed 2-D sin-cos positions). Then:

1. **decoupling**: a random permutation splits the ``L`` tokens into two disjoint halves, A (first ``L/2`` of the
   permutation) and B (the rest);
2. **Siamese encoder**: one ViT encoder (shared weights) encodes A alone and B alone (batched along the batch axis);
3. **transition**: the ``i``-th latent of A is placed at the position of the ``i``-th token of B and vice versa, then
   ``Linear(E → E_d)`` plus the decoder's sin-cos position *of that new position*;
4. **decoder**: a lightweight ViT over all ``L`` tokens, LayerNorm, and a projector ``Linear(E_d → p²·C)`` +
   unpatchify gives ``Ψ̂``. Each subset is thus predicted from the other subset's encoding only, so an anomalous
   token cannot be copied through its own latent.

The map is ``mean_c (Ψ − Ψ̂)² · (1 − cos_c(Ψ, Ψ̂))`` per position, bilinearly upsampled to the input and blurred
(σ = 4); the image score is its maximum. In training the partition is drawn afresh per image and step; at inference
``n_partitions`` fixed partitions drawn from ``partition_seed`` are used for every image (maps averaged), so scores
are reproducible, independent of the batch, and the partitions are constants of the exported graph.

Variants (``transition``): ``"swap"`` (the paper), ``"self"`` (each subset decoded at its own positions: the
self-reconstruction ablation) and ``"aux_token"`` (the authors' related PSA code: each subset's encoder pass sees a
full-length sequence with a learned auxiliary token at the other subset's positions; the latents found there are
decoded, with a learned latent auxiliary token at the subset's own positions, into that subset's reconstruction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.aggregation import FeatureAggregator
from anomalib_recon.components.anomaly_map import check_blur_fits, reduce_max
from anomalib_recon.components.feature_extractor import FeatureExtractor, probe_backbone
from anomalib_recon.components.guards import check_features, check_model_input
from anomalib_recon.components.initialization import init_mae_weights
from anomalib_recon.components.patch_embed import PatchEmbed, TokenToFeatureHead, patchify
from anomalib_recon.components.position import SinCosPositionEmbedding2D, get_2d_sincos_pos_embed

from .anomaly_map import STMAEAnomalyMap
from .partition import check_even, fixed_partitions, gather_tokens, inverse_permutation, random_partition, restore_order

__all__ = ["TRANSITIONS", "STMAEDetails", "STMAEModel", "STMAETrainOutput", "resolve_layers"]

TRANSITIONS = ("swap", "self", "aux_token")
NUM_STAGES = 4
"""ST-MAE fuses four backbone stages (the paper's hierarchical deep feature fusion)."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None) -> list[int | str]:
    """``layers`` as given, or for ``None`` the backbone's first four feature levels.

    VGG19: ``features.3, .8, .17, .26`` (relu1_2, relu2_2, relu3_4, relu4_4 at strides 1-8: 64 + 128 + 256 + 512 =
    960 channels, the layers of the TSTB-dev re-implementation); EfficientNet-Lite0: ``blocks.0, 1, 2, 4`` (strides
    2-16, 16 + 24 + 40 + 112 = 192); ResNets: ``act1, layer1-3`` (strides 2-16, 64 + 256 + 512 + 1024 = 1856, the
    channel count of the authors' PSA code). An empty list, a ViT without ``layers``, or a CNN with fewer than four
    feature levels is one clear ``ValueError``.
    """
    if layers is not None:
        layers = list(layers)
        if not layers:
            msg = "layers must name at least one backbone layer, e.g. ['features.3', 'features.8'] or [0, 1]."
            raise ValueError(msg)
        return layers
    info = probe_backbone(backbone)
    names = [entry["module"] for entry in info.feature_info]
    if info.is_vit or len(names) < NUM_STAGES:
        msg = (
            f"Cannot pick ST-MAE's default layers for '{backbone}': it fuses the first {NUM_STAGES} feature levels "
            f"of a CNN, and this backbone has {len(names)}. Pass layers explicitly (e.g. layers=[3, 6, 9] for a ViT)."
        )
        raise ValueError(msg)
    return names[:NUM_STAGES]


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of a batch stacked as ``[first; second]`` along axis 0.

    A reshape instead of ``chunk``: ``chunk`` of a symbolic batch makes ``torch.export`` specialise the batch size.
    """
    pair = x.reshape(2, -1, *x.shape[1:])
    return pair[0], pair[1]


class STMAETrainOutput(NamedTuple):
    """What the loss needs from a training forward pass."""

    pred_tokens: torch.Tensor
    """Predicted tokens ``Ψ̂`` ``(B, L, p·p·C)``, every token predicted from the other subset's encoding."""
    target_tokens: torch.Tensor
    """Patchified frozen features ``Ψ`` ``(B, L, p·p·C)``."""
    partition: torch.Tensor
    """The permutation of each image ``(B, L)``: subset A = first half, subset B = second half."""


class STMAEDetails(NamedTuple):
    """Intermediate results of one inference pass (for analysis and visualisation)."""

    features: torch.Tensor
    """Fused frozen features ``Ψ`` ``(B, C, H/s, W/s)``."""
    reconstructions: list[torch.Tensor]
    """``Ψ̂`` of each test partition, each ``(B, C, H/s, W/s)``."""
    partitions: torch.Tensor
    """The fixed test partitions ``(n_partitions, L)``."""
    anomaly_map: torch.Tensor
    """``(B, 1, H, W)``."""
    pred_score: torch.Tensor
    """``(B,)``: the map's maximum."""


class STMAEModel(nn.Module):
    """ST-MAE: frozen fused CNN features → random disjoint halves → Siamese encoder → transition → decoder → residual.

    Args:
        backbone: timm CNN; ``vgg19.tv_in1k`` (torchvision ImageNet weights) as in the paper.
        layers: Backbone layers to fuse (timm feature-module names or ``features_only`` indices); ``None`` = the first
            four feature levels (:func:`resolve_layers`).
        weights: ``"imagenet"``, a local weights file, or ``None`` (random init).
        image_size: ``(H, W)`` expected after pre-processing: a multiple of ``fusion_stride · patch_size``, giving an
            even number of tokens. Used to check the settings at construction and to cache positions and the test
            partitions; other sizes also run (computed on the fly), no weight depends on it.
        post_pool: 2×2 max-pool every tapped map before fusion. With VGG19 this reads the post-pool stage outputs of
            the authors' PSA code (``features[:5]``, ``[5:10]``, ``[10:19]``, ``[19:28]``) instead of the pre-pool
            ReLU outputs (False, the re-implementation's taps).
        fusion_stride: Stride of the fused grid relative to the input (4: 64×64 at 256 px).
        patch_size: Patch size ``p`` of the feature-patch tokens (4: 16×16 tokens at 256 px).
        embed_dim, depth, num_heads: Siamese encoder (240, 12, 12: the "tiny" size, also the authors' PSA widths).
        decoder_embed_dim, decoder_depth, decoder_num_heads: Decoder (256, 8, 16).
        mlp_ratio: MLP ratio of every block (4).
        transition: ``"swap"`` (the paper), ``"self"`` (self-reconstruction ablation) or ``"aux_token"``
            (the authors' PSA variant), see the module docstring.
        n_partitions: Fixed test partitions whose maps are averaged (1).
        partition_seed: Seed of the fixed test partitions (0).
        blur_sigma: σ of the Gaussian smoothing of the upsampled map (4); ``None`` = no blur.
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "vgg19.tv_in1k",
        layers: Sequence[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: tuple[int, int] = (256, 256),
        post_pool: bool = False,
        fusion_stride: int = 4,
        patch_size: int = 4,
        embed_dim: int = 240,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 256,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        transition: str = "swap",
        n_partitions: int = 1,
        partition_seed: int = 0,
        blur_sigma: float | None = 4.0,
    ) -> None:
        super().__init__()
        self._check_args(
            fusion_stride=fusion_stride,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            n_partitions=n_partitions,
        )
        if transition not in TRANSITIONS:
            msg = f"transition must be one of {TRANSITIONS}, got {transition!r}."
            raise ValueError(msg)
        if not mlp_ratio > 0 or (blur_sigma is not None and not blur_sigma > 0):
            msg = f"need mlp_ratio > 0 and blur_sigma > 0 (or None); got {mlp_ratio}, {blur_sigma}."
            raise ValueError(msg)
        self.post_pool = bool(post_pool)
        self.fusion_stride = int(fusion_stride)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.decoder_embed_dim = int(decoder_embed_dim)
        self.transition = transition
        self.n_partitions = int(n_partitions)
        self.partition_seed = int(partition_seed)
        self.blur_sigma = None if blur_sigma is None else float(blur_sigma)

        self.feature_extractor = FeatureExtractor(backbone, layers=resolve_layers(backbone, layers), weights=weights)
        size = (int(image_size[0]), int(image_size[1]))
        check_blur_fits(blur_sigma, None, size, "STMAE")
        self.feature_channels = self._probe_channels(size)

        self.patch_embed = PatchEmbed(self.feature_channels, embed_dim, patch_size, norm=True)
        self.blocks = nn.ModuleList(self._block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            self._block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.head = TokenToFeatureHead(decoder_embed_dim, self.feature_channels, patch_size)
        if transition == "aux_token":  # only then: unused parameters would stop DDP
            self.aux_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.latent_aux_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.anomaly_map = STMAEAnomalyMap(blur_sigma, align_corners=True)
        self._set_grid(size)
        self._init_weights()

    # ------------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _check_args(**values: int) -> None:
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be an int >= 1, got {value!r}."
                raise ValueError(msg)
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if values[dim] % 4:
                msg = f"{dim} must be divisible by 4 (2-D sin-cos position embedding), got {values[dim]}."
                raise ValueError(msg)
            if values[dim] % values[heads]:
                msg = f"{dim} ({values[dim]}) must be divisible by {heads} ({values[heads]})."
                raise ValueError(msg)

    @staticmethod
    def _block(dim: int, heads: int, mlp_ratio: float) -> Block:
        return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)

    def _init_weights(self) -> None:
        """MAE init: xavier-uniform Linear (zero bias), LayerNorm 1/0; auxiliary tokens N(0, 0.02).

        The patch embedding (xavier-uniform as a Linear) and the projector (xavier-uniform) initialise themselves.
        """
        init_mae_weights(self.blocks, self.norm, self.decoder_embed, self.decoder_blocks, self.decoder_norm)
        if self.transition == "aux_token":
            nn.init.normal_(self.aux_token, std=0.02)
            nn.init.normal_(self.latent_aux_token, std=0.02)

    def _probe_channels(self, image_size: tuple[int, int]) -> int:
        """Channels of ``Ψ`` (one dry run of the frozen backbone, which also checks the size against it)."""
        device = next(self.feature_extractor.parameters(), torch.empty(0)).device
        with torch.no_grad():
            maps = self._stage_maps(torch.zeros(1, 3, *image_size, device=device))
        if any(min(m.shape[-2:]) < 1 for m in maps):
            msg = f"Input size {image_size} is too small for the backbone's deepest tapped layer; use a larger one."
            raise ValueError(msg)
        return int(sum(m.shape[1] for m in maps))

    def feature_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Fused grid ``(H/s, W/s)`` of an input size, with one clear error when the settings do not divide it."""
        h, w = int(image_size[0]), int(image_size[1])
        unit = self.fusion_stride * self.patch_size
        if h % unit or w % unit:
            msg = (
                f"Input size {h}x{w} is not a multiple of fusion_stride x patch_size = {self.fusion_stride} x "
                f"{self.patch_size} = {unit}; use an image_size that is (e.g. 256)."
            )
            raise ValueError(msg)
        return h // self.fusion_stride, w // self.fusion_stride

    def _set_grid(self, image_size: tuple[int, int]) -> None:
        feature_size = self.feature_grid(image_size)
        grid = (feature_size[0] // self.patch_size, feature_size[1] // self.patch_size)
        check_even(grid[0] * grid[1])
        self.image_size, self.feature_size, self.grid_size = image_size, feature_size, grid
        self.num_tokens = grid[0] * grid[1]
        self.aggregator = FeatureAggregator(out_size=feature_size, mode="concat", align_corners=True)
        device = self.norm.weight.device
        self.pos_embed = SinCosPositionEmbedding2D(self.embed_dim, grid).to(device)
        self.decoder_pos_embed = SinCosPositionEmbedding2D(self.decoder_embed_dim, grid).to(device)
        self._set_partition_buffers()

    def _set_partition_buffers(self) -> None:
        perms = fixed_partitions(self.n_partitions, self.num_tokens, self.partition_seed)
        device = self.norm.weight.device
        # non-persistent: recomputed from (n_partitions, partition_seed, image_size), which the checkpoint records
        self.register_buffer("test_partitions", perms.to(device), persistent=False)
        self.register_buffer("test_inverses", inverse_permutation(perms).to(device), persistent=False)

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Re-target the model to another input size (checks, position caches, test partitions of that grid)."""
        size = (int(image_size[0]), int(image_size[1]))
        if size != self.image_size:
            check_blur_fits(self.blur_sigma, None, size, "STMAE")
            self._set_grid(size)

    def set_partitions(self, n_partitions: int | None = None, partition_seed: int | None = None) -> None:
        """Change the fixed test partitions (how many maps are averaged, and their seed); training is unaffected."""
        if n_partitions is not None:
            self._check_args(n_partitions=n_partitions)
            self.n_partitions = int(n_partitions)
        if partition_seed is not None:
            self.partition_seed = int(partition_seed)
        self._set_partition_buffers()

    # ------------------------------------------------------------------------------------------------ features
    def _stage_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.feature_extractor(images)
        return [F.max_pool2d(m, 2) for m in maps] if self.post_pool else maps

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Fused frozen features ``Ψ`` ``(B, C, H/s, W/s)``, with shape and finiteness checks."""
        check_model_input("ST-MAE", images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        feature_size = self.feature_grid(size)
        check_even((feature_size[0] // self.patch_size) * (feature_size[1] // self.patch_size))
        aggregator = self.aggregator
        if feature_size != self.feature_size:
            aggregator = FeatureAggregator(out_size=feature_size, mode="concat", align_corners=True)
        features = aggregator(self._stage_maps(images))
        check_features("ST-MAE", features)
        return features

    def grid_of(self, features: torch.Tensor) -> tuple[int, int]:
        """Token grid ``(h, w)`` of a fused feature map."""
        return int(features.shape[-2]) // self.patch_size, int(features.shape[-1]) // self.patch_size

    def _position(self, table: SinCosPositionEmbedding2D, dim: int, tokens: torch.Tensor, grid: tuple[int, int]):
        if tuple(grid) == table.grid_size:
            return table(tokens)
        return tokens + get_2d_sincos_pos_embed(dim, grid).to(device=tokens.device, dtype=tokens.dtype)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Feature-patch tokens ``Ψ_F``: Conv(k = s = p) → LayerNorm → + fixed sin-cos position ``(B, L, E)``."""
        return self._position(self.pos_embed, self.embed_dim, self.patch_embed(features), self.grid_of(features))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The (Siamese) encoder: its blocks and final LayerNorm on any token sequence ``(N, K, E)``."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def decode(self, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Decoder on a full-length sequence already in position order ``(N, L, E_d)``: + position, blocks, norm,
        projector → ``(N, L, p·p·C)``."""
        x = self._position(self.decoder_pos_embed, self.decoder_embed_dim, latents, grid)
        for block in self.decoder_blocks:
            x = block(x)
        return self.head.project(self.decoder_norm(x))

    # ------------------------------------------------------------------------------------------------ transition
    def reconstruct(
        self, features: torch.Tensor, partition: torch.Tensor, inverse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted tokens ``(B, L, p·p·C)`` for one partition per image ``(B, L)`` or one for all ``(L,)``.

        Args:
            features: Fused features ``Ψ``.
            partition: Permutation of the token positions; subset A = its first half, subset B = the rest.
            inverse: Its inverse permutation, if already known (the fixed test partitions cache it).
        """
        tokens = self.embed(features)
        length = tokens.shape[1]
        if partition.shape[-1] != length:
            msg = f"partition has {partition.shape[-1]} positions, the features give {length} tokens."
            raise ValueError(msg)
        inverse = inverse_permutation(partition) if inverse is None else inverse
        half = length // 2
        if self.transition == "aux_token":
            return self._reconstruct_aux(tokens, inverse < half, self.grid_of(features))
        subset_a, subset_b = partition[..., :half], partition[..., half:]
        # Siamese encoder: the same weights encode A alone and B alone, batched along the batch axis
        both = torch.cat([gather_tokens(tokens, subset_a), gather_tokens(tokens, subset_b)], dim=0)
        latent_a, latent_b = _halves(self.decoder_embed(self.encode(both)))
        latents = torch.cat([latent_a, latent_b], dim=1)  # in the order of the partition: A, then B
        if self.transition == "swap":
            # transition: latents listed as (A, B) go to the positions (B, A), i.e. the order ``roll(partition, L/2)``,
            # whose inverse is ``(inverse + L/2) mod L``
            inverse = torch.remainder(inverse + half, length)
        return self.decode(restore_order(latents, inverse), self.grid_of(features))

    def _reconstruct_aux(self, tokens: torch.Tensor, member_a: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The authors' PSA variant: per subset, a full-length encoder pass with auxiliary tokens elsewhere.

        For subset S (A, then B): the encoder sees S's tokens at their positions and the learned ``aux_token`` (no
        position) at the other positions; the latents at those other positions are kept, the learned
        ``latent_aux_token`` is put at S's positions, and the decoder's output at S's positions is S's prediction.
        """
        in_a = member_a.reshape(-1, member_a.shape[-1], 1)  # (B or 1, L, 1), broadcast over the batch
        in_b = ~in_a
        aux = self.aux_token.to(tokens.dtype)
        encoded = self.encode(torch.cat([torch.where(in_a, tokens, aux), torch.where(in_b, tokens, aux)], dim=0))
        latent_a, latent_b = _halves(self.decoder_embed(encoded))
        latent_aux = self.latent_aux_token.to(latent_a.dtype)
        sequences = torch.cat([torch.where(in_a, latent_aux, latent_a), torch.where(in_b, latent_aux, latent_b)], 0)
        pred_a, pred_b = _halves(self.decode(sequences, grid))
        return torch.where(in_a, pred_a, pred_b)

    def training_partition(self, batch_size: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """A fresh random partition per image ``(B, L)`` (the global RNG, so ``seed_everything`` fixes it)."""
        return random_partition(batch_size, num_tokens, device=device)

    # ------------------------------------------------------------------------------------------------ forward
    def _test_partitions(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_tokens == self.num_tokens:
            return self.test_partitions, self.test_inverses
        perms = fixed_partitions(self.n_partitions, num_tokens, self.partition_seed).to(self.test_partitions.device)
        return perms, inverse_permutation(perms)

    def details(self, images: torch.Tensor) -> STMAEDetails:
        """Inference with the fixed test partitions, returning the intermediate results."""
        features = self.extract(images)
        grid = self.grid_of(features)
        perms, inverses = self._test_partitions(grid[0] * grid[1])
        reconstructions = [
            self.head.to_map(self.reconstruct(features, perms[m], inverses[m]), grid) for m in range(perms.shape[0])
        ]
        anomaly_map = self.anomaly_map(features, reconstructions, (int(images.shape[-2]), int(images.shape[-1])))
        return STMAEDetails(
            features=features,
            reconstructions=reconstructions,
            partitions=perms,
            anomaly_map=anomaly_map,
            pred_score=reduce_max(anomaly_map),
        )

    def forward(self, images: torch.Tensor) -> STMAETrainOutput | InferenceBatch:
        """Training: :class:`STMAETrainOutput` for the loss. Inference: ``InferenceBatch(pred_score, anomaly_map)``."""
        if not self.training:
            out = self.details(images)
            return InferenceBatch(pred_score=out.pred_score, anomaly_map=out.anomaly_map)
        features = self.extract(images)
        h, w = self.grid_of(features)
        partition = self.training_partition(images.shape[0], h * w, images.device)
        return STMAETrainOutput(
            pred_tokens=self.reconstruct(features, partition),
            target_tokens=patchify(features, self.patch_size),
            partition=partition,
        )
