"""Trivial baselines for the benchmark tables: what a model adds over the backbone's features alone.

``MeanFeature`` (issue #13's protocol): one pass over the normal training images accumulates, at every feature
position, the mean of the backbone feature (the layers the harness gives Padim, upsampled to the largest of their
grids and concatenated, exactly Padim's embedding without its random channel subset). A test image's anomaly map
is the L2 distance of each position's feature to that position's mean, upsampled to the input size (bilinear) and
smoothed with a Gaussian (σ = 4), as Padim does; the image score is the map's maximum. It is Padim with an
identity covariance: any gain of a model over this row comes from what it learns, not from the backbone.

It is a benchmark baseline, not a product model: the harness resolves ``--models MeanFeature`` from this file,
and it is not registered in ``anomalib.models``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, GaussianBlur2d, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.feature_extractor import FeatureExtractor
from anomalib_recon.components.preprocessing import resize_pre_processor, sized_pre_processor

__all__ = ["BASELINES", "MeanFeature", "MeanFeatureModel"]


class MeanFeatureModel(nn.Module):
    """Frozen backbone + per-position mean of the normal embeddings; map = L2 distance to that mean.

    Args:
        backbone: timm CNN name.
        layers: Backbone layers (names or ``features_only`` indices), largest grid first or not: every layer is
            resized to the largest grid (nearest, as Padim's embedding).
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random init, for tests).
        blur_sigma: Gaussian σ of the map smoothing in pixels (4, Padim's; kernel ``2·int(4σ + 0.5) + 1``).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int | str],
        weights: str | None = "imagenet",
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(backbone, layers=layers, weights=weights)
        channels = sum(self.feature_extractor.out_dims)
        kernel = 2 * int(4.0 * blur_sigma + 0.5) + 1
        self.blur = GaussianBlur2d(kernel_size=(kernel, kernel), sigma=(blur_sigma, blur_sigma), channels=1)
        # running sums (float64: hundreds of images summed without drift), then the mean used at test time
        self.register_buffer("feature_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(channels, 0, 0))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Take the fitted shapes from a checkpoint (the grid is only known after the training pass)."""
        for name in ("feature_sum", "mean"):
            if prefix + name in state_dict:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(state_dict[prefix + name].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone layers resized (nearest) to the largest grid and concatenated: ``(B, C, h, w)``."""
        features = self.feature_extractor(images)
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        return torch.cat([F.interpolate(f, size=size, mode="nearest") for f in features], dim=1)

    def accumulate(self, embedding: torch.Tensor) -> None:
        """Add a batch of normal embeddings to the per-position running sum."""
        batch_sum = embedding.detach().double().sum(dim=0)
        if self.feature_sum.numel() == 0:
            self.feature_sum = torch.zeros_like(batch_sum)
        elif self.feature_sum.shape != batch_sum.shape:
            msg = (
                f"MeanFeature: training images give a {tuple(batch_sum.shape[-2:])} feature grid, earlier ones "
                f"{tuple(self.feature_sum.shape[-2:])}; resize every image to one size (the pre-processor's Resize)."
            )
            raise ValueError(msg)
        self.feature_sum += batch_sum
        self.count += embedding.shape[0]

    def fit(self) -> None:
        """The per-position mean of everything accumulated; the sums are cleared."""
        if int(self.count) == 0:
            msg = "MeanFeature: no training images were seen; fit needs at least one normal image."
            raise ValueError(msg)
        self.mean = (self.feature_sum / self.count).float()
        self.feature_sum = torch.zeros(0, dtype=torch.float64, device=self.mean.device)
        self.count.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: accumulate and return the embedding (as Padim's memory bank). Inference: score and map."""
        embedding = self.embed(images)
        if self.training:
            self.accumulate(embedding)
            return embedding
        if self.mean.numel() == 0:
            msg = "MeanFeature is not fitted: train it (one pass over normal images) before testing."
            raise ValueError(msg)
        if embedding.shape[1:] != self.mean.shape:
            msg = (
                f"MeanFeature was fitted on a {tuple(self.mean.shape[-2:])} feature grid, this input gives "
                f"{tuple(embedding.shape[-2:])}; test at the training image size."
            )
            raise ValueError(msg)
        distance = (embedding - self.mean).pow(2).sum(dim=1, keepdim=True).sqrt()
        anomaly_map = self.blur(F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(-2, -1)).flatten(), anomaly_map=anomaly_map)


class MeanFeature(MemoryBankMixin, AnomalibModule):
    """Trivial baseline: per-position L2 distance to the mean normal feature (one pass, nothing trained).

    Args:
        backbone: timm CNN (the benchmark's backbone; ``tf_efficientnet_lite0`` loads offline).
        layers: Backbone layers; the harness passes the ones it gives Padim for that backbone.
        weights: ``"imagenet"``, a local weights file, or ``None``.
        image_size: Input size of the default pre-processor (our non-antialiased resize + ImageNet normalisation,
            the one every model of the benchmark gets); ``None`` = 256×256. Ignored when a pre-processor is passed.
        blur_sigma: Gaussian σ of the map (4, as Padim).
        pre_processor: Pre-processor, or ``True`` for the default above.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int | str] = ("blocks.1", "blocks.2", "blocks.4"),
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        blur_sigma: float = 4.0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        self.model = MeanFeatureModel(backbone=backbone, layers=list(layers), weights=weights, blur_sigma=blur_sigma)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """The benchmark's one pre-processing: non-antialiased Resize + ImageNet Normalize."""
        return resize_pre_processor(image_size or (256, 256))

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing is trained."""
        return

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:
        """The model accumulates the batch in training mode; a dummy loss for Lightning (as Padim)."""
        del args, kwargs
        self.model(batch.image)
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def fit(self) -> None:
        """The per-position mean (called once after the training pass by ``MemoryBankMixin``)."""
        self.model.fit()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score and map of a validation batch."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    @property
    def trainer_arguments(self) -> dict[str, int | float]:
        """One pass over the training data, as Padim."""
        return {"max_epochs": 1, "val_check_interval": 1.0, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        """One-class: normal training images only."""
        return LearningType.ONE_CLASS

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's default post-processor (normalisation, thresholds)."""
        return PostProcessor()


BASELINES: dict[str, type[AnomalibModule]] = {"MeanFeature": MeanFeature}
"""Baselines the harness resolves by name before ``anomalib.models``."""
