"""PyTorch model of GLCF: a frozen teacher, the DPTV semantic bottleneck and three reverse-distillation decoders.

Paper: H. Yao et al., *Learning Global-Local Correspondence with Semantic Bottleneck for Logical Anomaly
Detection*, arXiv 2303.05768; authors' code: GitHub hmyao22/GLCF, commit a9eaaec (``models/bottleneck.py``,
``models/Model.py``, ``measure.py``). Data flow (WRN50 at 224 px in brackets):

* teacher Φ_L (frozen by default) → ``T_1..T_4`` at strides 4, 8, 16, 32 [256@56, 512@28, 1024@14, 2048@7];
* DPTV bottleneck on ``T_2..T_4``: one patch embedding per scale onto the stride-32 grid (patch sizes 4, 2, 1),
  summed; fixed sin-cos positions; a zero-initialised auxiliary (semantic) token appended; ViT encoder; the patch
  tokens become the local latent, the auxiliary token the global latent; a shared ``decoder_embed``; a *global*
  decoder (the global token followed by ``L`` zero-initialised latent tokens + positions) and a *local* decoder
  (the local tokens), both closed by the shared ``decoder_norm`` and ``decoder_pred`` → ``G_lat`` and ``L_lat``
  [2048@7 each];
* three decoders: Φ_G(G_lat) → global features ``G_k``; Ψ_L(L_lat) → local estimates ``L_k``; Ψ_G(L_lat) → global
  estimates ``Ĝ_k`` (k = 1..3, the shapes of ``T_1..T_3``).

Anomaly map: per scale the channel-wise cosine maps ``m^L_k = 1 − cos(T_k, L_k)`` and ``m^G_k = 1 − cos(G_k, Ĝ_k)``,
upsampled (bilinear, align_corners=True) to the input size, standardised with ``(μ, σ)`` per (branch, scale) fitted
on normal images (buffers), weighted over scales (1, 3, 6) and fused as ``w_L·local + w_G·global``; image score =
max (or std) of the fused map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.backbone.resnet_decoder import (
    DecoderBasicBlock,
    ResNetDecoder,
    get_decoder,
)
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.anomaly_map import check_blur_fits, make_blur, reduce_max, reduce_std
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.guards import check_features, check_model_input
from anomalib_recon.components.initialization import init_mae_weights
from anomalib_recon.components.patch_embed import MultiScalePatchEmbed
from anomalib_recon.components.position import SinCosPositionEmbedding2D, get_2d_sincos_pos_embed
from anomalib_recon.components.tracing import is_tracing

__all__ = [
    "BRANCHES",
    "DPTV",
    "SCORE_REDUCERS",
    "ChannelMirrorDecoder",
    "GLCFModel",
    "GLCFOutput",
    "resolve_layers",
]

BRANCHES = ("both", "local", "global")
SCORE_REDUCERS = ("max", "std")
DECODERS = ("auto", "resnet", "generic")
FEATURE_STRIDES = (4, 8, 16, 32)
"""Strides of the four teacher layers (WRN50 layer1-4)."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None) -> list[int | str]:
    """Four teacher layers: ``layers`` as given, or the last feature layer at strides 4, 8, 16 and 32.

    ``layer1``-``layer4`` for ResNets (the paper), ``blocks.1, blocks.2, blocks.4, blocks.6`` for EfficientNet-Lite.
    """
    if layers is not None:
        layers = list(layers)
        if len(layers) != 4:
            msg = (
                f"layers must name four teacher layers at successive strides (e.g. layer1-layer4), got {layers}: "
                "the first three are the compared targets, the last three feed the bottleneck."
            )
            raise ValueError(msg)
        return layers
    return layers_at_strides(backbone, None, FEATURE_STRIDES)


# ---------------------------------------------------------------------------------------------------- decoders
class ChannelMirrorDecoder(nn.Module):
    """Reverse-distillation-style decoder for any CNN teacher (**INFERRED**; the paper uses ResNet decoders only).

    Mirrors the teacher's stages with anomalib's ``DecoderBasicBlock``: per stage, from deep to shallow, one
    block that upsamples ×2 (transposed conv, as RD) to the target's width, ``blocks_per_stage − 1`` plain blocks,
    and a linear 1×1 head. The head is needed because EfficientNet features are signed (no ReLU after the last
    projection of a block), while every decoder block ends in a ReLU.

    Args:
        in_channels: Channels of the latent (the deepest teacher layer).
        out_channels: Channels of the targets, shallow to deep (``T_1..T_3``).
        blocks_per_stage: Decoder blocks per stage (ResNet-18's decoder has 2).

    Returns (forward): the reconstructions shallow to deep, each at twice the resolution of the next.
    """

    def __init__(self, in_channels: int, out_channels: Sequence[int], blocks_per_stage: int = 2) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            msg = f"decoder_blocks must be >= 1, got {blocks_per_stage}."
            raise ValueError(msg)
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        inplanes = int(in_channels)
        for planes in reversed([int(c) for c in out_channels]):
            upsample = nn.Sequential(
                nn.ConvTranspose2d(inplanes, planes, kernel_size=2, stride=2, bias=False), nn.BatchNorm2d(planes)
            )
            blocks = [DecoderBasicBlock(inplanes, planes, stride=2, upsample=upsample)]
            blocks += [DecoderBasicBlock(planes, planes) for _ in range(blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))
            self.heads.append(nn.Conv2d(planes, planes, kernel_size=1))
            inplanes = planes
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C_4, h, w)`` → ``[(B, C_1, 8h, 8w), (B, C_2, 4h, 4w), (B, C_3, 2h, 2w)]``."""
        outputs = []
        x = latent
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            outputs.append(head(x))
        return outputs[::-1]


def _resnet_decoder(backbone: str, channels: Sequence[int]) -> ResNetDecoder | None:
    """anomalib's reverse-distillation decoder for a ResNet-family teacher, if its widths match ``channels``."""
    base = backbone.split(".")[0]
    try:
        decoder = get_decoder(base)
    except ValueError:
        return None
    last = decoder.layer3[-1]  # the shallowest output: 64·expansion channels
    out1 = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
    expected = [out1, out1 * 2, out1 * 4, out1 * 8]
    return decoder if list(channels) == expected else None


# ---------------------------------------------------------------------------------------------------- bottleneck
class DPTV(nn.Module):
    """The semantic bottleneck DPTV (the authors' ``models/bottleneck.py``, its active "v3" forward).

    Args:
        in_channels: Channels of the three bottleneck inputs ``T_2..T_4``.
        patch_sizes: Patch size per input, chosen so all land on the deepest grid (4, 2, 1).
        grid_size: Token grid ``(h, w)`` of the deepest map at the construction input size (position cache).
        output_dim: Channels of ``G_lat``/``L_lat`` (= the deepest teacher layer, the decoders' input).
        embed_dim: Encoder width (480).
        depth: Encoder blocks (6).
        num_heads: Encoder heads (12).
        decoder_embed_dim: Width of both latent decoders (480).
        decoder_depth: Blocks of each latent decoder (6).
        decoder_num_heads: Heads of the latent decoders (16).
        mlp_ratio: MLP ratio of every block (4).
        legacy_double_residual: ``x ← Block(x) + x`` as the reference (its blocks already hold their residuals, so
            the identity path is doubled); ``False`` = plain ``x ← Block(x)``.
        fuse_patch_scales: Sum the three patch embeddings (the paper's multi-scale patch embedding, and what the
            authors' code does at commit a9eaaec). ``False`` = only the deepest scale's tokens: an ablation, the
            ``x = x3`` of the authors' earlier commit 0571ff1, replaced by the sum forty minutes later (392f98d).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        patch_sizes: Sequence[int],
        grid_size: tuple[int, int],
        output_dim: int,
        embed_dim: int = 480,
        depth: int = 6,
        num_heads: int = 12,
        decoder_embed_dim: int = 480,
        decoder_depth: int = 6,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        legacy_double_residual: bool = True,
        fuse_patch_scales: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.decoder_embed_dim = int(decoder_embed_dim)
        self.output_dim = int(output_dim)
        self.legacy_double_residual = bool(legacy_double_residual)
        self.fuse_patch_scales = bool(fuse_patch_scales)
        self.patch_embed = MultiScalePatchEmbed(in_channels, patch_sizes, embed_dim, fuse="sum")
        self.pos_embed = SinCosPositionEmbedding2D(embed_dim, grid_size)
        self.decoder_pos_embed = SinCosPositionEmbedding2D(decoder_embed_dim, grid_size)
        self.auxiliary_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(self._block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.latent_auxiliary_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.global_decoder_blocks = nn.ModuleList(
            self._block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.local_decoder_blocks = nn.ModuleList(
            self._block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, output_dim)
        self._init_weights()

    @staticmethod
    def _block(dim: int, heads: int, mlp_ratio: float) -> Block:
        return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)

    def _init_weights(self) -> None:
        """MAE init: xavier-uniform Linear with zero bias, LayerNorm 1/0; patch convs like Linear; tokens zero."""
        init_mae_weights(self)
        # PatchEmbed already initialises its convs with init_conv_as_linear; both tokens stay zero.

    def _positions(self, table: SinCosPositionEmbedding2D, dim: int, grid: tuple[int, int], ref: torch.Tensor):
        if tuple(grid) == table.grid_size:
            return table.pos_embed.to(ref.dtype)
        return get_2d_sincos_pos_embed(dim, grid).unsqueeze(0).to(device=ref.device, dtype=ref.dtype)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x) + x if self.legacy_double_residual else block(x)
        return x

    def embed(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch tokens ``(B, L, D)`` of ``T_2..T_4`` (summed, or the deepest only) with positions added."""
        if self.fuse_patch_scales:
            tokens = self.patch_embed(features)
        else:
            self.patch_embed(features)  # the same grid checks (and the same cost) as the sum
            tokens = self.patch_embed.embeds[-1](features[-1])
        grid = (int(features[-1].shape[-2]), int(features[-1].shape[-1]))
        return tokens + self._positions(self.pos_embed, self.embed_dim, grid, tokens)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T_2, T_3, T_4]`` → ``(L_lat, G_lat)``, each ``(B, output_dim, h, w)`` on the grid of ``T_4``."""
        b = features[-1].shape[0]
        h, w = int(features[-1].shape[-2]), int(features[-1].shape[-1])
        tokens = self.embed(features)
        length = tokens.shape[1]
        x = torch.cat([tokens, self.auxiliary_token.expand(b, -1, -1)], dim=1)
        x = self.norm(self._run(self.blocks, x))
        local_latent = self.decoder_embed(x[:, :length])
        global_latent = self.decoder_embed(x[:, length:])
        queries = self.latent_auxiliary_token.expand(b, length, -1)
        queries = queries + self._positions(self.decoder_pos_embed, self.decoder_embed_dim, (h, w), queries)
        g = self._run(self.global_decoder_blocks, torch.cat([global_latent, queries], dim=1))
        g = self.decoder_pred(self.decoder_norm(g))[:, -length:]
        loc = self._run(self.local_decoder_blocks, local_latent)
        loc = self.decoder_pred(self.decoder_norm(loc))
        return self._to_map(loc, h, w), self._to_map(g, h, w)

    @staticmethod
    def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


# ---------------------------------------------------------------------------------------------------- model
class GLCFOutput(NamedTuple):
    """Everything one forward pass produces (training output; :meth:`GLCFModel.details` at inference)."""

    teacher: list[torch.Tensor]
    """``T_1..T_3``, the compared teacher features."""
    local: list[torch.Tensor]
    """``L_k`` = Ψ_L(L_lat), local estimates of ``T_k``."""
    global_features: list[torch.Tensor]
    """``G_k`` = Φ_G(G_lat), global features."""
    global_estimates: list[torch.Tensor]
    """``Ĝ_k`` = Ψ_G(L_lat), global features estimated from the local latent."""
    local_latent: torch.Tensor
    """``L_lat`` ``(B, C_4, h, w)``."""
    global_latent: torch.Tensor
    """``G_lat`` ``(B, C_4, h, w)``."""


class GLCFModel(nn.Module):
    """GLCF: teacher → DPTV → three decoders; standardised, weighted cosine maps at inference.

    Args:
        backbone: timm CNN; ``wide_resnet50_2.tv_in1k`` (torchvision weights, as the reference) by default.
        layers: Four teacher layers at successive strides (``None``: strides 4-32, :func:`resolve_layers`).
        weights: ``"imagenet"``, a local weights file, or ``None``.
        image_size: Input ``(H, W)`` (checks and the position cache); a multiple of the deepest stride (32).
        embed_dim, depth, num_heads: DPTV encoder (480, 6, 12).
        decoder_embed_dim, decoder_depth, decoder_num_heads: DPTV latent decoders (480, 6, 16).
        mlp_ratio: Block MLP ratio (4).
        legacy_double_residual: Reference's extra outer residual per block (True).
        fuse_patch_scales: Sum the three patch embeddings (True, the paper and the authors' code); False = the
            deepest scale only (ablation).
        decoder: ``"auto"`` (anomalib's ResNet decoder when the teacher is a ResNet whose widths it mirrors, else
            :class:`ChannelMirrorDecoder`), ``"resnet"`` or ``"generic"``.
        decoder_blocks: Blocks per stage of :class:`ChannelMirrorDecoder` (2).
        train_teacher: Optimise the teacher too, in train mode, as the released code does (False).
        scale_weights: Weights of the three standardised scale maps, per branch ((1, 3, 6)).
        branch_weights: ``(w_L, w_G)`` of the final fusion ((1, 1)).
        branch: ``"both"``, ``"local"`` (structural branch only) or ``"global"`` (logical branch only).
        score_reducer: Image score from the fused map: ``"max"`` (default) or ``"std"`` (``measure.py``).
        blur_sigma: Optional Gaussian σ applied to every upsampled (branch, scale) map before standardisation.
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: tuple[int, int] = (224, 224),
        embed_dim: int = 480,
        depth: int = 6,
        num_heads: int = 12,
        decoder_embed_dim: int = 480,
        decoder_depth: int = 6,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        legacy_double_residual: bool = True,
        fuse_patch_scales: bool = True,
        decoder: str = "auto",
        decoder_blocks: int = 2,
        train_teacher: bool = False,
        scale_weights: Sequence[float] = (1.0, 3.0, 6.0),
        branch_weights: Sequence[float] = (1.0, 1.0),
        branch: str = "both",
        score_reducer: str = "max",
        blur_sigma: float | None = None,
    ) -> None:
        super().__init__()
        self._check_args(embed_dim, num_heads, decoder_embed_dim, decoder_num_heads, depth, decoder_depth, decoder)
        if len(scale_weights) != 3 or len(branch_weights) != 2:
            msg = f"scale_weights needs 3 values and branch_weights 2, got {scale_weights} and {branch_weights}."
            raise ValueError(msg)
        self.scale_weights = [float(w) for w in scale_weights]
        self.branch_weights = [float(w) for w in branch_weights]
        self.set_scoring(branch=branch, score_reducer=score_reducer)
        self.train_teacher = bool(train_teacher)

        self.teacher = FeatureExtractor(
            backbone, layers=resolve_layers(backbone, layers), weights=weights, trainable=self.train_teacher
        )
        self.channels = [int(c) for c in self.teacher.out_dims]
        size = (int(image_size[0]), int(image_size[1]))
        shapes = self._probe(size)
        self.image_size = size
        self.grid_size = shapes[-1]
        self.bottleneck = DPTV(
            in_channels=self.channels[1:],
            patch_sizes=[shapes[i][0] // shapes[-1][0] for i in (1, 2, 3)],
            grid_size=self.grid_size,
            output_dim=self.channels[3],
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            legacy_double_residual=legacy_double_residual,
            fuse_patch_scales=fuse_patch_scales,
        )
        self.decoder_kind = self._decoder_kind(backbone, decoder)
        self.global_decoder = self._make_decoder(backbone, decoder_blocks)  # Φ_G
        self.local_decoder = self._make_decoder(backbone, decoder_blocks)  # Ψ_L
        self.global_estimator = self._make_decoder(backbone, decoder_blocks)  # Ψ_G
        check_blur_fits(blur_sigma, None, size, "GLCF")
        self.blur = make_blur(blur_sigma) if blur_sigma is not None else None

        # (μ, σ) per (branch: 0 = local, 1 = global; scale k = 1..3), fitted on normal images after training.
        self.register_buffer("stats_mean", torch.zeros(2, 3))
        self.register_buffer("stats_std", torch.ones(2, 3))
        self.register_buffer("stats_fitted", torch.tensor(False))

    # ------------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _check_args(
        embed_dim: int,
        num_heads: int,
        decoder_embed_dim: int,
        decoder_num_heads: int,
        depth: int,
        decoder_depth: int,
        decoder: str,
    ) -> None:
        for name, value in (("depth", depth), ("decoder_depth", decoder_depth)):
            if not isinstance(value, int) or value < 1:
                msg = f"{name} must be an int >= 1, got {value!r}."
                raise ValueError(msg)
        for name, dim, heads in (
            ("embed_dim", embed_dim, num_heads),
            ("decoder_embed_dim", decoder_embed_dim, decoder_num_heads),
        ):
            if dim <= 0 or dim % 4:
                msg = f"{name} must be a positive multiple of 4 (2-D sin-cos position embedding), got {dim}."
                raise ValueError(msg)
            if heads < 1 or dim % heads:
                msg = f"{name} ({dim}) must be divisible by its number of heads ({heads})."
                raise ValueError(msg)
        if decoder not in DECODERS:
            msg = f"decoder must be one of {DECODERS}, got {decoder!r}."
            raise ValueError(msg)

    def _probe(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Teacher map sizes for an input size, checked: each layer half the size of the previous one."""
        device = next(self.teacher.parameters(), torch.empty(0)).device
        with torch.no_grad():
            features = self.teacher(torch.zeros(1, 3, *image_size, device=device))
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        self._check_shapes(shapes, image_size)
        return shapes

    @staticmethod
    def _check_shapes(shapes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> None:
        deepest = shapes[-1]
        ok = min(deepest) >= 1 and all(
            shapes[i][0] == 2 * shapes[i + 1][0] and shapes[i][1] == 2 * shapes[i + 1][1] for i in range(3)
        )
        if not ok:
            msg = (
                f"Input size {image_size[0]}x{image_size[1]} gives teacher maps {list(shapes)}; GLCF needs each of "
                "the four layers at half the size of the previous one (strides 4, 8, 16, 32): use an input size "
                "that is a multiple of 32 (e.g. 224 or 256) and layers at successive strides."
            )
            raise ValueError(msg)

    def _decoder_kind(self, backbone: str, decoder: str) -> str:
        resnet = _resnet_decoder(backbone, self.channels) is not None
        if decoder == "resnet" and not resnet:
            msg = (
                f"decoder='resnet' needs a ResNet-family teacher whose layers anomalib's reverse-distillation decoder "
                f"mirrors (e.g. wide_resnet50_2 layer1-4); '{backbone}' gives channels {self.channels}. "
                "Use decoder='auto' or 'generic'."
            )
            raise ValueError(msg)
        if decoder == "auto":
            return "resnet" if resnet else "generic"
        return decoder

    def _make_decoder(self, backbone: str, blocks: int) -> nn.Module:
        if self.decoder_kind == "resnet":
            return _resnet_decoder(backbone, self.channels)
        return ChannelMirrorDecoder(self.channels[3], self.channels[:3], blocks_per_stage=blocks)

    def set_scoring(self, branch: str | None = None, score_reducer: str | None = None) -> None:
        """Switch the branch selection or the image-score reducer (no retraining; the statistics stay valid)."""
        if branch is not None:
            if branch not in BRANCHES:
                msg = f"branch must be one of {BRANCHES}, got {branch!r}."
                raise ValueError(msg)
            self.branch = branch
        if score_reducer is not None:
            if score_reducer not in SCORE_REDUCERS:
                msg = f"score_reducer must be one of {SCORE_REDUCERS}, got {score_reducer!r}."
                raise ValueError(msg)
            self.score_reducer = score_reducer

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Re-target the position caches to another input size (no weight depends on it)."""
        size = (int(image_size[0]), int(image_size[1]))
        if size == self.image_size:
            return
        shapes = self._probe(size)
        self.image_size, self.grid_size = size, shapes[-1]
        device = self.stats_mean.device
        bn = self.bottleneck
        bn.pos_embed = SinCosPositionEmbedding2D(bn.embed_dim, self.grid_size).to(device)
        bn.decoder_pos_embed = SinCosPositionEmbedding2D(bn.decoder_embed_dim, self.grid_size).to(device)

    # ------------------------------------------------------------------------------------------------ forward
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four teacher maps with input checks (RGB, size, finiteness)."""
        check_model_input("GLCF", images)
        features = self.teacher(images)  # with gradients and batch-norm in train mode when ``train_teacher``
        if not is_tracing():
            size = (int(images.shape[-2]), int(images.shape[-1]))
            self._check_shapes([(int(f.shape[-2]), int(f.shape[-1])) for f in features], size)
            check_features("GLCF", features[0], features[-1], what="the teacher features")
        return features

    def run(self, images: torch.Tensor) -> GLCFOutput:
        """Teacher, bottleneck and the three decoders (with gradients where trainable)."""
        features = self.extract(images)
        local_latent, global_latent = self.bottleneck(features[1:])
        return GLCFOutput(
            teacher=features[:3],
            local=self.local_decoder(local_latent),
            global_features=self.global_decoder(global_latent),
            global_estimates=self.global_estimator(local_latent),
            local_latent=local_latent,
            global_latent=global_latent,
        )

    def raw_maps(self, out: GLCFOutput, out_size: tuple[int, int]) -> torch.Tensor:
        """Un-standardised maps ``(B, 2, 3, H, W)``: branch (local, global) × scale, upsampled (and blurred)."""
        pairs = [list(zip(out.teacher, out.local, strict=True))]
        pairs.append(list(zip(out.global_features, out.global_estimates, strict=True)))
        maps = []
        for branch_pairs in pairs:
            scales = []
            for a, b in branch_pairs:
                m = (1 - F.cosine_similarity(a, b, dim=1)).unsqueeze(1)
                m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=True)
                if self.blur is not None:
                    m = self.blur(m)
                scales.append(m)
            maps.append(torch.cat(scales, dim=1))
        return torch.stack(maps, dim=1)

    def fuse(self, raw: torch.Tensor) -> torch.Tensor:
        """Standardise ``(B, 2, 3, H, W)`` maps with the fitted statistics, weight the scales, fuse the branches."""
        z = (raw - self.stats_mean[None, :, :, None, None]) / self.stats_std[None, :, :, None, None]
        weights = torch.tensor(self.scale_weights, dtype=raw.dtype, device=raw.device)
        per_branch = (z * weights[None, None, :, None, None]).sum(dim=2)  # (B, 2, H, W)
        if self.branch == "local":
            fused = per_branch[:, 0]
        elif self.branch == "global":
            fused = per_branch[:, 1]
        else:
            fused = self.branch_weights[0] * per_branch[:, 0] + self.branch_weights[1] * per_branch[:, 1]
        return fused.unsqueeze(1)

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image score ``(B,)``: max (default) or population std of the fused map."""
        return reduce_max(anomaly_map) if self.score_reducer == "max" else reduce_std(anomaly_map)

    def require_statistics(self) -> None:
        """Raise unless the map statistics have been fitted (scoring without them would be meaningless)."""
        if not bool(self.stats_fitted):
            msg = (
                "GLCF: the map statistics (mean, std per branch and scale) are not fitted, so the maps cannot be "
                "standardised. Train with anomalib's Engine.fit / `anomalib train` (they are fitted on normal images "
                "at the end of training), or call GLCF.fit_statistics(...) / GLCFModel.fit_statistics(images)."
            )
            raise RuntimeError(msg)

    def forward(self, images: torch.Tensor) -> GLCFOutput | InferenceBatch:
        """Training: :class:`GLCFOutput` for the loss. Inference: ``InferenceBatch(pred_score, anomaly_map)``."""
        if self.training:
            return self.run(images)
        if not is_tracing():
            self.require_statistics()
        out = self.run(images)
        anomaly_map = self.fuse(self.raw_maps(out, (int(images.shape[-2]), int(images.shape[-1]))))
        return InferenceBatch(pred_score=self.score(anomaly_map), anomaly_map=anomaly_map)

    # ------------------------------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def map_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image mean and population std of every (branch, scale) map, each ``(B, 2, 3)`` (eval mode)."""
        raw = self.raw_maps(self.run(images), (int(images.shape[-2]), int(images.shape[-1])))
        flat = raw.flatten(3)
        return flat.mean(dim=3), flat.std(dim=3, correction=0)

    @staticmethod
    def statistics_from_moments(means: torch.Tensor, stds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, σ)`` ``(2, 3)`` from per-image moments ``(N, 2, 3)``: the mean over images of each map's mean and
        of each map's standard deviation, as the authors' ``fuse_weight.py`` computes them (in float64)."""
        if means.dim() != 3 or means.shape[0] == 0 or means.shape != stds.shape:
            msg = (
                "GLCF: fitting the map statistics needs at least one normal image; got moments of shape "
                f"{tuple(means.shape)} and {tuple(stds.shape)}."
            )
            raise ValueError(msg)
        return means.double().mean(dim=0), stds.double().mean(dim=0)

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store ``(2, 3)`` statistics in the buffers (σ must be positive and finite)."""
        if mean.shape != (2, 3) or std.shape != (2, 3):
            msg = f"statistics must be (2, 3) tensors (branch x scale), got {tuple(mean.shape)}, {tuple(std.shape)}."
            raise ValueError(msg)
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()) or not bool((std > 0).all()):
            msg = (
                "GLCF: fitted map statistics are not finite or have zero spread "
                f"(mean={mean.tolist()}, std={std.tolist()}); check the training images and the teacher weights."
            )
            raise ValueError(msg)
        self.stats_mean.copy_(mean)
        self.stats_std.copy_(std)
        self.stats_fitted.fill_(True)

    @torch.no_grad()
    def fit_statistics(self, batches: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit ``(μ, σ)`` per (branch, scale) on pre-processed normal images and store them.

        μ = mean over images of each map's mean, σ = mean over images of each map's standard deviation
        (:meth:`statistics_from_moments`). In a Lightning run, :meth:`GLCF.fit_statistics` does this from the
        training (or normal validation) images, on every DDP rank alike.
        """
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        was_training = self.training
        self.eval()
        means, stds = [], []
        try:
            for images in batches:
                mean, std = self.map_moments(images)
                means.append(mean)
                stds.append(std)
        finally:
            self.train(was_training)
        if not means:
            msg = "GLCF: fitting the map statistics needs at least one normal image; the statistics split is empty."
            raise ValueError(msg)
        mean, std = self.statistics_from_moments(torch.cat(means), torch.cat(stds))
        mean, std = mean.to(self.stats_mean), std.to(self.stats_std)
        self.set_statistics(mean, std)
        return mean, std
