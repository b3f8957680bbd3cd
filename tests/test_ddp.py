"""Every registered model trains and tests under Lightning DDP (2 CPU processes, gloo), the way ``anomalib train
--trainer.strategy ddp --trainer.devices 2`` runs it, and every rank ends the fit holding the same model: weights, and
whatever it fitted from the whole training set (statistics, memory banks).

Per-model tests check, on top, that what is fitted from the training set under DDP equals the single-process result
(``tests/models/``, with :mod:`tests.ddp`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_textured_category
from tests.ddp import assert_same_state
from tests.test_contract import CONTRACT_KWARGS, REGISTERED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [n for n in REGISTERED if n in CONTRACT_KWARGS])
def test_trains_and_tests_under_ddp_with_one_model_on_every_rank(name: str, tmp_path: Path) -> None:
    _, size, _ = CONTRACT_KWARGS[name]
    write_textured_category(tmp_path / "stripes", size=size, defect=max(8, size // 5))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "tests.ddp_worker", name, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    states = [torch.load(tmp_path / "rank_states" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_state(states)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
