"""anomalib's own CLI with our models by short name: train, predict, export (slow, end to end).

Runs ``anomalib`` as a subprocess on a tiny generated MVTec-style dataset through the ``MVTec`` alias, with
a small random-init NAFRAD, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SMALL_NAFRAD = [
    "--model",
    "NAFRAD",
    "--model.backbone",
    "tf_efficientnet_lite0",
    "--model.layers",
    "[1, 2]",
    "--model.weights",
    "null",
    "--model.base_channels",
    "32",
    "--model.latent_channels",
    "32",
    "--model.seg_base_width",
    "8",
]


def _texture(rng: np.random.Generator, defect: bool) -> tuple[Image.Image, Image.Image]:
    base = (np.indices((256, 256)).sum(0) % 16 < 8).astype(np.float32) * 0.5 + 0.25
    image = np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1)
    mask = np.zeros((256, 256), np.uint8)
    if defect:
        y, x = rng.integers(40, 180, size=2)
        image[y : y + 40, x : x + 40] = 1.0
        mask[y : y + 40, x : x + 40] = 255
    rgb = (np.repeat(image[..., None], 3, -1) * 255).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(mask)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    for split, label, count in (("train", "good", 6), ("test", "good", 3), ("test", "spot", 3)):
        folder = root / "tiles" / split / label
        folder.mkdir(parents=True)
        for i in range(count):
            image, mask = _texture(rng, defect=label != "good")
            image.save(folder / f"{i:03d}.png")
            if label != "good":
                (root / "tiles" / "ground_truth" / label).mkdir(parents=True, exist_ok=True)
                mask.save(root / "tiles" / "ground_truth" / label / f"{i:03d}_mask.png")
    return root


def _anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("anomalib")
    if exe is None:
        pytest.skip("the anomalib console script is not on PATH")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)
    assert done.returncode == 0, f"anomalib {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def test_train_predict_export_by_short_name(mvtec_root, tmp_path):
    try:
        metadata.distribution("anomalib-recon")
    except metadata.PackageNotFoundError:
        pytest.skip("anomalib-recon is not installed")
    data = ["--data", "MVTec", "--data.root", str(mvtec_root), "--data.category", "tiles"]
    data += ["--data.train_batch_size", "2", "--data.eval_batch_size", "3", "--data.num_workers", "0"]
    trained = _anomalib(
        "train",
        *SMALL_NAFRAD,
        *data,
        "--trainer.max_steps",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path / "results"),
        cwd=tmp_path,
    )
    assert "image_AUROC" in trained.stdout + trained.stderr
    checkpoints = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, "anomalib train wrote no checkpoint"
    ckpt = str(checkpoints[-1])

    _anomalib(
        "predict",
        *SMALL_NAFRAD,
        "--data",
        str(mvtec_root / "tiles" / "test" / "spot"),
        "--ckpt_path",
        ckpt,
        "--default_root_dir",
        str(tmp_path / "predict"),
        cwd=tmp_path,
    )
    pictures = list((tmp_path / "predict").rglob("*.png"))
    assert len(pictures) >= 3, f"expected visualised predictions, got {pictures}"

    for export_type, suffix in (("onnx", "*.onnx"), ("openvino", "*.xml")):
        if export_type == "openvino":
            pytest.importorskip("openvino")
        pytest.importorskip("onnxscript")
        _anomalib(
            "export",
            *SMALL_NAFRAD,
            "--export_type",
            export_type,
            "--ckpt_path",
            ckpt,
            "--input_size",
            "[256,256]",
            "--onnx_kwargs",
            '{"opset_version": 18}',
            "--export_root",
            str(tmp_path / export_type),
            cwd=tmp_path,
        )
        assert list((tmp_path / export_type).rglob(suffix)), f"no {suffix} written by anomalib export"
