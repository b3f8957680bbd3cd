"""ELPV datamodule: label rule, splits, determinism, batches, errors."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import Resize

pytest.importorskip("elpv_dataset")

from anomalib_recon.data import ELPV, DatasetError, DatasetNotFoundError, default_elpv_root, make_elpv_dataset


@pytest.fixture(scope="module")
def labels() -> dict[str, np.ndarray]:
    """labels.csv read independently of the code under test (as the package's own loader does)."""
    data = np.genfromtxt(
        default_elpv_root() / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"]
    )
    return {"path": np.char.decode(data["path"]), "p": data["probability"], "type": np.char.decode(data["type"])}


@pytest.mark.parametrize("cell_type", ["mono", "poly", "both"])
def test_split_counts_follow_label_rule(labels, cell_type):
    samples = make_elpv_dataset(default_elpv_root(), cell_type=cell_type)
    chosen = np.isin(labels["type"], ["mono", "poly"] if cell_type == "both" else [cell_type])
    p = labels["p"][chosen]
    n_normal, n_defective = int((p == 0).sum()), int((p >= 0.5).sum())
    train = samples[samples.split == "train"]
    test = samples[samples.split == "test"]
    assert (train.label_index == 0).all()
    assert set(test.label_index) == {0, 1}
    assert int((test.label_index == 1).sum()) == n_defective
    # 20 % of each type's normal cells are held out (rounded per type).
    types = ["mono", "poly"] if cell_type == "both" else [cell_type]
    n_test_normal = sum(round(0.2 * int(((labels["type"] == t) & (labels["p"] == 0)).sum())) for t in types)
    assert int((test.label_index == 0).sum()) == n_test_normal
    assert len(train) + n_test_normal == n_normal
    # the 1/3 "possibly defective" cells are left out by default
    assert len(samples) == n_normal + n_defective
    assert (samples.defect_probability[samples.label_index == 1] >= 0.5).all()
    assert set(samples.cell_type) == set(types)
    assert samples.image_path.is_unique


def test_documented_counts():
    counts = {}
    for cell_type in ("mono", "poly", "both"):
        s = make_elpv_dataset(default_elpv_root(), cell_type=cell_type)
        counts[cell_type] = (
            int((s.split == "train").sum()),
            int(((s.split == "test") & (s.label_index == 0)).sum()),
            int((s.label_index == 1).sum()),
        )
    assert counts == {"mono": (470, 118, 369), "poly": (736, 184, 452), "both": (1206, 302, 821)}


def test_include_uncertain_and_threshold(labels):
    root = default_elpv_root()
    n_uncertain = int(((labels["p"] > 0) & (labels["p"] < 0.5)).sum())
    base = make_elpv_dataset(root)
    with_uncertain = make_elpv_dataset(root, include_uncertain=True)
    assert int((with_uncertain.label_index == 1).sum()) == int((base.label_index == 1).sum()) + n_uncertain
    strict = make_elpv_dataset(root, defect_threshold=1.0)
    assert int((strict.label_index == 1).sum()) == int((labels["p"] == 1).sum())
    # 0.6667 is read as 2/3 despite the decimals in labels.csv
    two_thirds = make_elpv_dataset(root, defect_threshold=0.6667)
    assert int((two_thirds.label_index == 1).sum()) == int((labels["p"] > 0.5).sum())
    # normal train cells do not depend on the anomaly rule
    assert list(base[base.split == "train"].image_path) == list(strict[strict.split == "train"].image_path)


def test_split_is_deterministic_and_per_type():
    root = default_elpv_root()

    def train_paths(**kw):
        s = make_elpv_dataset(root, **kw)
        return set(s[s.split == "train"].image_path)

    assert train_paths(seed=3) == train_paths(seed=3)
    assert train_paths(seed=3) != train_paths(seed=4)
    # the mono part of "both" is split exactly as cell_type="mono"
    assert train_paths(cell_type="both", seed=3) == train_paths(cell_type="mono", seed=3) | train_paths(
        cell_type="poly", seed=3
    )


def test_subsets():
    root = default_elpv_root()
    full = make_elpv_dataset(root, cell_type="mono")
    small = make_elpv_dataset(root, cell_type="mono", max_train_images=10, max_test_images=9)
    train, test = small[small.split == "train"], small[small.split == "test"]
    assert len(train) == 10 and len(test) == 9
    assert set(test.label_index) == {0, 1}
    assert set(small.image_path) <= set(full.image_path)
    assert small.equals(make_elpv_dataset(root, cell_type="mono", max_train_images=10, max_test_images=9))


def test_datamodule_batches():
    datamodule = ELPV(
        cell_type="poly",
        max_train_images=4,
        max_test_images=6,
        train_batch_size=4,
        eval_batch_size=6,
        num_workers=0,
        augmentations=Resize((64, 64)),
    )
    datamodule.setup()
    assert datamodule.task == "classification"
    assert datamodule.category == "poly" and datamodule.name == "ELPV"
    assert len(datamodule.train_data) == 4 and len(datamodule.test_data) == 6
    assert len(datamodule.val_data) == 6  # same_as_test
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (4, 3, 64, 64)
    assert batch.image.dtype == torch.float32
    assert float(batch.image.min()) >= 0.0 and float(batch.image.max()) <= 1.0
    assert not batch.gt_label.any()
    assert batch.gt_mask is None
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch.gt_label.dtype == torch.bool
    assert set(test_batch.gt_label.tolist()) == {False, True}
    # grayscale cells are replicated to 3 identical channels
    assert torch.equal(test_batch.image[:, 0], test_batch.image[:, 2])


def test_native_resolution_item():
    datamodule = ELPV(cell_type="mono", max_train_images=1, max_test_images=2, num_workers=0)
    datamodule.setup()
    item = datamodule.train_data[0]
    assert item.image.shape == (3, 300, 300)
    assert item.gt_label.item() == 0


def test_cli_parses_short_and_full_class_path():
    from anomalib.data import AnomalibDataModule
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data", fail_untyped=False)
    for class_path in ("anomalib_recon.data.ELPV", "ELPV"):
        config = parser.parse_args(["--data", class_path, "--data.cell_type", "mono", "--data.max_train_images", "8"])
        datamodule = parser.instantiate_classes(config).data
        assert isinstance(datamodule, ELPV)
        assert datamodule.cell_type == "mono" and datamodule.max_train_images == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "ELPV", "--data.cell_type", "cigs"])


def test_missing_package_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "elpv_dataset" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r'pip install "anomalib-recon\[data\]"'):
        ELPV()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"cell_type": "cigs"}, ValueError),
        ({"defect_threshold": 0.0}, ValueError),
        ({"test_split_ratio": 1.0}, ValueError),
        ({"max_test_images": 1}, ValueError),
        ({"seed": None}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        ELPV(**kwargs)


def test_bad_roots(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ELPV(root=tmp_path / "missing").setup()
    with pytest.raises(DatasetNotFoundError, match=r"labels\.csv"):
        ELPV(root=tmp_path).setup()
    (tmp_path / "labels.csv").write_text("not an elpv file\n")
    with pytest.raises(DatasetError, match="not an ELPV label file"):
        ELPV(root=tmp_path).prepare_data()


def test_corrupt_and_missing_images(tmp_path):
    source = default_elpv_root()
    rows = [line for line in (source / "labels.csv").read_text().splitlines() if line.strip()]
    normal = [r for r in rows if float(r.split()[1]) == 0 and r.split()[2] == "mono"][:5]
    defective = [r for r in rows if float(r.split()[1]) == 1 and r.split()[2] == "mono"][:2]
    (tmp_path / "images").mkdir()
    for row in normal + defective:
        shutil.copy(source / row.split()[0], tmp_path / row.split()[0])
    (tmp_path / "labels.csv").write_text("\n".join(normal + defective) + "\n")
    datamodule = ELPV(root=tmp_path, cell_type="mono", num_workers=0)
    datamodule.setup()
    assert len(datamodule.train_data) == 4 and len(datamodule.test_data) == 3

    corrupt = tmp_path / defective[0].split()[0]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=f"{Path(corrupt).name}.*not a readable image"):
        ELPV(root=tmp_path, cell_type="mono").setup()
    corrupt.unlink()
    with pytest.raises(DatasetNotFoundError, match=f"missing, e.g. .*{Path(corrupt).name}"):
        ELPV(root=tmp_path, cell_type="mono").setup()
    with pytest.raises(DatasetError, match="no defective test cells"):
        ELPV(root=tmp_path, cell_type="poly").setup()


def test_val_split_from_test():
    datamodule = ELPV(cell_type="mono", max_train_images=4, max_test_images=20, val_split_mode="from_test", seed=1)
    datamodule.setup()
    val, test = datamodule.val_data.samples, datamodule.test_data.samples
    assert len(val) + len(test) == 20
    assert set(val.image_path).isdisjoint(test.image_path)
    assert set(val.label_index) == {0, 1} and set(test.label_index) == {0, 1}


def test_in_multi_category_with_folder_data(make_tree):
    from anomalib_recon.data import MagneticTile, MultiCategory

    tile = make_tree(defects=[(d, 1) for d in ("blowhole", "break", "crack", "fray", "uneven")], ext=".jpg")
    datamodule = MultiCategory(
        datamodules=[ELPV(cell_type="mono", max_train_images=3, max_test_images=4), MagneticTile(root=tile)],
        num_workers=0,
        eval_batch_size=8,
    )
    datamodule.setup()
    assert datamodule.categories == ["mono", "magnetic_tile"]
    assert datamodule.task == "classification"  # ELPV has no masks
    assert datamodule.train_data.samples.groupby("category").size().to_dict() == {"magnetic_tile": 4, "mono": 3}
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[:2] == (8, 3)
    assert {datamodule.category_of(p) for p in batch.image_path} == {"mono", "magnetic_tile"}
