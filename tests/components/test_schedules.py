"""The one step learning-rate schedule (components/schedules.py): epochs or fractions of training, one error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr, training_horizon


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _lrs(config: dict, steps: int) -> list[float]:
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "milestones", [[0.5, 2], [1.5], [0], [-3]], ids=["mixed", "non-integer epoch", "zero", "negative"]
)
def test_bad_milestones_are_one_error(milestones):
    with pytest.raises(ValueError, match="lr_milestones must be epoch numbers"):
        check_lr_schedule(milestones, 0.1)


@pytest.mark.parametrize("gamma", [0.0, 1.5, -0.1])
def test_bad_gamma_is_one_error(gamma):
    with pytest.raises(ValueError, match="lr_gamma must be in"):
        check_lr_schedule([3], gamma)


def test_epoch_milestones_decay_per_epoch():
    config = multistep_lr(_optimizer(), [4, 2], 0.5, trainer=None)
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert _lrs(config, 5) == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_fractions_follow_epochs_or_steps():
    epochs = multistep_lr(_optimizer(), [0.8], 0.1, SimpleNamespace(max_epochs=10, max_steps=-1))
    assert epochs["lr_scheduler"]["interval"] == "epoch"
    assert dict(epochs["lr_scheduler"]["scheduler"].milestones) == {8: 1}
    steps = multistep_lr(_optimizer(), [0.5, 0.9], 0.1, SimpleNamespace(max_epochs=-1, max_steps=11))
    assert steps["lr_scheduler"]["interval"] == "step"
    assert dict(steps["lr_scheduler"]["scheduler"].milestones) == {6: 1, 10: 1}  # round(5.5), round(9.9)
    early = multistep_lr(_optimizer(), [0.01], 0.1, SimpleNamespace(max_epochs=3, max_steps=-1))
    assert dict(early["lr_scheduler"]["scheduler"].milestones) == {1: 1}  # never at 0


def test_constant_without_milestones_or_horizon():
    assert set(multistep_lr(_optimizer(), [], 0.1, None)) == {"optimizer"}
    assert set(multistep_lr(_optimizer(), [0.5], 0.1, SimpleNamespace(max_epochs=-1, max_steps=-1))) == {"optimizer"}
    assert training_horizon(SimpleNamespace(max_epochs=None, max_steps=None)) is None
