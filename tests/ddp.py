"""Lightning DDP on 2 CPU processes for tests: fit a model, then see what every rank holds.

``fit_ddp`` runs ``Engine.fit`` with ``strategy="ddp_spawn"`` (2 processes, gloo) and saves each rank's
``state_dict`` when fitting ends (after ``on_train_end``, so statistics and memory banks fitted there are included),
so a test can check that every rank holds the same model and compare what was fitted from the whole training set
against a single-process fit on the same weights.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy

from tests.conftest import cpu_engine


class SaveRankState(Callback):
    """Save ``pl_module.state_dict()`` of every rank to ``folder/rank<r>.pt`` when fitting ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Every rank writes its own file (CPU tensors)."""
        self._save(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Zero-/few-shot models: anomalib's ``Engine.fit`` only validates them (no ``on_fit_end``); a few-shot model
        needs training (its banks) and is still only validated, so the stage decides, not ``requires_training``."""
        if trainer.state.fn == "fit":
            return
        self._save(trainer, pl_module)

    def _save(self, trainer: Any, pl_module: Any) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def spawn_strategy(timeout_s: int = 180) -> DDPStrategy:
    """``ddp_spawn`` on gloo whose collectives give up after ``timeout_s`` (a rank that dies cannot hang a test)."""
    return DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=timeout_s))


def fit_ddp(model: Any, datamodule: Any, work: Path, max_steps: int = 2, **engine_kwargs: Any) -> list[dict]:
    """Fit ``model`` under DDP (2 CPU processes) and return the two ranks' state dicts (rank 0 first).

    The main process's ``model`` receives rank 0's weights afterwards (Lightning's ``ddp_spawn``).
    """
    folder = Path(work) / "rank_states"
    folder.mkdir(parents=True, exist_ok=True)
    engine = cpu_engine(
        Path(work) / "ddp_run",
        max_steps=max_steps,
        strategy=spawn_strategy(),
        devices=2,
        callbacks=[SaveRankState(folder)],
        **engine_kwargs,
    )
    engine.fit(model, datamodule=datamodule)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same_state(states: list[dict], keys: list[str] | None = None) -> None:
    """Every rank holds the same tensors (all keys, or ``keys``)."""
    first, *others = states
    names = keys if keys is not None else sorted(first)
    for other in others:
        assert sorted(other) == sorted(first)
        for name in names:
            torch.testing.assert_close(other[name], first[name], atol=0, rtol=0, msg=f"ranks differ in {name}")
