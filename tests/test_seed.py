"""The same ``anomalib train`` command with the same ``--seed_everything`` gives the same weights and metrics.

anomalib 2.7's CLI parses ``seed_everything`` but never applies it; our start-up hook does (see
``_anomalib_recon_hook.seed_cli``). Three short runs of a small AMINet on a generated category: two with seed 7
must agree exactly (every weight, every metric), one with seed 8 must not (so the test can fail).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import write_textured_category

pytestmark = pytest.mark.slow

MODEL = ["--model", "AMINet", "--model.backbone", "tf_efficientnet_lite0", "--model.weights", "null"]
MODEL += ["--model.embed_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--model.image_size", "64"]


def _train(root: Path, seed: int, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    exe = shutil.which("anomalib")
    if exe is None:
        pytest.skip("the anomalib console script is not on PATH")
    args = [exe, "train", *MODEL, "--data", "Folder", "--data.name", "stripes", "--data.root", str(root)]
    args += ["--data.normal_dir", "train/good", "--data.abnormal_dir", "test/defect"]
    args += ["--data.normal_test_dir", "test/good", "--data.mask_dir", "ground_truth/defect"]
    args += ["--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0"]
    args += ["--trainer.max_steps", "3", "--trainer.accelerator", "cpu"]
    args += ["--seed_everything", str(seed), "--default_root_dir", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=out.parent, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-4000:]
    (ckpt,) = sorted(out.rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    text = done.stdout + done.stderr
    metrics = {name: float(value) for name, value in re.findall(r"(image_AUROC|pixel_AUROC)\s*│\s*([0-9.]+)", text)}
    assert metrics, f"no metrics printed:\n{text[-3000:]}"
    return state, metrics


def test_same_seed_same_weights_and_metrics(tmp_path):
    root = write_textured_category(tmp_path / "stripes", size=64, n_train=8)
    first, first_metrics = _train(root, 7, tmp_path / "a")
    again, again_metrics = _train(root, 7, tmp_path / "b")
    other, _ = _train(root, 8, tmp_path / "c")
    trained = [k for k in first if k.startswith("model.") and "backbone" not in k and first[k].is_floating_point()]
    assert trained
    for key in trained:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0, msg=key)
    assert again_metrics == first_metrics
    assert any(not torch.equal(other[key], first[key]) for key in trained), "seed 8 trained the same weights"
