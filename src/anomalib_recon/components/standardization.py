"""Per-channel standardisation of a frozen backbone's features with statistics of the normal training images.

NAFRAD and LGFDR reconstruct standardised features ``(F − μ) / σ`` (``standardize_features=True``): one channel
with a large spread would otherwise dominate the reconstruction loss and the map. :class:`FeatureStandardization`
is the torch-model side (persistent buffers ``feature_mean``, ``feature_std``, ``feature_stats_count``, so
checkpoints and exported graphs carry them); :func:`measure_feature_statistics` the Lightning side (the normal
training images of every rank, once, at fit start).

The statistics reduce per-image float64 moments (channel sums, sums of squares, pixel count), so many images, in any
batching and under DDP, give exactly one mean and std: ``σ = sqrt(E[F²] − μ²)``, floored at 1e-6.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from .normal_images import collect_normal_images

logger = logging.getLogger(__name__)

STD_FLOOR = 1e-6
"""Smallest stored σ: a constant channel is centred, not divided by zero."""


class FeatureStandardization:
    """Mixin for an ``nn.Module`` whose :meth:`raw_features` are standardised per channel.

    The module sets ``model_name`` (for messages), ``in_channels`` and ``standardize_features`` and calls
    :meth:`register_feature_statistics` in its ``__init__``; the buffers are identity (μ = 0, σ = 1) until
    :meth:`set_feature_statistics` runs.
    """

    model_name: str
    in_channels: int
    standardize_features: bool
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    feature_stats_count: torch.Tensor

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(B, C, h, w)`` before standardisation (the model's own)."""
        raise NotImplementedError

    def register_feature_statistics(self) -> None:
        """The persistent buffers (only with ``standardize_features``)."""
        if self.standardize_features:
            self.register_buffer("feature_mean", torch.zeros(1, self.in_channels, 1, 1))
            self.register_buffer("feature_std", torch.ones(1, self.in_channels, 1, 1))
            self.register_buffer("feature_stats_count", torch.zeros((), dtype=torch.long))

    @property
    def feature_statistics_fitted(self) -> bool:
        """Whether the statistics were set (always ``True`` without ``standardize_features``)."""
        return not self.standardize_features or int(self.feature_stats_count) > 0

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """``(F − μ) / σ`` per channel; ``F`` itself without ``standardize_features``."""
        if not self.standardize_features:
            return features
        return (features - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def feature_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Per image: the channel sums and sums of squares of :meth:`raw_features` and their pixel count.

        ``(B, 2C + 1)`` float64 rows, so that the statistics of many images reduce exactly (and under DDP every rank
        reduces the same gathered rows): :meth:`set_feature_statistics`.
        """
        features = self.raw_features(images).double()
        pixels = features.new_full((features.shape[0], 1), features.shape[2] * features.shape[3])
        return torch.cat([features.sum(dim=(2, 3)), (features**2).sum(dim=(2, 3)), pixels], dim=1)

    def set_feature_statistics(self, moments: torch.Tensor) -> int:
        """Store each channel's mean and std from :meth:`feature_moments` rows; returns the image count."""
        if not self.standardize_features:
            msg = f"{self.model_name}: feature statistics need a model built with standardize_features=True."
            raise RuntimeError(msg)
        if moments.ndim != 2 or moments.shape[0] == 0:
            msg = f"{self.model_name}: feature statistics got no images; the training set is empty."
            raise ValueError(msg)
        total = moments.double().sum(dim=0).cpu()
        c = self.in_channels
        mean = total[:c] / total[-1]
        std = (total[c : 2 * c] / total[-1] - mean**2).clamp_min(0).sqrt().clamp_min(STD_FLOOR)
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
            msg = (
                f"{self.model_name}: the feature statistics are NaN or inf; check the training images and the "
                "backbone weights."
            )
            raise ValueError(msg)
        self.feature_mean.copy_(mean.view(1, -1, 1, 1).to(self.feature_mean))
        self.feature_std.copy_(std.view(1, -1, 1, 1).to(self.feature_std))
        self.feature_stats_count.fill_(int(moments.shape[0]))
        return int(moments.shape[0])

    def fit_feature_statistics(self, batches: Iterable[torch.Tensor]) -> int:
        """Each channel's mean and std of :meth:`raw_features` over ``batches`` of pre-processed normal images."""
        rows = [self.feature_moments(batch) for batch in batches]
        return self.set_feature_statistics(torch.cat(rows) if rows else torch.zeros(0, 2 * self.in_channels + 1))


def measure_feature_statistics(module: Any, max_images: int | None, dataloader: Iterable | None = None) -> int:
    """The Lightning side: statistics of at most ``max_images`` normal images, stored in ``module.model``.

    ``dataloader=None``: the first training images in dataset order, under DDP from every rank's share
    (:func:`~anomalib_recon.components.normal_images.collect_normal_images`), so every rank stores the statistics one
    process computes; images are neither augmented nor perturbed. A given dataloader of raw normal images is used as
    it is (on this process). Returns the image count.
    """
    model = module.model
    count = model.set_feature_statistics(collect_normal_images(module, model.feature_moments, max_images, dataloader))
    logger.info("%s: feature statistics measured on %d training images.", model.model_name, count)
    return count
