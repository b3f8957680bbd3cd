"""The one loop over at most N normal training images (components/normal_images.py): dataset order, the model's
pre-processor, checked inputs, and under DDP every rank gets exactly the single-process rows."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp
from torch import nn

from anomalib_recon.components import normal_images
from anomalib_recon.components.guards import InputImageError
from anomalib_recon.components.normal_images import collect_normal_images, normal_image_batches


class _Images(torch.utils.data.Dataset):
    """Image ``i`` is constant ``i / 100`` (so a row tells which image it came from)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((3, 4, 4), index / 100)


class _Module(nn.Module):
    """What the loop reads from a Lightning module: its trainer's data, its device and pre-processor."""

    def __init__(self, count: int, batch_size: int = 3) -> None:
        super().__init__()
        self.layer = nn.Dropout(0.5)
        datamodule = SimpleNamespace(train_data=_Images(count), eval_batch_size=batch_size, num_workers=0)
        self._trainer = SimpleNamespace(datamodule=datamodule, train_dataloader=None)
        self.pre_processor = SimpleNamespace(transform=lambda x: x * 2)
        self.device = torch.device("cpu")
        self.seen_training: list[bool] = []

    def rows(self, images: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return images.mean(dim=(1, 2, 3)).unsqueeze(1) * 50  # = image index (pre-processor doubles)


def test_rows_come_in_dataset_order_from_pre_processed_images_in_eval_mode():
    module = _Module(count=7)
    module.train()
    rows = collect_normal_images(module, module.rows)
    torch.testing.assert_close(rows.squeeze(1), torch.arange(7.0))
    assert module.seen_training == [False] * 3 and module.training  # eval inside, restored after


def test_at_most_max_images_are_read():
    module = _Module(count=7)
    torch.testing.assert_close(collect_normal_images(module, module.rows, max_images=5).squeeze(1), torch.arange(5.0))
    given = [torch.full((2, 3, 4, 4), 0.5)] * 3  # a dataloader of raw image tensors, cut after 5 images
    assert collect_normal_images(module, module.rows, max_images=5, dataloader=given).shape == (5, 1)


def test_bad_rows_images_and_empty_sets_are_errors():
    module = _Module(count=4)
    with pytest.raises(ValueError, match="one row per image"):
        collect_normal_images(module, lambda images: images[:1].mean(dim=(1, 2, 3)))
    with pytest.raises(InputImageError, match="0-255"):
        collect_normal_images(module, module.rows, dataloader=[torch.full((1, 3, 4, 4), 200.0)])
    with pytest.raises(ValueError, match="no normal training images"):
        collect_normal_images(_Module(count=0), module.rows)
    module._trainer = None
    with pytest.raises(ValueError, match=r"Engine\.fit"):
        list(normal_image_batches(module))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, count: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _Module(count=count, batch_size=2)
        seen = [idx.tolist() for idx, _ in normal_image_batches(module)]
        rows = collect_normal_images(module, module.rows)
        torch.save({"rows": rows, "seen": seen}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_reads_its_share_and_gets_every_row(tmp_path):
    count = 7
    mp.spawn(_rank, args=(2, _free_port(), count, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [i for batch in ranks[0]["seen"] for i in batch] == [0, 2, 4, 6]
    assert [i for batch in ranks[1]["seen"] for i in batch] == [1, 3, 5]
    single = collect_normal_images(_Module(count=count), _Module(count=count).rows)
    for rank in ranks:
        torch.testing.assert_close(rank["rows"], single, atol=0, rtol=0)


def test_has_training_data_follows_what_the_trainer_can_give() -> None:
    """No trainer, a trainer without data, a datamodule's train_data, a train dataloader's dataset."""
    images = torch.utils.data.TensorDataset(torch.rand(2, 3, 8, 8))
    assert not normal_images.has_training_data(SimpleNamespace(_trainer=None))
    assert not normal_images.has_training_data(SimpleNamespace(_trainer=SimpleNamespace(datamodule=None)))
    with_datamodule = SimpleNamespace(datamodule=SimpleNamespace(train_data=images))
    assert normal_images.has_training_data(SimpleNamespace(_trainer=with_datamodule))
    loader = torch.utils.data.DataLoader(images)
    with_loader = SimpleNamespace(datamodule=None, train_dataloader=loader)
    assert normal_images.has_training_data(SimpleNamespace(_trainer=with_loader))
