"""The one step learning-rate schedule of the package: ``lr_milestones`` and ``lr_gamma`` (``MultiStepLR``).

Every model with a step schedule takes the same two arguments:

* ``lr_milestones``: where the learning rate is multiplied by ``lr_gamma``. Each value is either an epoch number
  (``>= 1``, integral: NAFRAD's 400 and 600 of 700 epochs) or a fraction of training in (0, 1) (AGPNet's 0.8),
  resolved against ``max_epochs``, or against ``max_steps`` when training is bounded by steps only
  (``max_epochs=-1``), so that a CPU budget in steps keeps the paper's shape. Empty: a constant learning rate.
* ``lr_gamma``: the factor, in (0, 1].

Two-stage models (DADF, RB-AE) also share :func:`plan_two_stages`: where stage 2 starts within the trainer's budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def check_lr_schedule(lr_milestones: Sequence[float] | None, lr_gamma: float) -> tuple[float, ...]:
    """Validate ``lr_milestones`` / ``lr_gamma`` at construction; returns the milestones as a sorted tuple."""
    milestones = tuple(sorted(float(m) for m in (lr_milestones or ())))
    fractions = [m for m in milestones if 0 < m < 1]
    epochs = [m for m in milestones if m >= 1]
    if len(fractions) + len(epochs) != len(milestones) or any(m != int(m) for m in epochs) or (fractions and epochs):
        msg = (
            f"lr_milestones must be epoch numbers (integers >= 1) or fractions of training in (0, 1), not both; "
            f"got {list(lr_milestones or ())}."
        )
        raise ValueError(msg)
    if not 0 < float(lr_gamma) <= 1:
        msg = f"lr_gamma must be in (0, 1], got {lr_gamma}."
        raise ValueError(msg)
    return milestones


def training_horizon(trainer: Any) -> tuple[str, int] | None:
    """``("epoch", max_epochs)`` when ``max_epochs`` is set (> 0), else ``("step", max_steps)``, else ``None``."""
    if trainer is None:
        return None
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs > 0:
        return "epoch", int(max_epochs)
    max_steps = getattr(trainer, "max_steps", None)
    if max_steps is not None and max_steps > 0:
        return "step", int(max_steps)
    return None


def multistep_lr(
    optimizer: torch.optim.Optimizer, lr_milestones: Sequence[float], lr_gamma: float, trainer: Any
) -> dict[str, Any]:
    """``{"optimizer": ..., "lr_scheduler": ...}`` for Lightning's ``configure_optimizers``.

    Epoch numbers step per epoch. Fractions become ``max(round(f · total), 1)`` of the horizon's unit (epochs, or
    steps when only ``max_steps`` bounds training); without a horizon (e.g. ``max_time`` only) the learning rate
    stays constant.
    """
    milestones = check_lr_schedule(lr_milestones, lr_gamma)
    if not milestones:
        return {"optimizer": optimizer}
    if milestones[0] >= 1:
        unit, points = "epoch", [int(m) for m in milestones]
    else:
        horizon = training_horizon(trainer)
        if horizon is None:
            return {"optimizer": optimizer}
        unit, total = horizon
        points = [max(round(m * total), 1) for m in milestones]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=points, gamma=float(lr_gamma))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": unit}}


def plan_two_stages(
    owner: str,
    trainer: Any,
    switch_step: Callable[[float], float],
    reconstruction_steps: int | None,
    reconstruction_epochs: int,
    stage2: str,
    suggestion: str,
) -> tuple[float, float, float]:
    """``(batches per epoch, first step of stage 2, steps in all)`` of a two-stage model, refusing a budget that ends
    before stage 2 starts (the stage that gives the anomaly map would stay untrained).

    Args:
        owner: Model name for the message.
        trainer: The Lightning trainer: its budget is the smaller of ``max_steps`` and ``max_epochs`` x batches per
            epoch (``inf`` when neither bounds training).
        switch_step: The model's rule: batches per epoch -> first optimizer step of stage 2.
        reconstruction_steps: Stage-1 length in optimizer steps, or ``None`` (then ``reconstruction_epochs``).
        reconstruction_epochs: Stage-1 length in epochs (named in the message).
        stage2: What stage 2 trains, for the message ("the flows").
        suggestion: A ``reconstruction_steps`` to suggest, as a fraction of ``max_steps`` ("5/6").
    """
    batches = float(trainer.num_training_batches)
    budgets = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        budgets.append(float(trainer.max_steps))
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        budgets.append(trainer.max_epochs * batches)
    switch = float(switch_step(batches))
    total = min(budgets) if budgets else math.inf
    if math.isfinite(switch) and total <= switch:
        how = (
            f"reconstruction_steps={reconstruction_steps}"
            if reconstruction_steps is not None
            else f"reconstruction_epochs={reconstruction_epochs} × {int(batches)} batches"
        )
        msg = (
            f"{owner}: training ends after {int(total)} steps, before stage 2 ({stage2}) starts at step {int(switch)} "
            f"({how}). Set reconstruction_steps below max_steps (e.g. {suggestion} of it) or raise the budget."
        )
        raise ValueError(msg)
    return batches, switch, total
