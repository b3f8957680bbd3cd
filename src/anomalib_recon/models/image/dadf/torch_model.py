"""PyTorch model of DADF: dual-attention reconstruction transformer + discriminative normalizing flows.

Stage 1 (reconstruction). Frozen backbone maps ``f_s`` (three scales, strides 4/8/16) are cut into patches of size
``p_s`` (4, 2, 1) so that every scale lands on one token grid; the three embeddings are concatenated to tokens
``E`` of width ``D = 3·embed_dim_per_scale`` and the fixed 2-D sin-cos position embedding is added. A stack of
:class:`DualAttentionBlock` s carries two streams with **shared weights**: the patch tokens ``X`` (self-attention)
and learnable memory tokens ``M`` ("memorial attention": queries and values from the memory, keys from the
patch tokens). One final LayerNorm and one linear head per scale (shared by the two streams) give the
self-reconstruction ``X̂_s`` and the memory-reconstruction ``M̂_s`` of every ``f_s``.

Stage 2 (discriminative flow). Per scale, ``Z_s = LayerNorm([f_s, X̂_s, M̂_s])`` goes through a FastFlow-style flow
of anomalib's ``AllInOneBlock`` s (FrEIA ``SequenceINN``); the map is ``−exp(1 − ½·mean_c z_s²)`` upsampled and
averaged over the scales, the image score its maximum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.flow import AllInOneBlock
from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator
from FrEIA.framework import SequenceINN
from torch import nn

from anomalib_recon.components.anomaly_map import reduce_max
from anomalib_recon.components.dual_attention import DualAttentionBlock
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.guards import check_finite, check_model_input
from anomalib_recon.components.initialization import init_mae_weights
from anomalib_recon.components.patch_embed import (
    MultiScalePatchEmbed,
    TokenToFeatureHead,
    one_grid_patch_sizes,
    patchify,
)
from anomalib_recon.components.position import SinCosPositionEmbedding2D

__all__ = [
    "FLOW_INPUTS",
    "DADFModel",
    "DADFReconstruction",
    "PermutationBlock",
    "create_flow",
    "depthwise_subnet",
    "permutation_matrices_to_indices",
    "resolve_layers",
]

FEATURE_STRIDES = (4, 8, 16)
"""Strides of the default layers (ResNet ``layer1``-``layer3``)."""

FLOW_INPUTS = ("reconstruction", "features")
"""What the flows see: ``[f, X̂, M̂]`` (the paper) or the raw backbone features ``f`` only (ablation)."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given, or the last feature layer at strides 4, 8 and 16 of a timm CNN.

    ``layer1``-``layer3`` for ResNets (the reference), ``blocks.1, blocks.2, blocks.4`` for EfficientNet-Lite.
    """
    return layers_at_strides(backbone, layers, FEATURE_STRIDES)


# ---------------------------------------------------------------------------------------------------------- flows
def depthwise_subnet(kernel_size: int) -> Callable[[int, int], nn.Module]:
    """Coupling subnet of the reference: depthwise ``k×k`` conv → LeakyReLU(0.1) → ``1×1`` conv."""

    def constructor(in_channels: int, out_channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding="same", groups=in_channels),
            nn.LeakyReLU(0.1),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
        )

    return constructor


class PermutationBlock(AllInOneBlock):
    """anomalib's ``AllInOneBlock`` (hard permutation) with its fixed channel permutation kept as indices in buffers.

    ``AllInOneBlock`` draws one random channel permutation at construction and keeps it as two one-hot ``C × C``
    matrices ``w_perm`` and ``w_perm_inv``, in ``nn.Parameter`` s with ``requires_grad=False`` applied by a 1×1
    convolution: they are listed among the model's parameters (and so handed to the optimiser) and fill
    checkpoints with ``2·C²`` floats per block (198 M for DADF on WideResNet-50 at 256 px). Here the same draw is
    kept as two ``int64`` index buffers ``perm`` and ``perm_inv`` (``C`` numbers each) and applied by indexing, which
    gives the same outputs (each output channel is one input channel, exactly). Checkpoints written with the
    matrices load: :meth:`_load_from_state_dict` turns them into indices.
    """

    def __init__(self, dims_in: Sequence[tuple[int, ...]], dims_c: Sequence[tuple[int, ...]] | None = None, **kwargs):
        if kwargs.get("permute_soft") or kwargs.get("learned_householder_permutation"):
            msg = "PermutationBlock keeps a hard permutation only (permute_soft=False, no householder reflections)."
            raise ValueError(msg)
        super().__init__(list(dims_in), None if dims_c is None else list(dims_c), **kwargs)
        perm = _permutation_indices(self.w_perm.detach(), "w_perm")
        del self.w_perm, self.w_perm_inv
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def _permute(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Global affine (``ActNorm``) and the channel permutation, as ``AllInOneBlock._permute``."""
        if self.GIN:
            scale, perm_log_jac = 1.0, 0.0
        else:
            scale = self.global_scale_activation(self.global_scale)
            perm_log_jac = torch.sum(torch.log(scale))
        if rev:
            return (x[:, self.perm_inv] - self.global_offset) / scale, perm_log_jac
        return (x * scale + self.global_offset)[:, self.perm], perm_log_jac

    def _pre_permute(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        """The inverse permutation before the coupling (``reverse_permutation=True`` only)."""
        return x[:, self.perm] if rev else x[:, self.perm_inv]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Accept the old layout: ``w_perm``/``w_perm_inv`` matrices become the ``perm``/``perm_inv`` indices."""
        permutation_matrices_to_indices(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def permutation_matrices_to_indices(state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> None:
    """Rewrite, in place, the ``<block>.w_perm`` / ``<block>.w_perm_inv`` matrices of checkpoints written before the
    permutations became indices into ``<block>.perm`` / ``<block>.perm_inv`` (only keys under ``prefix``).

    Raises:
        ValueError: A matrix that is not a one-hot permutation, or an inverse that does not match it.
    """
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("w_perm")]:
        base = key[: -len("w_perm")]
        perm = _permutation_indices(state_dict.pop(key), key)
        inverse = state_dict.pop(base + "w_perm_inv", None)
        if inverse is not None and not torch.equal(_permutation_indices(inverse, base + "w_perm_inv"), perm.argsort()):
            msg = f"{base}w_perm_inv is not the inverse of {key}: the checkpoint is corrupt."
            raise ValueError(msg)
        state_dict.setdefault(base + "perm", perm)
        state_dict.setdefault(base + "perm_inv", torch.argsort(perm))


def _permutation_indices(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """Indices ``p`` of a one-hot ``(C, C, 1, ...)`` permutation matrix ``W`` (``W[i, p[i]] = 1``), checked."""
    flat = matrix.detach().reshape(matrix.shape[0], -1)
    perm = flat.argmax(dim=1)
    expected = torch.zeros_like(flat)
    expected[torch.arange(flat.shape[0]), perm] = 1
    if flat.shape[0] != flat.shape[1] or not torch.equal(flat, expected) or perm.unique().numel() != perm.numel():
        msg = f"{name} of shape {tuple(matrix.shape)} is not a permutation matrix: the checkpoint is corrupt."
        raise ValueError(msg)
    return perm.to(torch.long)


def create_flow(input_dims: Sequence[int], flow_steps: int = 8, clamp: float = 2.0) -> SequenceINN:
    """``flow_steps`` :class:`PermutationBlock` s (hard permutation, ``affine_clamping=clamp``), kernels 3, 1, 3, ...

    Built as anomalib's FastFlow builds its flows, with DADF's depthwise subnets; the fixed permutations are index
    buffers instead of parameters (:class:`PermutationBlock`).
    """
    flow = SequenceINN(*[int(d) for d in input_dims])
    for step in range(flow_steps):
        flow.append(
            PermutationBlock,
            subnet_constructor=depthwise_subnet(1 if step % 2 else 3),
            affine_clamping=clamp,
            permute_soft=False,
        )
    return flow


# ---------------------------------------------------------------------------------------------------------- outputs
class DADFReconstruction(NamedTuple):
    """What the reconstruction loss needs (per scale, patchified ``(B, L, p_s²·C_s)``)."""

    self_tokens: list[torch.Tensor]
    """Self-reconstruction ``X̂_s``."""
    memory_tokens: list[torch.Tensor] | None
    """Memory-reconstruction ``M̂_s`` (``None`` without the memory stream)."""
    targets: list[torch.Tensor]
    """Patchified frozen features ``f_s``."""


# ---------------------------------------------------------------------------------------------------------- model
class DADFModel(nn.Module):
    """DADF: frozen CNN → dual-attention reconstruction ViT → one normalizing flow per scale → likelihood map.

    Args:
        backbone: timm CNN (``wide_resnet50_2.tv_in1k``: see the README on the ambiguous default).
        layers: Three backbone layers (names or ``features_only`` indices); ``None`` = strides 4, 8, 16.
        weights: ``"imagenet"``, a local weights file, or ``None`` (random init).
        image_size: ``(H, W)`` the model is built for: the memory tokens (one per grid position) and the flows'
            LayerNorms over ``(C, H_s, W_s)`` have fixed sizes, as in the reference.
        patch_sizes: Patch size per scale; ``None`` = one token per pixel of the deepest map (4, 2, 1).
        embed_dim_per_scale: Width of each scale's embedding (480; tokens are ``3·480 = 1440`` wide).
        depth: Dual-attention blocks (8).
        num_heads: Attention heads (8).
        mlp_ratio: MLP ratio of the blocks (4).
        flow_steps: ``AllInOneBlock`` s per flow (8).
        flow_clamp: Affine clamping of the couplings (2.0).
        use_memory: Dual attention (True, the paper); ``False`` = self-reconstruction only, flows on ``[f, X̂]``.
        flow_input: ``"reconstruction"`` (flows on ``[f, X̂, M̂]``) or ``"features"`` (flows on ``f`` only: no
            transformer is built, a FastFlow with DADF's subnets; the ablation).
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: tuple[int, int] = (256, 256),
        patch_sizes: Sequence[int] | None = None,
        embed_dim_per_scale: int = 480,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        flow_steps: int = 8,
        flow_clamp: float = 2.0,
        use_memory: bool = True,
        flow_input: str = "reconstruction",
    ) -> None:
        super().__init__()
        self._check_args(embed_dim_per_scale, depth, num_heads, mlp_ratio, flow_steps, flow_clamp, flow_input)
        layers = resolve_layers(backbone, layers)
        if len(layers) != 3:
            msg = f"DADF uses three backbone layers (strides 4, 8, 16), got layers={layers}."
            raise ValueError(msg)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.use_memory = bool(use_memory)
        self.flow_input = flow_input
        self.feature_extractor = FeatureExtractor(backbone, layers=layers, weights=weights)
        self.channels = [int(c) for c in self.feature_extractor.out_dims]
        self.feature_sizes = self._probe_sizes(self.image_size)
        self.patch_sizes, self.grid_size = one_grid_patch_sizes(self.feature_sizes, self.image_size, patch_sizes)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]

        self.has_reconstruction = flow_input == "reconstruction"
        if self.has_reconstruction:
            self.patch_embed = MultiScalePatchEmbed(self.channels, self.patch_sizes, embed_dim_per_scale, fuse="concat")
            dim = self.patch_embed.out_dim
            self.embed_dim = dim
            self.pos_embed = SinCosPositionEmbedding2D(dim, self.grid_size)
            self.memory = nn.Parameter(torch.zeros(1, self.num_tokens, dim)) if self.use_memory else None
            self.blocks = nn.ModuleList(DualAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.heads = nn.ModuleList(
                TokenToFeatureHead(dim, c, p) for c, p in zip(self.channels, self.patch_sizes, strict=True)
            )
            self._init_transformer()
            copies = 3 if self.use_memory else 2
        else:
            self.embed_dim = 0
            copies = 1
        self.flow_channels = [copies * c for c in self.channels]
        self.flow_norms = nn.ModuleList(
            nn.LayerNorm([c, h, w], elementwise_affine=True)
            for c, (h, w) in zip(self.flow_channels, self.feature_sizes, strict=True)
        )
        self.flows = nn.ModuleList(
            create_flow((c, h, w), flow_steps, flow_clamp)
            for c, (h, w) in zip(self.flow_channels, self.feature_sizes, strict=True)
        )
        self.anomaly_map_generator = AnomalyMapGenerator(input_size=self.image_size)

    # ------------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _check_args(
        embed_dim_per_scale: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        flow_steps: int,
        flow_clamp: float,
        flow_input: str,
    ) -> None:
        for name, value in (
            ("embed_dim_per_scale", embed_dim_per_scale),
            ("depth", depth),
            ("num_heads", num_heads),
            ("flow_steps", flow_steps),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be a positive int, got {value!r}."
                raise ValueError(msg)
        dim = 3 * embed_dim_per_scale
        if dim % 4:
            msg = (
                f"The token width 3·embed_dim_per_scale = {dim} must be divisible by 4 (2-D sin-cos position "
                f"embedding); choose embed_dim_per_scale divisible by 4, got {embed_dim_per_scale}."
            )
            raise ValueError(msg)
        if dim % num_heads:
            msg = f"The token width 3·embed_dim_per_scale = {dim} must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        if mlp_ratio <= 0 or flow_clamp <= 0:
            msg = f"need mlp_ratio > 0 and flow_clamp > 0, got {mlp_ratio} and {flow_clamp}."
            raise ValueError(msg)
        if flow_input not in FLOW_INPUTS:
            msg = f"flow_input must be one of {FLOW_INPUTS}, got {flow_input!r}."
            raise ValueError(msg)

    def _probe_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        with torch.no_grad():
            maps = self.feature_extractor(torch.zeros(1, 3, *image_size))
        return [(int(f.shape[-2]), int(f.shape[-1])) for f in maps]

    def _init_transformer(self) -> None:
        """Reference init: xavier-uniform Linear (zero bias), LayerNorm 1/0, memory tokens N(0, 0.02).

        The patch-embedding convs are initialised like linear layers by ``PatchEmbed`` and the heads by
        ``TokenToFeatureHead``.
        """
        init_mae_weights(self.blocks, self.norm)
        if self.memory is not None:
            nn.init.normal_(self.memory, std=0.02)

    # ------------------------------------------------------------------------------------------------ parameter groups
    def reconstruction_modules(self) -> list[nn.Module]:
        """Stage-1 modules (the transformer); empty for ``flow_input="features"``."""
        if not self.has_reconstruction:
            return []
        return [self.patch_embed, self.blocks, self.norm, self.heads]

    def reconstruction_parameters(self) -> list[nn.Parameter]:
        """Stage-1 parameters: patch embeddings, memory tokens, blocks, final norm and heads."""
        params = [p for module in self.reconstruction_modules() for p in module.parameters()]
        if self.has_reconstruction and self.memory is not None:
            params.insert(0, self.memory)
        return params

    def flow_parameters(self) -> list[nn.Parameter]:
        """Stage-2 parameters: the flows' LayerNorms and the flows."""
        return [*self.flow_norms.parameters(), *self.flows.parameters()]

    def freeze_reconstruction(self, frozen: bool = True) -> None:
        """Stage 2: transformer in eval with ``requires_grad=False`` (``frozen=False`` undoes it)."""
        for module in self.reconstruction_modules():
            module.train(not frozen and self.training)
        for p in self.reconstruction_parameters():
            p.requires_grad_(not frozen)

    # ------------------------------------------------------------------------------------------------ pieces
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone maps ``f_s`` with size and finiteness checks (skipped while tracing)."""
        check_model_input("DADF", images, self.image_size, "its memory tokens and flow LayerNorms have fixed sizes")
        check_finite("DADF", "the input batch", images, hint="Check the images and the pre-processing.")
        return self.feature_extractor(images)

    def reconstruct(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Dual-attention transformer: per-scale token predictions ``(X̂_s, M̂_s)``, each ``(B, L, p_s²·C_s)``."""
        if not self.has_reconstruction:
            msg = 'flow_input="features" builds no reconstruction transformer.'
            raise RuntimeError(msg)
        x = self.pos_embed(self.patch_embed(list(features)))
        memory = None
        if self.memory is not None:
            memory = self.pos_embed(self.memory.expand(x.shape[0], -1, -1))
        for block in self.blocks:
            x, memory = block(x, memory)
        x = self.norm(x)
        self_tokens = [head.project(x) for head in self.heads]
        if memory is None:
            return self_tokens, None
        memory = self.norm(memory)
        return self_tokens, [head.project(memory) for head in self.heads]

    def reconstruction_outputs(self, images: torch.Tensor) -> DADFReconstruction:
        """Stage-1 forward: token predictions of both streams and the patchified targets."""
        features = self.extract(images)
        self_tokens, memory_tokens = self.reconstruct(features)
        targets = [patchify(f, p) for f, p in zip(features, self.patch_sizes, strict=True)]
        return DADFReconstruction(self_tokens, memory_tokens, targets)

    def reconstruction_maps(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``X̂_s`` and ``M̂_s`` as maps ``(B, C_s, H_s, W_s)``."""
        self_tokens, memory_tokens = self.reconstruct(features)
        x_maps = [head.to_map(t, self.grid_size) for head, t in zip(self.heads, self_tokens, strict=True)]
        if memory_tokens is None:
            return x_maps, None
        return x_maps, [head.to_map(t, self.grid_size) for head, t in zip(self.heads, memory_tokens, strict=True)]

    def flow_inputs(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``LayerNorm(concat[f_s, X̂_s, M̂_s])`` per scale (``[f_s, X̂_s]`` without memory; ``f_s`` for features).

        The transformer runs without gradients: the flows never train it (stage 2 freezes it).
        """
        if not self.has_reconstruction:
            stacked = list(features)
        else:
            with torch.no_grad():
                x_maps, m_maps = self.reconstruction_maps(features)
            parts = [x_maps] if m_maps is None else [x_maps, m_maps]
            stacked = [torch.cat([f, *(p[i] for p in parts)], dim=1) for i, f in enumerate(features)]
        return [norm(z) for norm, z in zip(self.flow_norms, stacked, strict=True)]

    def flow_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stage-2 forward: per-scale latents ``z_s`` and ``log|det J_s|``."""
        hidden, log_jacobians = [], []
        for flow, z in zip(self.flows, self.flow_inputs(self.extract(images)), strict=True):
            out, log_jac = flow(z)
            hidden.append(out)
            log_jacobians.append(log_jac)
        return hidden, log_jacobians

    def anomaly_map(self, hidden_variables: Sequence[torch.Tensor]) -> torch.Tensor:
        """``mean_s upsample(−exp(1 − ½·mean_c z_s²))`` ``(B, 1, H, W)``: FastFlow's map times ``e``."""
        return math.e * self.anomaly_map_generator(list(hidden_variables))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Inference: backbone → transformer (both streams) → flows → ``InferenceBatch(pred_score, anomaly_map)``.

        Training uses :meth:`reconstruction_outputs` (stage 1) and :meth:`flow_outputs` (stage 2) instead.
        """
        hidden, _ = self.flow_outputs(images)
        anomaly_map = self.anomaly_map(hidden)
        pred_score = reduce_max(anomaly_map)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
