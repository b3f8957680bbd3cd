"""Fit and test one registered model under Lightning DDP (2 CPU processes), as ``anomalib train --trainer.strategy ddp
--trainer.devices 2`` does: Lightning re-launches this script for rank 1, both ranks fit and then test.

    python -m tests.ddp_worker NAME WORK_DIR

Each rank saves its ``state_dict`` at the end of fitting (``WORK_DIR/rank_states/rank<r>.pt``); rank 0 writes the
test metrics to ``WORK_DIR/metrics.json``. Used by ``tests/test_ddp.py`` in a subprocess (a DDP launch cannot run
inside pytest's own process).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import tests.conftest  # noqa: F401 - the suite's hub-free environment, before anything imports the hub


def main(name: str, work: Path) -> None:
    """Fit, save each rank's state, test; rank 0 writes the metrics."""
    import anomalib.models as am
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from tests.conftest import cpu_engine, folder_datamodule, write_textured_category
    from tests.ddp import SaveRankState
    from tests.test_contract import CONTRACT_KWARGS

    kwargs, size, steps = CONTRACT_KWARGS[name]
    torch.manual_seed(0)
    model = getattr(am, name)(**kwargs)
    root = work / "stripes"
    if not root.exists():  # written by the launching process before rank 1 starts
        write_textured_category(root, size=size, defect=max(8, size // 5))
    (work / "rank_states").mkdir(exist_ok=True)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=180))
    engine = cpu_engine(
        work / "run", max_steps=steps, strategy=strategy, devices=2, callbacks=[SaveRankState(work / "rank_states")]
    )
    datamodule = folder_datamodule(root)
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)
    if engine.trainer.global_rank == 0:
        (work / "metrics.json").write_text(json.dumps({k: float(v) for k, v in results[0].items()}))
    # Tear the process group down before the interpreter exits: left to the exit-time destructors, gloo's threads
    # could still be running on a loaded machine and the process aborted ("terminate called without an active
    # exception", SIGABRT) after a successful fit and test.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
