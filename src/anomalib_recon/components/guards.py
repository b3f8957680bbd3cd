"""Nothing silent: the checks every model applies to what enters it and what leaves it.

* :func:`check_images`: raw images, before the pre-processor: a floating-point ``(B, 3, H, W)`` (or ``(3, H, W)``)
  tensor, finite, with values in [0, 1] as anomalib's readers give them. uint8 tensors, 1- or 4-channel images,
  0-255 values (a forgotten ``/ 255``) and already-normalised images (a normalising augmentation) each get one
  error that says what to do, before any pre-processing or backbone sees them.
* :func:`check_model_input`: what a torch model's ``forward`` receives (pre-processed): an RGB batch
  ``(B, 3, H, W)``, of the size the model was built for where its parameters fix one.
* :func:`check_finite`: a model's own outputs (loss, features, map, score); NaN or inf is a
  :class:`NonFiniteError`, never a metric (:func:`check_features`: the same for a backbone's features).
* :func:`nonfinite_parameters`: names of non-finite parameters and buffers, for the message that tells a corrupt
  checkpoint from a diverged fit.

Every check is skipped while a graph is captured (export, ``torch.compile``): exported graphs carry no checks.
:class:`~anomalib_recon.components.module.ReconModuleMixin` applies them to every model at every stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .tracing import is_tracing

RAW_RANGE = (-0.5, 1.5)
"""Raw images must lie in [0, 1]; values outside this wider band are refused (below: already normalised; above:
0-255 pixel values). The band leaves room for augmentations that overshoot [0, 1] slightly (noise, jitter)."""


class InputImageError(ValueError):
    """Images of the wrong type, shape or value range for a model's pre-processor."""


class NonFiniteError(ValueError, FloatingPointError):
    """A loss, feature map, anomaly map or score that is NaN or inf (also a ``ValueError``, as the losses raised)."""


class UntrainedModelError(RuntimeError):
    """A model that needs training was asked to test or predict without having been trained or loaded."""


def check_images(images: object, model_name: str) -> None:
    """Raise one :class:`InputImageError` unless ``images`` are raw RGB images in [0, 1] (skipped while tracing).

    Args:
        images: ``(B, 3, H, W)`` or ``(3, H, W)`` floating-point tensor, as anomalib's datamodules and readers give.
        model_name: Named in the message.
    """
    if is_tracing():
        return
    if not isinstance(images, torch.Tensor):
        msg = f"{model_name}: expected the images as a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}."
        raise InputImageError(msg)
    shape = tuple(images.shape)
    if images.dim() not in (3, 4) or min(shape, default=0) == 0:
        msg = (
            f"{model_name}: expected images of shape (B, 3, H, W) or (3, H, W), got {shape}. Batch single images "
            "with image.unsqueeze(0)."
        )
        raise InputImageError(msg)
    channels = shape[-3]
    if channels != 3:
        if channels == 1:
            how = "grayscale: repeat it to 3 channels (images.repeat(1, 3, 1, 1)), as anomalib's read_image does"
        elif channels == 4:
            how = "RGBA: drop the alpha channel (images[:, :3])"
        else:
            how = "pass RGB images with the channels on dimension -3 (B, 3, H, W)"
        msg = f"{model_name}: images have {channels} channels (shape {shape}); the model takes 3-channel RGB. {how}."
        raise InputImageError(msg)
    if not images.is_floating_point():
        msg = (
            f"{model_name}: images are {images.dtype}; the model takes floating-point images in [0, 1] (what "
            "anomalib's read_image and datamodules give). Convert with images.float() / 255 for 8-bit images."
        )
        raise InputImageError(msg)
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(dim=1).sum()) if images.dim() == 4 else 1
        msg = f"{model_name}: {bad} image(s) contain NaN or inf pixels; clean or drop those images."
        raise InputImageError(msg)
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if low >= RAW_RANGE[0] and high <= RAW_RANGE[1]:
        return
    if high > 10 and low >= RAW_RANGE[0]:
        msg = (
            f"{model_name}: image values reach {high:.4g}, but the model takes raw images in [0, 1] (its pre-processor "
            "normalises them). These look like 0-255 pixel values: divide by 255."
        )
        raise InputImageError(msg)
    msg = (
        f"{model_name}: image values span {low:.4g}..{high:.4g}, but the model takes raw images in [0, 1]. These "
        "look normalised already: pass the raw images; the model's pre-processor normalises them (a Normalize in "
        "the datamodule's augmentations would normalise twice)."
    )
    raise InputImageError(msg)


def check_model_input(
    model_name: str,
    images: object,
    image_size: tuple[int, int] | None = None,
    fixed_by: str = "",
    what: str = "images",
) -> None:
    """Raise one :class:`InputImageError` unless ``images`` is an RGB batch ``(B, 3, H, W)`` (and, given
    ``image_size``, of that size: checked eagerly only, skipped while tracing).

    Args:
        model_name: Named in the message.
        images: What the torch model received (after the pre-processor).
        image_size: ``(H, W)`` the model is built for, where its parameters fix one (memory tokens, prompts, ...).
        fixed_by: What fixes the size, for the message ("its memory tokens have one grid").
        what: What the tensor is, for the message ("images", "augmented_images").
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        msg = f"{model_name} expects {what} as an RGB batch (B, 3, H, W), got {shape}; repeat grayscale to 3 channels."
        raise InputImageError(msg)
    if image_size is not None and not is_tracing() and tuple(images.shape[-2:]) != tuple(image_size):
        why = f" ({fixed_by})" if fixed_by else ""
        msg = (
            f"{model_name} is built for {image_size[0]}x{image_size[1]} inputs{why}, got {images.shape[-2]}x"
            f"{images.shape[-1]}. Resize the images or build the model with that image_size."
        )
        raise InputImageError(msg)


def check_finite(model_name: str, what: str, *tensors: torch.Tensor, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` when a floating tensor holds NaN or inf (skipped while tracing).

    Args:
        model_name: Named in the message.
        what: What the tensors are ("the anomaly map", "the training loss", ...).
        *tensors: Tensors to check (``None`` and non-floating tensors are ignored).
        hint: What to do, appended to the message.
    """
    if is_tracing():
        return
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            msg = f"{model_name}: NaN or inf in {what}." + (f" {hint}" if hint else "")
            raise NonFiniteError(msg)


def check_features(model_name: str, *features: torch.Tensor, what: str = "the backbone features") -> None:
    """:func:`check_finite` for a frozen backbone's output: NaN or inf there comes from the images or the weights."""
    check_finite(
        model_name, what, *features, hint="Check the input images (normalised, finite) and the backbone weights."
    )


def nonfinite_parameters(module: nn.Module, limit: int = 3) -> list[str]:
    """Names of up to ``limit`` parameters or buffers of ``module`` that hold NaN or inf."""
    found = []
    named: Iterable[tuple[str, torch.Tensor]] = (*module.named_parameters(), *module.named_buffers())
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(name)
            if len(found) >= limit:
                break
    return found


def is_finite_number(value: Any) -> bool:
    """A finite real number (``bool`` is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer_settings(owner: str, lr: Any, weight_decay: Any, betas: Any = None, prefix: str = "") -> None:
    """One ``ValueError`` at construction, naming the argument, for an Adam/AdamW setting that would fail (or
    diverge) in ``fit``: ``lr`` finite > 0, ``weight_decay`` finite >= 0, ``betas`` (if given) two numbers in [0, 1).
    ``prefix`` names a second optimizer's arguments (``flow_`` -> ``flow_lr``)."""
    if not is_finite_number(lr) or lr <= 0:
        msg = f"{owner}: {prefix}lr must be a finite number > 0, got {lr!r}."
        raise ValueError(msg)
    if not is_finite_number(weight_decay) or weight_decay < 0:
        msg = f"{owner}: {prefix}weight_decay must be a finite number >= 0, got {weight_decay!r}."
        raise ValueError(msg)
    if betas is not None and (len(betas) != 2 or not all(is_finite_number(b) and 0 <= b < 1 for b in betas)):
        msg = f"{owner}: {prefix}betas must be two numbers in [0, 1), got {betas!r}."
        raise ValueError(msg)
