"""benchmarks/pnpt_multiclass.py and pnpt_shortcut.py on a tiny two-category set (no real dataset)."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.conftest import load_script
from tests.models.test_pnpt import multi, two_classes  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY_ARGS = {"embed_dim_per_scale": 16, "depth": 1, "decoder_depth": 1, "num_heads": 2, "warmup_epochs": 0}


@pytest.fixture(scope="module")
def scripts() -> tuple:
    return load_script("pnpt_multiclass"), load_script("pnpt_shortcut")


def test_multiclass_row_has_per_category_metrics_and_class_inference(scripts, two_classes, tmp_path, monkeypatch):  # noqa: F811
    multiclass, _ = scripts
    monkeypatch.setattr(multiclass, "build_multi_datamodule", lambda args: multi(two_classes))
    argv = ["--variants", "class", "--image-size", "64", "--max-steps", "2", "--batch-size", "4", "--workers", "0"]
    argv += ["--base-args", json.dumps(TINY_ARGS), "--work-dir", str(tmp_path), "--save-checkpoints", str(tmp_path)]
    argv += ["--single", "class"]
    row = multiclass.run_single(multiclass.parse(argv))
    assert row["classes"] == ["checker", "stripes"] and row["steps"] == 2
    for key in ("checker/image_AUROC", "stripes/image_AUROC", "mean/image_AUROC", "checker/pixel_AUROC"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["mean/image_AUROC"] == pytest.approx((row["checker/image_AUROC"] + row["stripes/image_AUROC"]) / 2)
    assert row["class_accuracy"] == 1.0  # ImageNet Lite0 keys tell checkerboards from stripes
    assert sum(sum(v.values()) for v in row["class_confusion"].values()) == 16
    assert (tmp_path / "class.ckpt").is_file()
    header = {"name": "tiny", "command": "x", "machine": {}, "categories": ["checker", "stripes"]}
    header |= {"backbone": "lite0", "image_size": 64, "max_steps": 2, "batch_size": 4, "seed": 0}
    markdown = multiclass.to_markdown([row], header)
    assert "checker/image_AUROC" in markdown and "| PNPT (class) |" in markdown


def test_shortcut_rows_per_stream_on_synthetic_and_real_anomalies(scripts, two_classes, tmp_path):  # noqa: F811
    import torch

    from tests.conftest import cpu_engine

    _, shortcut = scripts
    from anomalib_recon.models.image.pnpt import PNPT

    torch.manual_seed(0)
    model = PNPT(backbone="tf_efficientnet_lite0", image_size=64, visualizer=False, **TINY_ARGS)
    engine = cpu_engine(tmp_path / "run", max_steps=2)
    engine.fit(model, datamodule=multi(two_classes))
    ckpt = tmp_path / "class.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    datamodule = multi(two_classes)
    datamodule.setup()
    pairs = shortcut.synthetic_pairs(datamodule, ["checker", "stripes"], 3, (64, 64), seed=0)
    normal, anomalous, masks = pairs["checker"]
    assert normal.shape == anomalous.shape == (3, 3, 64, 64) and masks.shape == (3, 1, 64, 64)
    assert bool(masks.flatten(1).any(1).all())  # every image got an anomaly
    outside = ~masks.expand_as(normal)
    torch.testing.assert_close(anomalous[outside], normal[outside])  # pasted inside the mask only
    rows = shortcut.evaluate("class", str(ckpt), pairs, datamodule)
    assert [r["stream"] for r in rows] == ["both", "sample", "prompt"]
    by_stream = {r["stream"]: r for r in rows}
    assert by_stream["prompt"]["leak"] < by_stream["sample"]["leak"]
    for row in rows:
        assert row["contrast"] > 0 and 0 <= row["pixel_AUROC"] <= 1 and len(row["leak_per_scale"]) == 3
        assert set(row["per_category"]) == {"checker", "stripes"}
        assert set(row["real_test"]) == {"checker", "stripes"} and "pixel_AUROC" in row["real_test"]["checker"]
    assert rows[0]["class_inference"]["checker"]["normal"] == 1.0
    header = {"name": "t", "command": "x", "machine": {}, "categories": ["checker", "stripes"]}
    markdown = shortcut.to_markdown(rows, header | {"seed": 0, "images_per_category": 3})
    assert "Real test sets" in markdown and "| class (prompt) |" in markdown
