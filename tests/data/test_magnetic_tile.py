"""MagneticTile preset and MVTec alias."""

import inspect
import os
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_recon.data import (
    MAGNETIC_TILE_DEFECTS,
    MAGNETIC_TILE_ENV,
    DatasetError,
    DatasetNotFoundError,
    MagneticTile,
    MVTec,
)

REAL_ROOT = Path("/work/shared/datasets/magnetic_tile")
DEFECTS = [(d, 1 + (i % 2)) for i, d in enumerate(MAGNETIC_TILE_DEFECTS)]  # 1 or 2 images per defect


@pytest.fixture
def tile_root(make_tree):
    """A tiny Magnetic Tile layout: grayscale JPEGs of varying size, PNG masks."""
    return make_tree(n_train=4, n_good=2, defects=DEFECTS, ext=".jpg", vary_size=True)


def test_preset_loads_masks_and_segmentation(tile_root):
    datamodule = MagneticTile(root=tile_root, num_workers=0, eval_batch_size=4)
    datamodule.setup()
    assert datamodule.task == "segmentation"
    assert datamodule.name == "magnetic_tile"
    n_defective = sum(n for _, n in DEFECTS)
    assert len(datamodule.train_data) == 4
    assert len(datamodule.test_data) == 2 + n_defective
    assert len(datamodule.val_data) == len(datamodule.test_data)  # same_as_test
    samples = datamodule.test_data.samples
    for row in samples[samples.label_index == 1].itertuples():
        assert Path(row.mask_path).stem == Path(row.image_path).stem + "_mask"
        assert Path(row.mask_path).parent.name == Path(row.image_path).parent.name
    anomalous = int(samples.index[samples.label_index == 1][0])
    item = datamodule.test_data[anomalous]
    assert item.image.shape[0] == 3 and item.image.dtype == torch.float32
    assert item.gt_mask.shape == item.image.shape[-2:]
    assert item.gt_mask.sum() == 64  # the 8x8 defect square
    # variable sizes are collated (anomalib resizes to the largest in the batch)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[:2] == (4, 3) and batch.gt_mask.shape[0] == 4


def test_preset_with_resize_augmentation(tile_root):
    datamodule = MagneticTile(root=tile_root, num_workers=0, train_batch_size=4, augmentations=Resize((32, 32)))
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (4, 3, 32, 32)


def test_defect_subset(tile_root):
    datamodule = MagneticTile(root=tile_root, defects=["fray", "crack"], num_workers=0)
    datamodule.setup()
    labels = {Path(p).parent.name for p in datamodule.test_data.samples.image_path}
    assert labels == {"good", "crack", "fray"}
    with pytest.raises(DatasetError, match="subset of"):
        MagneticTile(root=tile_root, defects=["rust"])


def test_root_from_environment(tile_root, monkeypatch):
    monkeypatch.setenv(MAGNETIC_TILE_ENV, str(tile_root))
    datamodule = MagneticTile(num_workers=0)
    assert Path(datamodule.root) == tile_root
    monkeypatch.delenv(MAGNETIC_TILE_ENV)
    with pytest.raises(DatasetError, match=MAGNETIC_TILE_ENV):
        MagneticTile()


def test_missing_or_empty_folders(tile_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Expected layout"):
        MagneticTile(root=tmp_path / "nowhere").setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="train/good"):
        MagneticTile(root=empty).prepare_data()
    for f in (tile_root / "test" / "crack").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"test/crack' has no images"):
        MagneticTile(root=tile_root).setup()


def test_corrupt_image(tile_root):
    bad = tile_root / "train" / "good" / "001.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=r"001\.jpg.*not a readable image"):
        MagneticTile(root=tile_root).setup()


def test_truncated_image_fails_clearly_when_loaded(tile_root):
    datamodule = MagneticTile(root=tile_root, num_workers=0)
    datamodule.setup()
    path = Path(datamodule.train_data.samples.image_path[0])
    path.write_bytes(path.read_bytes()[:200])  # header intact, data cut: only decoding fails
    with pytest.raises(DatasetError, match=f"{path.name}.*Replace the file"):
        datamodule.train_data[0]


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason="real Magnetic Tile data not present")
def test_real_magnetic_tile():
    datamodule = MagneticTile(root=REAL_ROOT, num_workers=0, eval_batch_size=2)
    datamodule.setup()
    assert datamodule.task == "segmentation"
    assert len(datamodule.train_data) == 762
    test = datamodule.test_data.samples
    assert int((test.label_index == 0).sum()) == 190
    assert int((test.label_index == 1).sum()) == 392
    item = datamodule.test_data[int(test.index[test.label_index == 1][0])]
    assert item.image.shape[0] == 3 and item.gt_mask.shape == item.image.shape[-2:]
    with Image.open(test.image_path[0]) as image:
        assert image.mode == "L"


def test_mvtec_alias(make_tree, tmp_path):
    assert issubclass(MVTec, MVTecAD)
    assert inspect.signature(MVTec.__init__) == inspect.signature(MVTecAD.__init__)
    own = {k for k, v in vars(MVTec).items() if not k.startswith("_") and (callable(v) or isinstance(v, property))}
    assert own == {"name"}
    make_tree("bottle", root=tmp_path / "MVTecAD")
    datamodule = MVTec(root=tmp_path / "MVTecAD", category="bottle", num_workers=0)
    reference = MVTecAD(root=tmp_path / "MVTecAD", category="bottle", num_workers=0)
    datamodule.setup()
    reference.setup()
    assert datamodule.name == reference.name == "MVTecAD"
    assert datamodule.test_data.samples.equals(reference.test_data.samples)
    assert datamodule.task == "segmentation"
    assert os.fspath(datamodule.root) == os.fspath(reference.root)
