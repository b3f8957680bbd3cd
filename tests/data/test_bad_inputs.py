"""Bad dataset inputs: 16-bit images, mask/image size mismatch, missing masks, truncated files in any split."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.data import PredictDataset as AnomalibPredictDataset
from anomalib.data.datasets.image.folder import FolderDataset
from anomalib.data.utils import Split
from anomalib.data.utils import read_image as anomalib_read_image
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_recon.data import (
    ELPV,
    DatasetError,
    MagneticTile,
    MultiCategory,
    PredictDataset,
    check_image_files,
    read_image,
)
from anomalib_recon.data.magnetic_tile import CheckedFolderDataset
from tests.data.conftest import write_tree

DEFECTS = [("blowhole", 1), ("break", 1), ("crack", 2), ("fray", 1), ("uneven", 1)]


def to_16bit(path: Path) -> None:
    """Rewrite an 8-bit grayscale PNG as 16-bit with the same intensities (v -> v * 257)."""
    array = np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == "I;16"


def sixteen_bit_tree(root: Path, **kwargs) -> Path:
    """A PNG tree whose images (not masks) are 16-bit."""
    base = write_tree(root, **kwargs)
    for path in sorted((base / "train").rglob("*.png")) + sorted((base / "test").rglob("*.png")):
        to_16bit(path)
    return base


def truncate(path: Path, keep: float = 0.6) -> None:
    """Keep the header and part of the data (as a copy interrupted mid-file)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------------------------
# 16-bit images
# --------------------------------------------------------------------------------------------------------------
def test_read_image_scales_16bit_like_8bit(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    # the bug being fixed: anomalib clips every value above 255/65535 to white
    assert np.array_equal(anomalib_read_image(tmp_path / "g16.png")[..., 0], (gray > 0).astype(float))
    ours, reference = read_image(tmp_path / "g16.png", as_tensor=True), read_image(tmp_path / "g8.png", as_tensor=True)
    assert ours.shape == reference.shape == (3, 12, 10) and ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.equal(reference, anomalib_read_image(tmp_path / "g8.png", as_tensor=True))  # 8-bit unchanged
    array = read_image(tmp_path / "g16.png")
    assert array.shape == (12, 10, 3) and np.allclose(array, gray[..., None] / 255.0, atol=1e-6)
    # values between 8-bit steps are kept, not rounded: 65535 levels
    Image.fromarray(np.array([[0, 1, 32768, 65535]], np.uint16)).save(tmp_path / "fine.png")
    fine = read_image(tmp_path / "fine.png", as_tensor=True)[0, 0]
    assert torch.allclose(fine, torch.tensor([0, 1 / 65535, 32768 / 65535, 1.0]), atol=1e-7)


def test_read_image_16bit_rgb_and_refused_modes(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgb8 = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgb16.png"), (rgb8.astype(np.uint16) * 257)[..., ::-1])  # BGR on disk
    assert torch.allclose(
        read_image(tmp_path / "rgb16.png", as_tensor=True),
        torch.from_numpy(rgb8).permute(2, 0, 1).float() / 255,
        atol=1 / 255,
    )
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"float\.tif.*floating-point.*8-bit or 16-bit PNG"):
        read_image(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"float\.tif.*floating-point"):
        check_image_files([tmp_path / "float.tif"], what="X")
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(DatasetError, match=r"int32\.tif.*0\.\.70000"):
        read_image(tmp_path / "int32.tif")


def test_magnetic_tile_reads_16bit_like_8bit(tmp_path):
    kwargs = {"defects": DEFECTS, "ext": ".png", "vary_size": True}
    eight = write_tree(tmp_path / "8", **kwargs)
    sixteen = sixteen_bit_tree(tmp_path / "16", **kwargs)
    datamodules = [MagneticTile(root=r, num_workers=0, augmentations=Resize((16, 16))) for r in (eight, sixteen)]
    for datamodule in datamodules:
        datamodule.setup()
    for split in ("train_data", "test_data"):
        a, b = getattr(datamodules[0], split), getattr(datamodules[1], split)
        for i in range(len(a)):
            assert torch.allclose(a[i].image, b[i].image, atol=1 / 255)
            assert float(b[i].image.mean()) < 0.9  # not all white
    anomalous = int(datamodules[1].test_data.samples.index[datamodules[1].test_data.samples.label_index == 1][0])
    assert torch.equal(datamodules[0].test_data[anomalous].gt_mask, datamodules[1].test_data[anomalous].gt_mask)


def test_synthetic_val_split_refuses_16bit(tmp_path):
    """anomalib's synthetic validation set reads the training images with its own (clipping) reader."""
    root = sixteen_bit_tree(tmp_path, defects=DEFECTS)
    with pytest.raises(DatasetError, match=r"val_split_mode='synthetic'.*train/good/000\.png' as white"):
        MagneticTile(root=root, val_split_mode="synthetic").setup()
    MagneticTile(root=root, val_split_mode="from_test", seed=0).setup()  # ours reads them: fine


def test_multi_category_and_elpv_read_16bit(tmp_path):
    sixteen_bit_tree(tmp_path / "root", category="a")
    write_tree(tmp_path / "root", category="b")
    datamodule = MultiCategory(root=tmp_path / "root", categories=["a", "b"], num_workers=0)
    datamodule.setup()
    images = torch.stack([datamodule.train_data[i].image for i in range(len(datamodule.train_data))])
    assert float(images.amax()) < 0.9  # gray noise 100..139 in both categories, none read as white
    # ELPV: labels.csv + 16-bit cells
    elpv = tmp_path / "elpv"
    (elpv / "images").mkdir(parents=True)
    rows, rng = [], np.random.default_rng(2)
    for i, p in enumerate([0.0] * 5 + [1.0] * 2):
        Image.fromarray(rng.integers(20000, 40000, (8, 8)).astype(np.uint16)).save(elpv / f"images/cell{i:04d}.png")
        rows.append(f"images/cell{i:04d}.png {p} mono")
    (elpv / "labels.csv").write_text("\n".join(rows) + "\n")
    datamodule = ELPV(root=elpv, cell_type="mono", num_workers=0)
    datamodule.setup()
    item = datamodule.test_data[0]
    expected = np.asarray(Image.open(item.image_path), np.float32) / 65535
    assert torch.allclose(item.image[0], torch.from_numpy(expected), atol=1e-6)


def test_checked_dataset_matches_anomalib_on_8bit(make_tree):
    """Our item loading is anomalib's (same tensors, masks, labels, augmentation calls) on ordinary images."""
    root = make_tree(defects=[("scratch", 2)], vary_size=True)
    kwargs = {
        "name": "t",
        "root": root,
        "normal_dir": "train/good",
        "abnormal_dir": "test/scratch",
        "normal_test_dir": "test/good",
        "mask_dir": "ground_truth/scratch",
        "augmentations": Resize((20, 20)),
    }
    for split in (Split.TRAIN, Split.TEST):
        ours, reference = CheckedFolderDataset(split=split, **kwargs), FolderDataset(split=split, **kwargs)
        assert len(ours) == len(reference) > 0
        for i in range(len(ours)):
            a, b = ours[i], reference[i]
            assert torch.equal(a.image, b.image) and type(a.image) is type(b.image)
            assert torch.equal(a.gt_mask, b.gt_mask) and type(a.gt_mask) is type(b.gt_mask)
            assert torch.equal(a.gt_label, b.gt_label)
            assert (a.image_path, a.mask_path) == (b.image_path, b.mask_path)


def test_predict_dataset_reads_16bit_and_checks_files(tmp_path):
    (tmp_path / "p8").mkdir()
    gray = np.random.default_rng(3).integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "p8" / "x.png")
    shutil.copytree(tmp_path / "p8", tmp_path / "p16")
    to_16bit(tmp_path / "p16" / "x.png")
    # what plain `anomalib predict --data <folder>` gets: a white image
    white = (torch.from_numpy(gray) > 0).float()
    assert torch.equal(AnomalibPredictDataset(tmp_path / "p16")[0].image[0], white)
    ours = PredictDataset(tmp_path / "p16", transform=Resize((8, 8)))[0]
    reference = AnomalibPredictDataset(tmp_path / "p8", transform=Resize((8, 8)))[0]
    assert ours.image.shape == (3, 8, 8)
    assert torch.allclose(ours.image, reference.image, atol=1e-6)
    assert ours.image_path == str(tmp_path / "p16" / "x.png")
    truncate(tmp_path / "p16" / "x.png")
    with pytest.raises(DatasetError, match=r"p16/x\.png.*not a readable image"):
        PredictDataset(tmp_path / "p16")
    with pytest.raises(DatasetError, match="does not exist"):
        PredictDataset(tmp_path / "nowhere")


def test_predict_dataset_from_cli_arguments(tmp_path):
    """`anomalib predict --data anomalib_recon.data.PredictDataset --data.path <folder>` builds ours."""
    from anomalib.data import AnomalibDataModule
    from jsonargparse import ArgumentParser
    from torch.utils.data import DataLoader, Dataset

    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "a.png")
    parser = ArgumentParser()
    parser.add_argument("--data", type=Dataset | AnomalibDataModule | DataLoader | str | Path, required=True)
    config = parser.parse_args(["--data", "anomalib_recon.data.PredictDataset", "--data.path", str(tmp_path)])
    dataset = parser.instantiate_classes(config).data
    assert isinstance(dataset, PredictDataset) and len(dataset) == 1


@pytest.mark.slow
def test_engine_predict_16bit_scores_equal_8bit(tmp_path):
    """Padim fitted on 8-bit data scores a 16-bit copy of the test images exactly as the 8-bit originals."""
    from anomalib.engine import Engine
    from anomalib.models import Padim

    root = write_tree(tmp_path / "data", n_train=4)
    datamodule = Folder(
        name="t", root=root, normal_dir="train/good", abnormal_dir="test/scratch", normal_test_dir="test/good",
        train_batch_size=4, eval_batch_size=4, num_workers=0,
    )  # fmt: skip
    model = Padim(
        backbone="resnet18",
        layers=["layer1"],
        pre_trained=False,
        n_features=8,
        pre_processor=Padim.configure_pre_processor((32, 32)),
        visualizer=False,
    )
    engine = Engine(
        accelerator="cpu", max_epochs=1, default_root_dir=tmp_path / "results", logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    shutil.copytree(root / "test" / "scratch", tmp_path / "p16")
    for path in (tmp_path / "p16").iterdir():
        to_16bit(path)

    def scores(dataset: torch.utils.data.Dataset) -> torch.Tensor:
        return torch.cat([batch.pred_score for batch in engine.predict(model, dataset=dataset)])

    reference = scores(PredictDataset(root / "test" / "scratch"))
    assert torch.allclose(scores(PredictDataset(tmp_path / "p16")), reference, atol=1e-4)
    assert not torch.allclose(scores(AnomalibPredictDataset(tmp_path / "p16")), reference, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------
# Masks: size mismatch and missing masks
# --------------------------------------------------------------------------------------------------------------
def test_mask_size_mismatch_named(make_tree, tmp_path):
    root = make_tree(defects=DEFECTS, ext=".jpg", size=(24, 32))
    mask = root / "ground_truth" / "crack" / "001_mask.png"
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(mask)
    with pytest.raises(DatasetError, match=r"001_mask\.png' is 64x48.*crack/001\.jpg' is 32x24.*stretch"):
        MagneticTile(root=root).setup()
    # the same pair in MultiCategory, by root and through an anomalib Folder child
    category = tmp_path / "multi" / "a"
    shutil.copytree(root, category)
    shutil.rmtree(category / "test" / "good")  # test/good is optional in the MVTec-style layout
    with pytest.raises(DatasetError, match=r"MultiCategory: mask .*a/ground_truth/crack/001_mask\.png' is 64x48"):
        MultiCategory(root=tmp_path / "multi", categories=["a"]).setup()
    child = Folder(
        name="a", root=category, normal_dir="train/good", abnormal_dir="test/crack", mask_dir="ground_truth/crack"
    )
    with pytest.raises(DatasetError, match=r"001_mask\.png' is 64x48.*001\.jpg' is 32x24"):
        MultiCategory(datamodules=[child]).setup()


def test_defect_image_without_mask_named(make_tree, tmp_path):
    root = make_tree(defects=DEFECTS, ext=".jpg")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    pattern = r"1 defect image\(s\) have no mask, e\.g\. '.*test/crack/001\.jpg': expected 001_mask\.png "
    pattern += r".*ground_truth/crack'"
    with pytest.raises(DatasetError, match=pattern):
        MagneticTile(root=root).prepare_data()
    with pytest.raises(DatasetError, match=pattern):
        MagneticTile(root=root).setup()
    # a mask without its image is named too
    shutil.copy(root / "ground_truth" / "crack" / "000_mask.png", root / "ground_truth" / "crack" / "001_mask.png")
    shutil.copy(root / "ground_truth" / "crack" / "000_mask.png", root / "ground_truth" / "crack" / "007_mask.png")
    with pytest.raises(DatasetError, match=r"mask\(s\) have no defect image, e\.g\. '.*crack/007_mask\.png'"):
        MagneticTile(root=root).setup()
    # MultiCategory: MVTec-style root, an anomalib Folder child and an MVTecAD child (PNG layout)
    make_tree("a", root=tmp_path / "mvtec")
    (tmp_path / "mvtec" / "a" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    pattern = r"Category 'a': 1 defect image\(s\) have no mask, e\.g\. '.*a/test/scratch/000\.png'"
    with pytest.raises(DatasetError, match=pattern):
        MultiCategory(root=tmp_path / "mvtec", categories=["a"]).setup()
    base = tmp_path / "mvtec" / "a"
    folder = Folder(
        name="a", root=base, normal_dir="train/good", abnormal_dir="test/scratch", mask_dir="ground_truth/scratch"
    )
    for child in (folder, MVTecAD(root=tmp_path / "mvtec", category="a")):
        with pytest.raises(DatasetError, match=pattern):
            MultiCategory(datamodules=[child]).setup()
    shutil.rmtree(base / "ground_truth" / "scratch")  # MVTecAD needs masks for every defect folder
    with pytest.raises(DatasetError, match=r"2 defect image\(s\) have no mask.*ground_truth/scratch'"):
        MultiCategory(datamodules=[MVTecAD(root=tmp_path / "mvtec", category="a")]).setup()


# --------------------------------------------------------------------------------------------------------------
# Truncated files in any split
# --------------------------------------------------------------------------------------------------------------
def test_truncated_jpeg_passes_verify_but_not_setup(make_tree):
    root = make_tree(defects=DEFECTS, ext=".jpg", size=(96, 96))  # large enough to cut the data, not the header
    bad = root / "test" / "good" / "001.jpg"
    truncate(bad, keep=0.8)
    with Image.open(bad) as image:
        image.verify()  # why a decode is needed: PIL's verify() accepts a truncated JPEG
    with pytest.raises(DatasetError, match=r"test/good/001\.jpg' is not a readable image, truncated"):
        MagneticTile(root=root).setup()


@pytest.mark.parametrize(("split", "ext"), [("train/good", ".png"), ("test/good", ".jpg"), ("test/scratch", ".png")])
def test_truncated_file_in_any_split_of_multi_category(tmp_path, split, ext):
    base = write_tree(tmp_path, "a", ext=ext, size=(96, 96))
    bad = sorted((base / split).iterdir())[0]
    truncate(bad, keep=0.8)  # JPEG: the cut is in the entropy-coded data, which verify() does not read
    with pytest.raises(DatasetError, match=rf"{split}/{bad.name}' is not a readable image"):
        MultiCategory(root=tmp_path, categories=["a"]).setup()


def test_truncated_cell_in_elpv_test_split(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i, p in enumerate([0.0] * 5 + [1.0] * 2):
        noise = np.random.default_rng(i).integers(0, 256, (96, 96)).astype(np.uint8)
        Image.fromarray(noise).save(tmp_path / f"images/c{i}.jpg", quality=90)
        rows.append(f"images/c{i}.jpg {p} mono")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    datamodule = ELPV(root=tmp_path, cell_type="mono")
    datamodule.setup()
    bad = Path(datamodule.test_data.samples.image_path[0])
    truncate(bad, keep=0.8)
    with pytest.raises(DatasetError, match=rf"{bad.name}' is not a readable image"):
        ELPV(root=tmp_path, cell_type="mono").setup()


def test_check_image_files_decode_modes(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.bmp")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.jpg")
    assert check_image_files([tmp_path / "ok.bmp", tmp_path / "ok.jpg"], decode="all") == {
        str(tmp_path / "ok.bmp"): (8, 8),
        str(tmp_path / "ok.jpg"): (8, 8),
    }
    truncate(tmp_path / "ok.bmp")  # formats other than PNG/JPEG are always decoded
    with pytest.raises(DatasetError, match=r"ok\.bmp"):
        check_image_files([tmp_path / "ok.bmp"])
    with pytest.raises(ValueError, match="decode must be"):
        check_image_files([], decode="some")
