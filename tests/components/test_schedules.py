"""The one step learning-rate schedule (components/schedules.py): epochs or fractions of training, one error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr, plan_two_stages, training_horizon


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


def _plan(max_steps: int, max_epochs: int | None, batches: float, steps: int | None, epochs: int = 2):
    trainer = SimpleNamespace(max_steps=max_steps, max_epochs=max_epochs, num_training_batches=batches)
    rule = (lambda b: steps) if steps is not None else (lambda b: epochs * b)  # the models' own switch rule
    return plan_two_stages("Toy", trainer, rule, steps, epochs, stage2="the head", suggestion="2/3")


def test_two_stage_plan_takes_the_smaller_budget_and_the_models_switch() -> None:
    assert _plan(max_steps=90, max_epochs=5, batches=10.0, steps=None) == (10.0, 20.0, 50.0)  # epochs bound
    assert _plan(max_steps=30, max_epochs=5, batches=10.0, steps=25) == (10.0, 25.0, 30.0)  # steps bound
    assert _plan(max_steps=-1, max_epochs=None, batches=10.0, steps=25)[2] == math.inf  # no budget: no refusal
    assert _plan(max_steps=30, max_epochs=None, batches=math.inf, steps=25)[2] == 30.0  # iterable of unknown size


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_steps": 25, "max_epochs": None, "batches": 10.0, "steps": 25}, r"after 25 steps, before stage 2 "),
        ({"max_steps": -1, "max_epochs": 2, "batches": 10.0, "steps": None}, r"reconstruction_epochs=2 × 10 batches"),
    ],
)
def test_two_stage_plan_refuses_a_budget_that_ends_before_stage_2(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _plan(**kwargs)
    with pytest.raises(ValueError, match=r"^Toy: .*the head.*e\.g\. 2/3 of it"):
        _plan(**kwargs)
