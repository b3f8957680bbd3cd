"""Input-size and pre-processor helpers shared by the Lightning modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomalib.pre_processing import PreProcessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_image_size(size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """``256`` or ``(256, 256)`` -> ``(256, 256)``; anything else is one clear ``ValueError``."""
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) <= 0:
        msg = f"{name} must be a positive int or (height, width), got {size!r}."
        raise ValueError(msg)
    return pair  # type: ignore[return-value]


def resize_pre_processor(image_size: tuple[int, int] | None = None, normalize: bool = True) -> PreProcessor:
    """anomalib ``PreProcessor``: Resize (default 256×256), then ImageNet ``Normalize`` unless ``normalize=False``.

    The resize is not antialiased: anomalib switches antialiasing off in ``forward`` and in exports (OpenVINO's
    ONNX front end ignores it), so an antialiased training/predict resize would make ``anomalib predict`` and
    the exported model disagree on any image that must be down-sized.
    """
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transforms: list = [Resize(image_size or (256, 256), antialias=False)]
    if normalize:
        transforms.append(Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    return PreProcessor(transform=Compose(transforms))


def sized_pre_processor(
    model_cls: type, image_size: int | Sequence[int] | None, pre_processor: object, **kwargs: object
) -> object:
    """The ``pre_processor`` argument to hand to ``AnomalibModule.__init__`` for a model with an ``image_size``.

    ``pre_processor=True`` with a size becomes ``model_cls.configure_pre_processor(image_size=(H, W), **kwargs)`` (the
    size is checked here, at construction); ``True`` without a size but with ``kwargs`` becomes
    ``model_cls.configure_pre_processor(**kwargs)`` (the model's default size). ``kwargs`` are the model's own
    pre-processor arguments (NAFRAD's ``normalize_input``, InpFormerPP's ``crop_size``). A given pre-processor,
    ``False``, or ``True`` with neither pass through (anomalib then builds the model's default). The model reads its
    input size back from the pre-processor (``self.input_size``), so the size lives in one place.
    """
    if pre_processor is not True:
        return pre_processor
    if image_size is not None:
        return model_cls.configure_pre_processor(image_size=as_image_size(image_size), **kwargs)
    if kwargs:
        return model_cls.configure_pre_processor(**kwargs)
    return pre_processor
