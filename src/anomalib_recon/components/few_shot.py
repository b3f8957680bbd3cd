"""Few-shot training: k normal images, replicated and augmented with rotations and flips (AGPNet, INP-Former++).

AGPNet's paper trains its few-shot models on k normal images with a "32-fold data augmentation (rotate and flip)".
Here the k images are drawn once with a seed, every one is listed ``folds`` times in the training set (so an
epoch shows each image ``folds`` times), and each time it is seen it gets a random element of the dihedral group
(rotation by 0/90/180/270 degrees, optionally mirrored). Right-angle rotations keep the whole image and leave no
empty corners.

The models apply them when ``few_shot_k`` is set (:func:`restrict_to_few_shot` in their ``setup``); the functions
are public so that the same recipe can be applied to any anomalib datamodule::

    datamodule.setup()
    few_shot_subset(datamodule.train_data, k=4, folds=32, seed=0)
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch
from anomalib.data.datasets.base.image import AnomalibDataset

__all__ = ["dihedral_augment", "few_shot_subset", "restrict_to_few_shot"]

logger = logging.getLogger(__name__)


def few_shot_subset(dataset: AnomalibDataset, k: int, folds: int = 32, seed: int = 0) -> AnomalibDataset:
    """Keep ``k`` randomly chosen samples of ``dataset`` (in place), each listed ``folds`` times.

    Args:
        dataset: An anomalib dataset (``datamodule.train_data``) with a ``samples`` data frame.
        k: Number of distinct normal images to keep.
        folds: Replication factor (paper: 32).
        seed: Seed of the draw, so runs with the same seed see the same images.

    Returns:
        The same dataset, now of length ``k · folds``. Calling it again on an already reduced dataset with the same
        ``k`` and ``folds`` changes nothing.
    """
    if k < 1 or folds < 1:
        msg = f"few-shot needs k >= 1 and folds >= 1, got k={k}, folds={folds}."
        raise ValueError(msg)
    samples = dataset.samples
    if samples.attrs.get("anomalib_recon_few_shot") == (k, folds):
        return dataset
    n = len(samples)
    if k > n:
        msg = f"few-shot k={k} is larger than the training set ({n} images); choose k <= {n}."
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(n, generator=generator)[:k].tolist())
    kept = samples.iloc[chosen]
    replicated = pd.concat([kept] * folds, ignore_index=True)
    dataset.samples = replicated
    dataset.samples.attrs["anomalib_recon_few_shot"] = (k, folds)
    return dataset


def dihedral_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image of a ``(B, C, H, W)`` batch by a random multiple of 90° and mirror it with probability ½.

    Non-square images keep their shape: a 90° or 270° rotation is only drawn when ``H == W``.
    """
    if images.dim() != 4:
        msg = f"dihedral_augment expects a (B, C, H, W) batch, got {tuple(images.shape)}."
        raise ValueError(msg)
    square = images.shape[-1] == images.shape[-2]
    draws = torch.randint(0, 8, (images.shape[0],), generator=generator).tolist()
    out = []
    for image, draw in zip(images, draws, strict=True):
        turns = draw % 4 if square else 2 * (draw % 2)
        image = torch.rot90(image, turns, dims=(-2, -1))
        if draw >= 4:
            image = torch.flip(image, dims=(-1,))
        out.append(image)
    return torch.stack(out)


def restrict_to_few_shot(trainer: Any, k: int, folds: int, seed: int, model_name: str) -> None:
    """A model's ``setup("fit")`` step: reduce ``trainer.datamodule.train_data`` with :func:`few_shot_subset`."""
    datamodule = getattr(trainer, "datamodule", None)
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None:
        msg = (
            f"{model_name}: few_shot_k needs an anomalib datamodule passed to Engine.fit(datamodule=...); for plain "
            "dataloaders reduce the dataset yourself with anomalib_recon.components.few_shot_subset."
        )
        raise ValueError(msg)
    few_shot_subset(train_data, k, folds, seed)
    logger.info("%s few-shot: %d images x %d folds.", model_name, k, folds)
