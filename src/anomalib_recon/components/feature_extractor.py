"""Frozen multi-layer feature extractor over timm, shared by every model.

anomalib's :class:`~anomalib.models.components.TimmFeatureExtractor` takes only ``pre_trained: bool``; our
models also need local weight files, the offline EfficientNet-Lite fallback (:mod:`.weights`), NHWC
backbones such as Swin, and a ViT's self-attention maps (AGPNet's prior attention). ``nn.Module``
backbones are delegated to anomalib's extractor (torchvision FX node names).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from torch import nn

from .weights import features_key_map, load_weights_strict, resolve_pretrained, weights_load_errors


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "forward_intermediates")


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``softmax(q kᵀ · scale)`` ``(B, heads, N, N)`` of a timm ``Attention`` on its input ``x``.

    timm computes attention with fused SDPA, which never materialises the weights, so they are recomputed from
    the module's own ``qkv`` projection (and its ``q_norm``/``k_norm``).
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class FeatureExtractor(nn.Module):
    """Frozen backbone returning a list of intermediate feature maps ``(B, C, h, w)``.

    Args:
        backbone: timm model name (``"resnet18.tv_in1k"``, ``"tf_efficientnet_lite0"``,
            ``"vit_small_patch16_224.dino"``, ...) or an ``nn.Module`` (then ``layers`` are FX node names).
        layers: CNNs: ``features_only`` indices (``[1, 2]``) or module names (``["layer1", "layer2"]``).
            ViTs: block indices (``[3, 6]``) or names (``["blocks.3"]``); patch tokens come back as maps.
        weights: ``"imagenet"`` (timm's pretrained weights, offline-aware, see :mod:`.weights`), a path to a
            local state dict, or ``None`` for random initialisation.
        return_attention: ViTs only: also record each selected block's self-attention
            ``softmax(q kᵀ / √d)`` of shape ``(B, heads, N, N)`` (prefix tokens included) in
            :attr:`attention_maps` on every forward.
        vit_norm: ViTs only: apply the backbone's final norm to the returned block outputs.
        img_size: ViTs/Swin only: the input size the model is built for (position embeddings are also
            resampled dynamically for ViTs).
        trainable: ``False`` (default): frozen, always in eval mode, no gradients. ``True``: the backbone is
            trained with the model (GLCF's ``train_teacher``): parameters require gradients, ``train()`` follows
            the mode (batch-norm statistics update in training) and ``forward`` records gradients in training.

    Attributes:
        out_dims: channels of each returned map.
        reductions: stride of each returned map relative to the input.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        layers: Sequence[int | str],
        weights: str | os.PathLike | None = "imagenet",
        return_attention: bool = False,
        vit_norm: bool = False,
        img_size: int | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if not layers:
            msg = "`layers` must name at least one layer, e.g. layers=[1, 2] or ['layer1', 'layer2']."
            raise ValueError(msg)
        self.layers = list(layers)
        self.trainable = bool(trainable)
        self.return_attention = return_attention
        self.vit_norm = vit_norm
        self.attention_maps: list[torch.Tensor] = []
        self._channels_last = False
        self._delegate = None
        self.is_vit = False

        if isinstance(backbone, nn.Module):
            from anomalib.models.components import TimmFeatureExtractor

            if not all(isinstance(layer, str) for layer in self.layers):
                msg = "For an nn.Module backbone, `layers` must be node names such as 'layer1'."
                raise TypeError(msg)
            self._delegate = TimmFeatureExtractor(backbone, layers=self.layers, pre_trained=False)
            self.model = self._delegate.feature_extractor
            self.out_dims = list(self._delegate.out_dims)
            self.reductions = []
            self.backbone_name = type(backbone).__name__
        elif isinstance(backbone, str):
            self.backbone_name = backbone
            self._build_timm(backbone, weights, img_size)
        else:
            msg = f"`backbone` must be a timm model name or an nn.Module, got {type(backbone).__name__}."
            raise TypeError(msg)

        for param in self.parameters():
            param.requires_grad_(self.trainable)
        super().train(False)

    # ------------------------------------------------------------------ construction
    def _build_timm(self, name: str, weights: str | os.PathLike | None, img_size: int | None) -> None:
        # Block count / feature names from the meta-device probe (an unknown name is its ValueError); the one real
        # build below then carries the weights. ``img_size`` changes neither answer, so the probe does not take it.
        info = probe_backbone(name)
        if info.is_vit:
            self.is_vit = True
            self.block_idx = [self._block_index(layer, info.depth) for layer in self.layers]
            kwargs = {"dynamic_img_size": True, **({"img_size": img_size} if img_size else {})}
            pretrained = resolve_pretrained(name, weights)
            with weights_load_errors(pretrained.get("pretrained_cfg_overlay", {}).get("file"), name):
                self.model = timm.create_model(name, **pretrained, **kwargs)
            self.patch_size = self.model.patch_embed.patch_size[0]
            self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 1)
            self.out_dims = [self.model.embed_dim] * len(self.layers)
            self.reductions = [self.patch_size] * len(self.layers)
            self._disable_pos_embed_antialias()
            if self.return_attention:
                for i in self.block_idx:
                    self.model.blocks[i].attn.register_forward_pre_hook(self._record_attention)
            return
        names = [entry["module"] for entry in info.feature_info]
        if not names:
            msg = f"Backbone '{name}' exposes no feature layers (timm feature_info); choose a CNN or ViT."
            raise ValueError(msg)
        indices = []
        for layer in self.layers:
            if isinstance(layer, int):
                if not 0 <= layer < len(names):
                    msg = f"Layer index {layer} out of range for '{name}': valid 0..{len(names) - 1} ({names})."
                    raise ValueError(msg)
                indices.append(layer)
            elif layer in names:
                indices.append(names.index(layer))
            else:
                msg = f"Layer '{layer}' not found in '{name}'. Available feature layers: {names}."
                raise ValueError(msg)
        self.model = self._build_features(name, weights, indices, img_size)
        self._channels_last = str(getattr(self.model, "output_fmt", "NCHW")).upper().endswith("NHWC")
        self.out_dims = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())

    @staticmethod
    def _build_features(
        name: str, weights: str | os.PathLike | None, indices: list[int], img_size: int | None
    ) -> nn.Module:
        """A CNN ``features_only`` model; weights from a file are loaded strictly where that is exact.

        timm loads a file into a features model non-strictly (a partial file builds silently, the dropped head is
        reported as unexpected keys). Where :func:`~.weights.features_key_map` can trace every tensor to the file's
        names (families without a timm checkpoint filter), the model is built without weights and exactly its
        tensors are loaded; elsewhere timm loads them as before.
        """
        kwargs = {"exportable": True, **({"img_size": img_size} if img_size and "swin" in name else {})}
        pretrained = resolve_pretrained(name, weights)
        file = pretrained.get("pretrained_cfg_overlay", {}).get("file")
        key_map = features_key_map(name, indices, **kwargs) if file is not None else None
        if file is not None and key_map is not None:
            model = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices, **kwargs)
            load_weights_strict(model, file, name, key_map)
            return model
        with weights_load_errors(file, name):
            return timm.create_model(name, features_only=True, out_indices=indices, **kwargs, **pretrained)

    @staticmethod
    def _block_index(layer: int | str, depth: int) -> int:
        try:
            idx = int(str(layer).rsplit(".", 1)[-1])
        except ValueError as exc:
            msg = f"ViT layers must be block indices or 'blocks.<i>' names, got '{layer}'."
            raise ValueError(msg) from exc
        if not 0 <= idx < depth:
            msg = f"Block index {idx} out of range: this ViT has {depth} blocks (0..{depth - 1})."
            raise ValueError(msg)
        return idx

    @staticmethod
    def _disable_pos_embed_antialias() -> None:
        """Reuse anomalib's ONNX-safe patch of timm's position-embedding resampling."""
        from anomalib.models.components.feature_extractors.timm import _disable_pos_embed_antialiasing

        _disable_pos_embed_antialiasing()

    # ------------------------------------------------------------------ forward
    def _record_attention(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Record the block's attention while ``return_attention`` is on (a model may switch it per call)."""
        if self.return_attention:
            self.attention_maps.append(attention_weights(module, args[0]))

    def train(self, mode: bool = True) -> FeatureExtractor:
        """A frozen extractor stays in eval mode (its batch-norm statistics never update); a trainable one follows
        ``mode``."""
        return super().train(mode and self.trainable)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract the selected layers of an RGB batch ``(B, 3, H, W)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = (
                f"Expected an RGB batch of shape (B, 3, H, W), got {tuple(images.shape)}. "
                "Convert grayscale images to 3 channels (anomalib's datamodules do this)."
            )
            raise ValueError(msg)
        self.attention_maps = []
        with torch.set_grad_enabled(self.trainable and self.training and torch.is_grad_enabled()):
            if self._delegate is not None:
                return list(self._delegate(images).values())
            if self.is_vit:
                return list(
                    self.model.forward_intermediates(
                        images, indices=self.block_idx, norm=self.vit_norm, output_fmt="NCHW", intermediates_only=True
                    )
                )
            features = self.model(images)
            if self._channels_last:
                features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
            return list(features)


class BackboneInfo:
    """What a timm backbone is, read from a build on the meta device (nothing allocated, nothing downloaded).

    Attributes:
        name: the timm name as given.
        is_vit: a ViT (``blocks`` + ``patch_embed`` + ``forward_intermediates``).
        depth: ViT blocks (0 for CNNs).
        num_heads: attention heads of the first ViT block (0 for CNNs).
        feature_info: CNNs: timm's ``feature_info`` entries (``module``, ``num_chs``, ``reduction``).
    """

    def __init__(self, name: str, is_vit: bool, depth: int, num_heads: int, feature_info: list[dict]) -> None:
        self.name, self.is_vit, self.depth, self.num_heads = name, is_vit, depth, num_heads
        self.feature_info = feature_info


def probe_backbone(backbone: str) -> BackboneInfo:
    """Probe a timm backbone once on the meta device; an unknown name is one clear ``ValueError``."""
    if not timm.is_model(backbone.split(".")[0]):
        msg = f"Unknown timm backbone '{backbone}'. See timm.list_models() for valid names."
        raise ValueError(msg)
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    if _is_vit(model):
        heads = int(getattr(getattr(model.blocks[0], "attn", None), "num_heads", 0))
        return BackboneInfo(backbone, True, len(model.blocks), heads, [])
    info = [dict(entry) for entry in getattr(model, "feature_info", [])]
    return BackboneInfo(backbone, False, 0, 0, info)


def layers_at_strides(backbone: str, layers: Sequence[int | str] | None, strides: Sequence[int]) -> list[int | str]:
    """``layers`` as given, or for ``None`` the last feature layer of a CNN at each of ``strides``.

    E.g. strides (4, 8, 16) give ``layer1``-``layer3`` for ResNets and ``blocks.1, blocks.2, blocks.4`` for
    EfficientNet-Lite. An empty list, an unknown backbone, or a backbone without a layer at some stride is one clear
    ``ValueError`` telling the user to pass ``layers``.
    """
    if layers is not None:
        layers = list(layers)
        if not layers:
            msg = "layers must name at least one backbone layer, e.g. ['layer1', 'layer2'] or [1, 2]."
            raise ValueError(msg)
        return layers
    info = probe_backbone(backbone).feature_info
    chosen: list[int | str] = []
    for stride in strides:
        names = [entry["module"] for entry in info if entry.get("reduction") == stride]
        if not names:
            found = [(entry["module"], entry.get("reduction")) for entry in info]
            msg = (
                f"Cannot pick default layers for '{backbone}': no feature layer at stride {stride} "
                f"(found {found}). Pass layers explicitly, e.g. layers=[1, 2, 3]."
            )
            raise ValueError(msg)
        chosen.append(names[-1])
    return chosen
