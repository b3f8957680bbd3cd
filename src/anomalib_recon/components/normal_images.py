"""What a model builds from its normal training images (statistics, memory banks), built the same on every rank.

Models fit some state from the whole normal training set rather than by gradient descent: NAFRAD's feature
standardisation, GLCF's map statistics, SCL-VI's mean image and memory banks. :func:`collect_normal_images` is the
one loop for that: it reads the training set in dataset order (no shuffling, no augmentation), at most
``max_images`` images, applies the model's pre-processor, hands each batch to the model's ``fn`` and returns one
row per image, in dataset order. Under DDP each rank reads its own share (every ``world_size``-th image) and the rows
of all ranks are gathered, so every rank ends up with exactly the rows a single process would compute, in the same
order: whatever is reduced from them is identical on every rank and equal to the single-process result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from .guards import check_images


def _trainer(module: Any) -> Any:
    return getattr(module, "_trainer", None)


def training_dataset(module: Any) -> Dataset:
    """The dataset of normal training images: the datamodule's ``train_data``, else the train dataloader's dataset."""
    trainer = _trainer(module)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None and trainer is not None:
        loader = getattr(trainer, "train_dataloader", None)
        dataset = getattr(loader, "dataset", None)
    if dataset is None:
        name = type(module).__name__
        msg = (
            f"{name}: no normal training images to fit from. Train with Engine.fit(model, datamodule=...) (or "
            "train_dataloaders=...), or pass a dataloader of normal images to the fitting method."
        )
        raise ValueError(msg)
    return dataset


def has_training_data(module: Any) -> bool:
    """Whether the module's trainer can give normal training images (a datamodule's ``train_data`` or a train
    dataloader): models that build banks lazily (at the first validation) ask before they try."""
    try:
        training_dataset(module)
    except (ValueError, RuntimeError):
        return False
    return True


def _world(module: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loader_settings(module: Any) -> dict[str, Any]:
    trainer = _trainer(module)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
    batch_size = getattr(datamodule, "eval_batch_size", None) or getattr(loader, "batch_size", None) or 8
    workers = getattr(datamodule, "num_workers", None)
    if workers is None:
        workers = getattr(loader, "num_workers", 0)
    return {"batch_size": int(batch_size), "num_workers": int(workers)}


def preprocess(module: Any, batch: Any) -> torch.Tensor:
    """Raw images of ``batch`` (an anomalib batch or a tensor), checked, on the module's device, pre-processed."""
    images = batch if isinstance(batch, torch.Tensor) else batch.image
    check_images(images, type(module).__name__)
    images = images.to(module.device)
    transform = getattr(getattr(module, "pre_processor", None), "transform", None)
    return transform(images) if transform is not None else images


def normal_image_batches(
    module: Any, max_images: int | None = None, dataloader: Iterable | None = None, dataset: Dataset | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices, pre-processed images)`` batches of this rank's share of the first ``max_images`` training images.

    Args:
        module: The Lightning module (its trainer gives the dataset, its pre-processor the transform).
        max_images: At most this many images of the training set (``None``: all).
        dataloader: Batches of raw normal images to use instead of the training set (as given, on this process,
            cut after ``max_images`` images).
        dataset: Another dataset of normal images to read instead of the training set (e.g. a normal-only
            validation split), sharded like the training set.
    """
    if dataloader is not None:
        seen = 0
        for batch in dataloader:
            if max_images is not None and seen >= max_images:
                return
            images = preprocess(module, batch)
            if max_images is not None:
                images = images[: max_images - seen]
            indices = torch.arange(seen, seen + images.shape[0])
            seen += images.shape[0]
            yield indices, images
        return
    dataset = dataset if dataset is not None else training_dataset(module)
    count = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    rank, world = _world(module)
    if count == 0:
        msg = f"{type(module).__name__}: no normal training images to fit from (the training set is empty)."
        raise ValueError(msg)
    if count < world:  # decided alike on every rank, so no rank waits in a gather that another never reaches
        msg = f"{type(module).__name__}: {count} training images for {world} processes; use at least one per process."
        raise ValueError(msg)
    share = list(range(count))[rank::world]
    settings = _loader_settings(module)
    collate = getattr(dataset, "collate_fn", None)
    loader = DataLoader(Subset(dataset, share), shuffle=False, collate_fn=collate, **settings)
    start = 0
    for batch in loader:
        images = preprocess(module, batch)
        indices = torch.tensor(share[start : start + images.shape[0]])
        start += images.shape[0]
        yield indices, images


def _gather(rows: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``rows`` and ``indices`` (padded to one length for ``all_gather``, then unpadded)."""
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    padded_idx = torch.full((longest,), -1, dtype=torch.long, device=rows.device)
    padded_idx[: rows.shape[0]] = indices.to(rows.device)
    all_rows = [torch.empty_like(padded) for _ in range(world)]
    all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_idx, padded_idx)
    parts = [(r[: int(c)], i[: int(c)]) for r, i, c in zip(all_rows, all_idx, counts, strict=True)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sync_buffers(module: Any) -> None:
    """Take the torch model's buffers from rank 0, as DDP does before each forward: batch-norm statistics of
    trainable parts drift apart on each rank's own batches, and ``fn`` must compute the same thing everywhere."""
    model = getattr(module, "model", module)
    for buffer in model.buffers():
        if buffer.dtype != torch.bool:  # gloo broadcasts no bool tensors; flags are set from the rows anyway
            dist.broadcast(buffer.data, src=0)


def collect_normal_images(
    module: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    max_images: int | None = None,
    dataloader: Iterable | None = None,
    dataset: Dataset | None = None,
) -> torch.Tensor:
    """Rows ``fn(images)`` (one per image) of the first ``max_images`` normal training images, of every rank.

    The module is put in eval mode (and restored), gradients are off and inference mode is left (the result may
    become a buffer used in training). Under DDP the torch model's buffers are first taken from rank 0 (as DDP does
    before a forward), then the rows of all ranks are gathered and every rank gets them all.

    Args:
        module: The Lightning module.
        fn: Pre-processed images ``(b, 3, H, W)`` → rows ``(b, ...)``, one per image.
        max_images: At most this many training images (``None``: all).
        dataloader: Raw normal images to use instead of the training set (no sharding, no gathering).
        dataset: Another dataset of normal images instead of the training set (sharded and gathered like it).

    Returns:
        ``(N, ...)`` rows in dataset order (``N`` images in all).
    """
    distributed = dataloader is None and _world(module)[1] > 1
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():
            if distributed:
                _sync_buffers(module)
            rows, indices = [], []
            for idx, images in normal_image_batches(module, max_images, dataloader, dataset):
                out = fn(images)
                if out.shape[0] != images.shape[0]:
                    msg = f"fn must return one row per image: {images.shape[0]} images gave {tuple(out.shape)}."
                    raise ValueError(msg)
                rows.append(out)
                indices.append(idx)
    finally:
        module.train(was_training)
    if not rows:
        name = type(module).__name__
        msg = f"{name}: no normal training images to fit from (the training set or the given dataloader is empty)."
        raise ValueError(msg)
    local, local_idx = torch.cat(rows), torch.cat(indices)
    if distributed:
        local, local_idx = _gather(local, local_idx)
    order = torch.argsort(local_idx.to(local.device))
    return local[order]
