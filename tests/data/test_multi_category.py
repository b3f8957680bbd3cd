"""MultiCategory datamodule and per-category metrics."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import Folder
from anomalib.metrics import AUROC, F1Score

from anomalib_recon.data import (
    DatasetError,
    DatasetNotFoundError,
    MultiCategory,
    PerCategoryMetrics,
    per_category_metrics,
)


@pytest.fixture
def two_categories(make_tree, tmp_path):
    make_tree("a", n_train=4, n_good=2, defects=[("scratch", 2)], seed=0)
    make_tree("b", n_train=3, n_good=1, defects=[("dent", 1), ("hole", 2)], ext=".jpg", seed=1)
    return tmp_path


def test_union_of_categories(two_categories):
    datamodule = MultiCategory(root=two_categories, categories=["a", "b"], num_workers=0, eval_batch_size=16)
    datamodule.setup()
    assert datamodule.name == two_categories.name
    assert datamodule.task == "segmentation"
    train, test = datamodule.train_data.samples, datamodule.test_data.samples
    assert len(train) == 4 + 3 and (train.label_index == 0).all()
    assert train.groupby("category").size().to_dict() == {"a": 4, "b": 3}
    assert test.groupby(["category", "label_index"]).size().to_dict() == {
        ("a", 0): 2,
        ("a", 1): 2,
        ("b", 0): 1,
        ("b", 1): 3,
    }
    assert len(datamodule.val_data) == len(test)
    for path, category in zip(test.image_path, test.category, strict=True):
        assert datamodule.category_of(path) == category
        assert Path(path).parts[-4] == category
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[:2] == (8, 3)
    assert int(batch.gt_mask.flatten(1).any(1).sum()) == 5
    with pytest.raises(DatasetError, match="not an image"):
        datamodule.category_of("/elsewhere/x.png")


def test_datamodules_mixed_tasks(make_tree, tmp_path):
    seg = make_tree("seg", seed=0)
    cls = make_tree("cls", masks=False, seed=1)
    children = [
        Folder(name="seg", root=seg, normal_dir="train/good", normal_test_dir="test/good",
               abnormal_dir="test/scratch", mask_dir="ground_truth/scratch"),
        Folder(name="cls", root=cls, normal_dir="train/good", normal_test_dir="test/good", abnormal_dir="test/scratch"),
    ]  # fmt: skip
    datamodule = MultiCategory(datamodules=children, num_workers=0)
    datamodule.setup()
    assert datamodule.categories == ["seg", "cls"]
    assert datamodule.name == "MultiCategory"
    assert datamodule.task == "classification"  # masks dropped: not every category has them
    assert (datamodule.test_data.samples.mask_path == "").all()
    assert datamodule.test_data[0].gt_mask is None
    # the children's own val split modes are not applied: their whole test sets are used
    assert len(datamodule.test_data) == 2 * (2 + 2)
    renamed = MultiCategory(datamodules=children, category_names=["x", "y"])
    renamed.setup()
    assert set(renamed.test_data.samples.category) == {"x", "y"}


def test_bad_configuration(two_categories):
    with pytest.raises(ValueError, match="exactly one of"):
        MultiCategory()
    with pytest.raises(ValueError, match="unique"):
        MultiCategory(root=two_categories, categories=["a", "a"])
    with pytest.raises(ValueError, match="unique and not 'mean'"):
        MultiCategory(root=two_categories, categories=["a", "b"], category_names=["mean", "b"])
    with pytest.raises(TypeError, match="anomalib datamodules"):
        MultiCategory(datamodules=["a"])
    with pytest.raises(DatasetNotFoundError, match=r"Category 'c'.*does not exist.*MVTec-style layout"):
        MultiCategory(root=two_categories, categories=["a", "c"]).setup()
    with pytest.raises(DatasetNotFoundError, match="MultiCategory root"):
        MultiCategory(root=two_categories / "missing", categories=["a"]).setup()


def test_empty_and_corrupt_category(two_categories):
    for f in (two_categories / "b" / "test" / "hole").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"Category 'b'.*Found 0"):
        MultiCategory(root=two_categories, categories=["a", "b"]).setup()
    shutil.rmtree(two_categories / "b" / "test" / "hole")
    shutil.rmtree(two_categories / "b" / "ground_truth" / "hole")
    (two_categories / "a" / "test" / "good" / "001.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"001\.png.*not a readable image"):
        MultiCategory(root=two_categories, categories=["a", "b"]).setup()


def test_per_category_metrics_known_values():
    categories = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    gt_label = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1])
    pred_score = torch.tensor([0.1, 0.2, 0.8, 0.9, 0.9, 0.8, 0.2, 0.1, 0.1, 0.6, 0.5, 0.9])
    pred_label = pred_score > 0.55
    results = per_category_metrics(categories, pred_score=pred_score, gt_label=gt_label, pred_label=pred_label)
    # a: perfect ranking; b: inverted; c: pairs (n,p) correctly ordered 3 of 4
    assert results["a/image_AUROC"] == pytest.approx(1.0)
    assert results["b/image_AUROC"] == pytest.approx(0.0)
    assert results["c/image_AUROC"] == pytest.approx(0.75)
    assert results["mean/image_AUROC"] == pytest.approx((1.0 + 0.0 + 0.75) / 3)
    # F1 with pred_label: a 1.0, b 0 (no true positive), c tp=1 fp=1 fn=1 -> 0.5
    assert results["a/image_F1Score"] == pytest.approx(1.0)
    assert results["b/image_F1Score"] == pytest.approx(0.0)
    assert results["c/image_F1Score"] == pytest.approx(0.5)
    assert results["mean/image_F1Score"] == pytest.approx(0.5)
    assert not any(key.endswith("pixel_AUROC") for key in results)  # no masks given


def test_per_category_metrics_pixel_and_one_class():
    masks = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    masks[1, 0, :2] = True
    masks[3, 0, 2:] = True
    anomaly_map = masks.float() * 0.8 + 0.1
    anomaly_map[3] = 1 - anomaly_map[3]  # b's map is inverted
    results = per_category_metrics(
        ["a", "a", "b", "b"],
        metrics=[AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_")],
        anomaly_map=anomaly_map,
        gt_mask=masks,
    )
    assert results == pytest.approx({"a/pixel_AUROC": 1.0, "b/pixel_AUROC": 0.0, "mean/pixel_AUROC": 0.5})
    # a category whose labels hold one class has no AUROC and does not enter the mean
    results = per_category_metrics(
        ["a", "a", "b"], pred_score=torch.tensor([0.1, 0.9, 0.3]), gt_label=torch.tensor([0, 1, 1])
    )
    assert results == pytest.approx({"a/image_AUROC": 1.0, "mean/image_AUROC": 1.0})
    with pytest.raises(ValueError, match="must match"):
        per_category_metrics(["a"], pred_score=torch.zeros(2), gt_label=torch.zeros(2))
    with pytest.raises(ValueError, match="reserved"):
        per_category_metrics(["mean"], pred_score=torch.zeros(1), gt_label=torch.zeros(1))


class _Batch(SimpleNamespace):
    pass


def test_callback_scores_batches_after_post_processing():
    """The callback must see values changed in place after its own hook (the post-processor runs later)."""
    logged = {}
    lookup = {"x0": "a", "x1": "a", "x2": "b", "x3": "b", "x4": "a", "x5": "b"}
    callback = PerCategoryMetrics(
        metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_"), F1Score(fields=["pred_label", "gt_label"])]
    )
    trainer = SimpleNamespace(datamodule=SimpleNamespace(category_of=lookup.__getitem__), barebones=False)
    module = SimpleNamespace(log=lambda key, value: logged.__setitem__(key, value))
    callback.on_test_start(trainer, module)
    batches = [
        _Batch(image_path=["x0", "x1", "x2"], gt_label=torch.tensor([0, 1, 0]), pred_score=torch.full((3,), 9.0)),
        _Batch(image_path=["x3", "x4", "x5"], gt_label=torch.tensor([1, 0, 1]), pred_score=torch.zeros(3)),
    ]
    final_scores = [torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0.7, 0.3, 0.6])]
    for i, batch in enumerate(batches):
        callback.on_test_batch_end(trainer, module, batch, batch, i)
        batch.pred_score = final_scores[i]  # what the post-processor does after our hook
        batch.pred_label = final_scores[i] > 0.5
    callback.on_test_epoch_end(trainer, module)
    # a: x0 n .1, x1 p .9, x4 n .3 -> AUROC 1; b: x2 n .2, x3 p .7, x5 p .6 -> AUROC 1
    assert logged["a/image_AUROC"] == pytest.approx(1.0)
    assert logged["b/image_AUROC"] == pytest.approx(1.0)
    assert logged["mean/F1Score"] == pytest.approx(1.0)
    assert callback.results == logged
    with pytest.raises(TypeError, match="category_fn"):
        PerCategoryMetrics().on_test_start(SimpleNamespace(datamodule=None), SimpleNamespace(evaluator=None))


@pytest.mark.slow
def test_engine_logs_per_category_and_mean(two_categories):
    """Padim (random backbone) through anomalib's Engine: per-category keys appear and the mean is their mean."""
    from anomalib.engine import Engine
    from anomalib.models import Padim

    datamodule = MultiCategory(
        root=two_categories, categories=["a", "b"], train_batch_size=4, eval_batch_size=3, num_workers=0
    )
    model = Padim(
        backbone="resnet18",
        layers=["layer1"],
        pre_trained=False,
        n_features=16,
        pre_processor=Padim.configure_pre_processor((32, 32)),
        visualizer=False,
    )
    engine = Engine(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=two_categories / "results",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    (results,) = engine.test(model, datamodule=datamodule)
    for metric in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
        assert metric in results
        per_category = [results[f"{c}/{metric}"] for c in ("a", "b")]
        assert results[f"mean/{metric}"] == pytest.approx(sum(per_category) / 2, abs=1e-6)
    callbacks = [cb for cb in engine.trainer.callbacks if isinstance(cb, PerCategoryMetrics)]
    assert len(callbacks) == 1  # attached once across fit and test
    # per-category values agree with an independent computation on the predictions
    predictions = engine.predict(model, datamodule=datamodule)
    paths = [p for batch in predictions for p in batch.image_path]
    expected = per_category_metrics(
        [datamodule.category_of(p) for p in paths],
        metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")],
        pred_score=torch.cat([b.pred_score for b in predictions]),
        gt_label=torch.cat([b.gt_label for b in predictions]),
    )
    assert results["a/image_AUROC"] == pytest.approx(expected["a/image_AUROC"], abs=1e-6)
    assert results["b/image_AUROC"] == pytest.approx(expected["b/image_AUROC"], abs=1e-6)


def test_cli_config_with_nested_datamodules(two_categories, tmp_path):
    from anomalib.data import AnomalibDataModule
    from jsonargparse import ArgumentParser

    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  class_path: anomalib_recon.data.MultiCategory\n"
        "  init_args:\n"
        "    num_workers: 0\n"
        "    datamodules:\n"
        "      - class_path: MVTec\n"
        f"        init_args: {{root: '{two_categories}', category: a}}\n"
        "      - class_path: anomalib.data.Folder\n"
        f"        init_args: {{name: bee, root: '{two_categories / 'b'}', normal_dir: train/good,"
        " abnormal_dir: test/hole, normal_test_dir: test/good}\n"
    )
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_subclass_arguments(AnomalibDataModule, "data", fail_untyped=False)
    datamodule = parser.instantiate_classes(parser.parse_args(["--config", str(config)])).data
    assert isinstance(datamodule, MultiCategory)
    assert datamodule.categories == ["a", "bee"]
    datamodule.setup()
    assert len(datamodule.train_data) == 4 + 3
    short = parser.parse_args(
        ["--data", "MultiCategory", "--data.root", str(two_categories), "--data.categories", "[b]"]
    )
    assert parser.instantiate_classes(short).data.categories == ["b"]
