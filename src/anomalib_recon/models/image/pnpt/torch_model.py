"""PyTorch model of PNPT: a dual-stream reconstruction transformer conditioned on class-specific normality prompts.

Paper: H. Yao et al., *Prior Normality Prompt Transformer for Multi-class Industrial Image Anomaly Detection*,
IEEE TII 2024 (arXiv 2406.11507). No public code; the abstract names four modules, built here as follows (the
design is INFERRED, consistent with the same first author's DADF code, GitHub hmyao22/DADF):

* **HPE** (hierarchical patch embedding): frozen backbone maps ``f_s`` (strides 4/8/16) cut into patches of size
  ``p_s`` (4, 2, 1) onto one token grid, embedded per scale and concatenated (``D = 3·embed_dim_per_scale``), plus
  the fixed 2-D sin-cos position embedding.
* **CS-NPP** (class-specific normality prompting pool, :class:`PromptPool`): per class ``c`` a prior normality
  map ``μ_{c,s}`` (the mean of ``f_s`` over the class's normal training images, frozen) and a learnable offset
  ``Δ_c`` (``L × D``, ``N(0, 0.02)``); the prompt is ``P_c = HPE(μ_c) + pos + Δ_c``. Class keys ``k_c`` are the
  class means of the globally average-pooled deepest map. Training takes the class id from the data; inference
  infers it as ``argmax_c cos(GAP(f_3(x)), k_c)``.
* **SACE** (semantic alignment coupling encoder): DADF's dual-attention blocks (weights shared by the streams):
  self-attention on the sample tokens ``X``, "alignment" attention on the prompt ``P`` (queries and values from
  ``P``, keys from ``X``), so the prompt is re-arranged to the sample's layout while its content stays normal.
* **CSCD** (contextual semantic conditional decoder, :class:`ConditionalDecoderBlock`): on the sample stream
  self-attention, cross-attention to the aligned prompt (queries from ``X``, keys/values from the encoder's output
  prompt), MLP; the prompt stream runs through the same blocks with self-attention and MLP only.
* One final LayerNorm and one linear head per scale, shared by the streams, give the sample reconstruction
  ``R^x_s`` and the prompt reconstruction ``R^p_s``. Map: per scale ``½[(1 − cos(f_s, R^x_s)) + (1 − cos(f_s,
  R^p_s))]``, upsampled, summed over scales, Gaussian σ = 4; image score: its maximum.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.anomaly_map import check_blur_fits, make_blur, reduce_max
from anomalib_recon.components.dual_attention import DualAttentionBlock
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides
from anomalib_recon.components.guards import check_features, check_finite, check_model_input, is_finite_number
from anomalib_recon.components.initialization import init_mae_weights
from anomalib_recon.components.patch_embed import MultiScalePatchEmbed, TokenToFeatureHead, one_grid_patch_sizes
from anomalib_recon.components.position import SinCosPositionEmbedding2D
from anomalib_recon.components.tracing import is_tracing

from .anomaly_map import MAP_STREAMS, cosine_residual, residual_map

__all__ = [
    "PROMPTS",
    "Attention",
    "ConditionalDecoderBlock",
    "PNPTModel",
    "PNPTReconstruction",
    "PromptPool",
    "resolve_layers",
]

FEATURE_STRIDES = (4, 8, 16)
"""Strides of the default layers (ResNet ``layer1``-``layer3``)."""

PROMPTS = ("class", "shared", "none")
"""The prompt pool: one prompt per class (the paper), one prompt for all classes, or no prompt stream (ablations)."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given, or the last feature layer at strides 4, 8 and 16 of a timm CNN.

    ``layer1``-``layer3`` for ResNets (the paper's pyramid), ``blocks.1, blocks.2, blocks.4`` for EfficientNet-Lite.
    """
    return layers_at_strides(backbone, layers, FEATURE_STRIDES)


# ---------------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention of ``x`` on ``context`` (self-attention when ``context`` is ``None``).

    ``softmax(q kᵀ / √d) v`` per head with ``q = W_q x`` and ``k, v = W_kv context``, then ``proj``; written out
    (no fused kernel) so that ONNX/OpenVINO exports match torch to fp32 precision.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            msg = f"token width ({dim}) must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, D)`` queries on ``(B, M, D)`` context → ``(B, N, D)``."""
        context = x if context is None else context
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).flatten(2))


class ConditionalDecoderBlock(nn.Module):
    """CSCD block, pre-norm, every weight shared by the two streams.

    Sample stream ``X`` conditioned on the aligned prompt ``P̃`` (the encoder's output prompt)::

        X = X + SelfAttn(LN1 X);  X = X + CrossAttn(LN2 X, LN_c P̃);  X = X + MLP(LN3 X)

    Prompt stream ``P``: ``P = P + SelfAttn(LN1 P);  P = P + MLP(LN3 P)``. Without a prompt (``conditional=False``,
    the no-prompt ablation) the block is a plain pre-norm ViT block and has no cross-attention weights.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, conditional: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.conditional = bool(conditional)
        if self.conditional:
            self.norm2 = nn.LayerNorm(dim)
            self.norm_context = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(
        self, x: torch.Tensor, prompt: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update the sample stream (conditioned on ``context``) and the prompt stream (``None``: absent)."""
        x = x + self.attn(self.norm1(x))
        if self.conditional:
            if context is None:
                msg = "a conditional decoder block needs the aligned prompt as context."
                raise ValueError(msg)
            x = x + self.cross_attn(self.norm2(x), self.norm_context(context))
        x = x + self.mlp(self.norm3(x))
        if prompt is None:
            return x, None
        prompt = prompt + self.attn(self.norm1(prompt))
        prompt = prompt + self.mlp(self.norm3(prompt))
        return x, prompt


# ---------------------------------------------------------------------------------------------------- prompt pool
class PromptPool(nn.Module):
    """CS-NPP: per-class prior normality maps, learnable prompt offsets and class keys.

    Sized by its class names, which it keeps in its state dict as the UTF-8 bytes of their JSON list (a ``uint8``
    buffer, so the state dict holds tensors only); loading a state dict of another class count re-sizes the pool
    first (models are built before the data says how many classes there are).

    Buffers and parameters (``n`` = classes for ``shared=False``, else 1):

    * ``prior_<s>`` ``(n, C_s, H_s, W_s)``: mean feature map of scale ``s`` over the class's normal training
      images (all classes for ``shared=True``), fitted by :meth:`set_statistics` (frozen).
    * ``offsets`` ``(n, L, D)``: learnable, ``N(0, 0.02)`` (DADF's memory-token initialisation).
    * ``keys`` ``(classes, C_3)``: mean of the globally average-pooled deepest map per class (class inference).
    * ``fitted``: whether :meth:`set_statistics` ran.
    * ``names_utf8``: the class names, ``json.dumps(names)`` as bytes.
    """

    def __init__(
        self,
        channels: Sequence[int],
        feature_sizes: Sequence[tuple[int, int]],
        num_tokens: int,
        dim: int,
        shared: bool = False,
        class_names: Sequence[str] = ("default",),
    ) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.feature_sizes = [(int(h), int(w)) for h, w in feature_sizes]
        self.num_tokens = int(num_tokens)
        self.dim = int(dim)
        self.shared = bool(shared)
        self.class_names: list[str] = []
        self.set_classes(class_names, force=True)

    # ------------------------------------------------------------------------------------------------ size
    @property
    def num_classes(self) -> int:
        """Number of classes (keys)."""
        return len(self.class_names)

    @property
    def num_prompts(self) -> int:
        """Number of prompts: one per class, or one in all (``shared``)."""
        return 1 if self.shared else self.num_classes

    def set_classes(self, class_names: Sequence[str], force: bool = False) -> bool:
        """Size the pool for ``class_names``; returns whether it was (re-)initialised.

        The same names keep everything (a second fit continues from the learned offsets); other names re-draw the
        offsets and clear the priors and keys.
        """
        names = [str(n) for n in class_names]
        if not names or len(set(names)) != len(names):
            msg = f"PNPT needs at least one class and unique class names, got {names}."
            raise ValueError(msg)
        if names == self.class_names and not force:
            return False
        self._allocate(names, self._like())
        nn.init.normal_(self.offsets, std=0.02)
        return True

    def _like(self) -> dict[str, Any]:
        existing = getattr(self, "offsets", None)
        if isinstance(existing, torch.Tensor):
            return {"device": existing.device, "dtype": existing.dtype}
        return {}

    def _allocate(self, names: list[str], like: dict[str, Any]) -> None:
        self.class_names = names
        n = self.num_prompts
        self.offsets = nn.Parameter(torch.zeros(n, self.num_tokens, self.dim, **like))
        for s, (c, (h, w)) in enumerate(zip(self.channels, self.feature_sizes, strict=True)):
            self.register_buffer(f"prior_{s}", torch.zeros(n, c, h, w, **like))
        self.register_buffer("keys", torch.zeros(len(names), self.channels[-1], **like))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=like.get("device")))
        encoded = torch.tensor(list(json.dumps(names).encode("utf-8")), dtype=torch.uint8, device=like.get("device"))
        self.register_buffer("names_utf8", encoded)

    def priors(self) -> list[torch.Tensor]:
        """``μ_s`` per scale, each ``(n, C_s, H_s, W_s)``."""
        return [getattr(self, f"prior_{s}") for s in range(len(self.channels))]

    # ------------------------------------------------------------------------------------------------ statistics
    def set_statistics(self, prior_means: Sequence[torch.Tensor], key_means: torch.Tensor) -> None:
        """Set the priors (per-class mean maps, ``(classes, C_s, H_s, W_s)``) and the keys ``(classes, C_3)``.

        For a shared pool the prior is the class-count-weighted mean; pass ``class_counts`` through
        :meth:`shared_prior` first.
        """
        if key_means.shape != self.keys.shape:
            msg = f"keys of shape {tuple(key_means.shape)} for a pool of shape {tuple(self.keys.shape)}."
            raise ValueError(msg)
        for target, value in zip(self.priors(), prior_means, strict=True):
            if value.shape != target.shape:
                msg = f"prior of shape {tuple(value.shape)} for a pool prior of shape {tuple(target.shape)}."
                raise ValueError(msg)
            target.copy_(value)
        self.keys.copy_(key_means)
        self.fitted.fill_(True)

    # ------------------------------------------------------------------------------------------------ state
    @staticmethod
    def decode_names(encoded: torch.Tensor) -> list[str]:
        """Class names from their ``names_utf8`` buffer."""
        return [str(n) for n in json.loads(bytes(encoded.to("cpu", torch.uint8).tolist()).decode("utf-8"))]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Re-size the pool to the incoming tensors before loading them (class count and names from the state)."""
        self.resize_like(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.class_names = self.decode_names(self.names_utf8)

    def resize_like(self, state_dict: dict, prefix: str = "") -> None:
        """Re-size to the classes of a state dict (``prefix`` = this pool's key prefix in it); no-op if they fit."""
        keys = state_dict.get(prefix + "keys")
        offsets = state_dict.get(prefix + "offsets")
        if not isinstance(keys, torch.Tensor) or not isinstance(offsets, torch.Tensor):
            return
        encoded = state_dict.get(prefix + "names_utf8")
        names = self.decode_names(encoded) if isinstance(encoded, torch.Tensor) else None
        count = int(keys.shape[0])
        if not names or len(names) != count:
            names = [f"class_{i}" for i in range(count)]
        names = [str(n) for n in names]
        changed = names != self.class_names or tuple(offsets.shape) != tuple(self.offsets.shape)
        changed = changed or (isinstance(encoded, torch.Tensor) and encoded.shape != self.names_utf8.shape)
        fits = tuple(offsets.shape[1:]) == tuple(self.offsets.shape[1:])  # same grid and width: only the count moves
        if changed and fits and offsets.shape[0] == (1 if self.shared else count):
            self._allocate(names, self._like())

    # ------------------------------------------------------------------------------------------------ prompts
    def select(self, prompts: torch.Tensor, class_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Each image's prompt ``(B, L, D)`` from all prompts ``(n, L, D)`` (shared pool or ``None``: the first)."""
        if self.shared or self.num_prompts == 1 or class_ids is None:
            return prompts[:1].expand(batch, -1, -1)
        return prompts.index_select(0, class_ids)


# ---------------------------------------------------------------------------------------------------------- outputs
class PNPTReconstruction(NamedTuple):
    """Per-scale maps ``(B, C_s, H_s, W_s)``: the frozen features and both streams' reconstructions."""

    features: list[torch.Tensor]
    """``f_s``."""
    sample: list[torch.Tensor]
    """Sample-stream reconstruction ``R^x_s``."""
    prompt: list[torch.Tensor] | None
    """Prompt-stream reconstruction ``R^p_s`` (``None`` without prompts)."""


# ---------------------------------------------------------------------------------------------------------- model
class PNPTModel(nn.Module):
    """PNPT: frozen CNN → HPE → prompt pool → SACE encoder → CSCD decoder → per-scale heads → cosine residual map.

    Args:
        backbone: timm CNN (``wide_resnet50_2.tv_in1k``, layer1-3, the paper's pyramid as in DADF).
        layers: Three backbone layers (names or ``features_only`` indices); ``None`` = strides 4, 8, 16.
        weights: ``"imagenet"``, a local weights file, or ``None`` (random init).
        image_size: ``(H, W)`` the model is built for (the prompts and priors have one fixed grid).
        patch_sizes: Patch size per scale; ``None`` = one token per pixel of the deepest map (4, 2, 1).
        embed_dim_per_scale: Width of each scale's embedding (256; tokens are ``3·256 = 768`` wide).
        depth: SACE (encoder) dual-attention blocks (6).
        decoder_depth: CSCD (decoder) blocks (4).
        num_heads: Attention heads of both (8).
        mlp_ratio: MLP ratio of both (4).
        prompts: ``"class"`` (one prompt per class, the paper), ``"shared"`` (one prompt for all classes) or
            ``"none"`` (no prompt stream: a plain reconstruction transformer; the ablation).
        prompt_prior: Prompts start from the class's prior normality map (``HPE(μ_c) + pos + Δ_c``; default) or
            are learnable tokens only (``pos + Δ_c``, DADF's memory tokens).
        map_streams: What the map reads: ``"both"`` (½ of each stream), ``"sample"`` or ``"prompt"``.
        scale_weights: Weight of each scale's residual in the map's sum (strides 4, 8, 16; (1, 1, 1) = the plain sum;
            0 leaves a scale out of the map, not out of the loss).
        blur_sigma: Gaussian σ of the map (4); ``None`` = no blur.
        class_names: Initial classes (re-sized from the data at fit, or from a state dict at load).
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
        embed_dim_per_scale: int = 256,
        depth: int = 6,
        decoder_depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        prompts: str = "class",
        prompt_prior: bool = True,
        map_streams: str = "both",
        scale_weights: Sequence[float] = (1.0, 1.0, 1.0),
        blur_sigma: float | None = 4.0,
        class_names: Sequence[str] = ("default",),
    ) -> None:
        super().__init__()
        _check_args(embed_dim_per_scale, depth, decoder_depth, num_heads, mlp_ratio, prompts, map_streams, blur_sigma)
        self.scale_weights = check_scale_weights(scale_weights)
        layers = resolve_layers(backbone, layers)
        if len(layers) != 3:
            msg = f"PNPT uses three backbone layers (strides 4, 8, 16), got layers={layers}."
            raise ValueError(msg)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.prompts = prompts
        self.prompt_prior = bool(prompt_prior)
        self.map_streams = map_streams
        self.feature_extractor = FeatureExtractor(backbone, layers=layers, weights=weights)
        self.channels = [int(c) for c in self.feature_extractor.out_dims]
        self.feature_sizes = self._probe_sizes(self.image_size)
        self.patch_sizes, self.grid_size = one_grid_patch_sizes(self.feature_sizes, self.image_size, patch_sizes)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = MultiScalePatchEmbed(self.channels, self.patch_sizes, embed_dim_per_scale, fuse="concat")
        dim = self.patch_embed.out_dim
        self.embed_dim = dim
        self.pos_embed = SinCosPositionEmbedding2D(dim, self.grid_size)
        has_prompts = prompts != "none"
        self.prompt_pool = (
            PromptPool(
                self.channels,
                self.feature_sizes,
                self.num_tokens,
                dim,
                shared=prompts == "shared",
                class_names=class_names,
            )
            if has_prompts
            else None
        )
        self._class_names = [str(n) for n in class_names]
        self.encoder = nn.ModuleList(DualAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.decoder = nn.ModuleList(
            ConditionalDecoderBlock(dim, num_heads, mlp_ratio, conditional=has_prompts) for _ in range(decoder_depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(
            TokenToFeatureHead(dim, c, p) for c, p in zip(self.channels, self.patch_sizes, strict=True)
        )
        init_mae_weights(self.encoder, self.decoder, self.norm)
        check_blur_fits(blur_sigma, None, self.image_size, "PNPT")
        self.blur = make_blur(blur_sigma) if blur_sigma else None

    # ------------------------------------------------------------------------------------------------ construction
    def _probe_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        with torch.no_grad():
            maps = self.feature_extractor(torch.zeros(1, 3, *image_size))
        return [(int(f.shape[-2]), int(f.shape[-1])) for f in maps]

    # ------------------------------------------------------------------------------------------------ classes
    @property
    def class_names(self) -> list[str]:
        """The classes the model knows (the pool's; the last ones set without a pool)."""
        return list(self.prompt_pool.class_names) if self.prompt_pool is not None else list(self._class_names)

    def set_classes(self, class_names: Sequence[str]) -> bool:
        """Size the prompt pool for ``class_names``; returns whether it was (re-)initialised."""
        self._class_names = [str(n) for n in class_names]
        return self.prompt_pool.set_classes(class_names) if self.prompt_pool is not None else False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the frozen backbone: HPE, prompt offsets, encoder, decoder, norm and heads."""
        frozen = {id(p) for p in self.feature_extractor.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    # ------------------------------------------------------------------------------------------------ pieces
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone maps ``f_s`` with size and finiteness checks (skipped while tracing)."""
        check_model_input("PNPT", images, self.image_size, "its prompts and priors have one fixed token grid")
        check_finite("PNPT", "the input batch", images, hint="Check the images and the pre-processing.")
        features = self.feature_extractor(images)
        check_features("PNPT", *features)
        return features

    @staticmethod
    def class_query(features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``GAP(f_3)``: the globally average-pooled deepest map ``(B, C_3)``, compared with the class keys."""
        return features[-1].mean(dim=(-2, -1))

    def class_scores(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``cos(GAP(f_3(x)), k_c)`` for every class ``(B, classes)``."""
        if self.prompt_pool is None:
            msg = 'prompts="none" builds no prompt pool and no class keys.'
            raise RuntimeError(msg)
        query = F.normalize(self.class_query(features), dim=1)
        keys = F.normalize(self.prompt_pool.keys, dim=1)
        return query @ keys.transpose(0, 1)

    def infer_class(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The nearest class key of each image ``(B,)`` (``argmax_c cos(GAP(f_3), k_c)``)."""
        return self.class_scores(features).argmax(dim=1)

    def prompt_tokens(self, class_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Each image's prompt ``P_c = HPE(μ_c) + pos + Δ_c`` (``pos + Δ_c`` without the prior) ``(B, L, D)``."""
        pool = self.prompt_pool
        assert pool is not None
        if self.prompt_prior:
            prompts = self.pos_embed(self.patch_embed(pool.priors())) + pool.offsets
        else:
            prompts = self.pos_embed(pool.offsets)
        return pool.select(prompts, class_ids, batch)

    def _class_ids(self, features: Sequence[torch.Tensor], class_ids: torch.Tensor | None) -> torch.Tensor | None:
        pool = self.prompt_pool
        if pool is None or pool.shared or pool.num_prompts == 1:
            return None
        if class_ids is None:
            return self.infer_class(features)
        class_ids = torch.as_tensor(class_ids, device=features[0].device).long().reshape(-1)
        if not is_tracing():
            if class_ids.numel() != features[0].shape[0]:
                msg = f"class_ids holds {class_ids.numel()} ids for {features[0].shape[0]} images."
                raise ValueError(msg)
            if bool(((class_ids < 0) | (class_ids >= pool.num_classes)).any()):
                msg = f"class_ids must lie in [0, {pool.num_classes}) (classes {pool.class_names}), got {class_ids}."
                raise ValueError(msg)
        return class_ids

    def reconstruct(
        self, features: Sequence[torch.Tensor], class_ids: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Both streams' reconstructions as maps ``(B, C_s, H_s, W_s)``; ``class_ids=None`` infers the class."""
        x = self.pos_embed(self.patch_embed(list(features)))
        prompt = None
        if self.prompt_pool is not None:
            prompt = self.prompt_tokens(self._class_ids(features, class_ids), x.shape[0])
        for block in self.encoder:  # SACE
            x, prompt = block(x, prompt)
        context = prompt
        for block in self.decoder:  # CSCD
            x, prompt = block(x, prompt, context)
        sample = self._to_maps(self.norm(x))
        return sample, (None if prompt is None else self._to_maps(self.norm(prompt)))

    def _to_maps(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [head(tokens, self.grid_size) for head in self.heads]

    def reconstruction_outputs(self, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> PNPTReconstruction:
        """Training forward: the frozen features and both streams' reconstructions."""
        features = self.extract(images)
        sample, prompt = self.reconstruct(features, class_ids)
        return PNPTReconstruction(list(features), sample, prompt)

    def stream_residuals(self, out: PNPTReconstruction) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-scale cosine residuals ``1 − cos(f_s, R_s)`` ``(B, 1, H_s, W_s)`` of the sample and prompt streams."""
        sample = [cosine_residual(f, r) for f, r in zip(out.features, out.sample, strict=True)]
        if out.prompt is None:
            return sample, None
        return sample, [cosine_residual(f, r) for f, r in zip(out.features, out.prompt, strict=True)]

    def anomaly_map(self, out: PNPTReconstruction) -> torch.Tensor:
        """``Σ_s w_s·upsample(½[r^x_s + r^p_s])``, blurred ``(B, 1, H, W)`` (``map_streams``, ``scale_weights``)."""
        sample, prompt = self.stream_residuals(out)
        return residual_map(sample, prompt, self.image_size, self.map_streams, self.blur, self.scale_weights)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> InferenceBatch:
        """Inference: backbone → class (given, or inferred) → both streams → map and max score."""
        out = self.reconstruction_outputs(images, class_ids)
        anomaly_map = self.anomaly_map(out)
        return InferenceBatch(pred_score=reduce_max(anomaly_map), anomaly_map=anomaly_map)


def check_scale_weights(scale_weights: Sequence[float]) -> list[float]:
    """Three finite weights >= 0, at least one > 0 (the map's weight of each scale), as floats."""
    values = list(scale_weights) if isinstance(scale_weights, Sequence) and not isinstance(scale_weights, str) else []
    if len(values) != 3 or not all(is_finite_number(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
        msg = (
            f"PNPT: scale_weights must be three finite weights >= 0 (strides 4, 8, 16), at least one > 0; got "
            f"{scale_weights!r}. (1, 1, 1) is the plain sum; (0, 0, 1) maps the stride-16 residuals alone."
        )
        raise ValueError(msg)
    return [float(w) for w in values]


def _check_args(
    embed_dim_per_scale: int,
    depth: int,
    decoder_depth: int,
    num_heads: int,
    mlp_ratio: float,
    prompts: str,
    map_streams: str,
    blur_sigma: float | None,
) -> None:
    for name, value, low in (
        ("embed_dim_per_scale", embed_dim_per_scale, 1),
        ("depth", depth, 1),
        ("decoder_depth", decoder_depth, 1),
        ("num_heads", num_heads, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            msg = f"PNPT: {name} must be an int >= {low}, got {value!r}."
            raise ValueError(msg)
    dim = 3 * embed_dim_per_scale
    if dim % 4 or dim % num_heads:
        msg = (
            f"PNPT: the token width 3·embed_dim_per_scale = {dim} must be divisible by 4 (2-D sin-cos position "
            f"embedding) and by num_heads ({num_heads}); got embed_dim_per_scale={embed_dim_per_scale}."
        )
        raise ValueError(msg)
    if not isinstance(mlp_ratio, int | float) or not mlp_ratio > 0:
        msg = f"PNPT: mlp_ratio must be > 0, got {mlp_ratio!r}."
        raise ValueError(msg)
    if prompts not in PROMPTS:
        msg = f"PNPT: prompts must be one of {PROMPTS}, got {prompts!r}."
        raise ValueError(msg)
    if map_streams not in MAP_STREAMS:
        msg = f"PNPT: map_streams must be one of {MAP_STREAMS}, got {map_streams!r}."
        raise ValueError(msg)
    if prompts == "none" and map_streams == "prompt":
        msg = 'PNPT: map_streams="prompt" needs a prompt stream; prompts="none" has none.'
        raise ValueError(msg)
    if blur_sigma is not None and (not isinstance(blur_sigma, int | float) or not blur_sigma > 0):
        msg = f"PNPT: blur_sigma must be > 0 or None, got {blur_sigma!r}."
        raise ValueError(msg)
