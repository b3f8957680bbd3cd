"""Epoch-based hyperparameter ramps (components.md C10).

AGPNet ramps its feature-noise intensity 0 → 1 and its image-mask ratio 0.6 → 1.0 ("easy → hard"). A
LightningModule evaluates the schedule once per epoch::

    def on_train_epoch_start(self) -> None:
        self.model.alpha = self.alpha_schedule(self.current_epoch, self.trainer.max_epochs)

Epochs are 0-based, as Lightning's ``current_epoch``. By default the ramp runs from the first epoch (value
``start``) to the last epoch ``max_epochs − 1`` (value ``end``); ``begin_epoch``/``end_epoch`` move the ramp
(AGPNet: mask ratio from epoch 100 to 400) and the value is held constant outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _progress(epoch: int, max_epochs: int | None, begin_epoch: int, end_epoch: int | None) -> float:
    if end_epoch is None:
        if max_epochs is None or max_epochs < 1:
            msg = (
                f"max_epochs={max_epochs}: the ramp needs the trainer's max_epochs (set trainer.max_epochs) "
                "or an explicit end_epoch."
            )
            raise ValueError(msg)
        end_epoch = max_epochs - 1
    if epoch < 0:
        msg = f"epoch must be >= 0, got {epoch}."
        raise ValueError(msg)
    if end_epoch <= begin_epoch:  # degenerate ramp: a step at end_epoch
        return 1.0 if epoch >= end_epoch else 0.0
    return min(max((epoch - begin_epoch) / (end_epoch - begin_epoch), 0.0), 1.0)


def linear_ramp(
    start: float,
    end: float,
    epoch: int,
    max_epochs: int | None,
    begin_epoch: int = 0,
    end_epoch: int | None = None,
) -> float:
    """Linear interpolation from ``start`` (at ``begin_epoch``) to ``end`` (at ``end_epoch``, default the last
    epoch ``max_epochs − 1``), clamped outside that range."""
    t = _progress(epoch, max_epochs, begin_epoch, end_epoch)
    if t == 1.0:
        return float(end)  # exact at the last epoch, no rounding error
    return float(start + (end - start) * t)


def cosine_ramp(
    start: float,
    end: float,
    epoch: int,
    max_epochs: int | None,
    begin_epoch: int = 0,
    end_epoch: int | None = None,
) -> float:
    """Half-cosine interpolation ``start + (end − start)·(1 − cos(π t))/2``, same epoch convention as
    :func:`linear_ramp`."""
    t = _progress(epoch, max_epochs, begin_epoch, end_epoch)
    if t == 1.0:
        return float(end)
    return float(start + (end - start) * (1 - math.cos(math.pi * t)) / 2)


_RAMPS = {"linear": linear_ramp, "cosine": cosine_ramp}


@dataclass
class EpochSchedule:
    """A ramp bound to its parameters; call it with the epoch (and the trainer's max_epochs).

    Args:
        start, end: Values at the beginning and end of the ramp.
        kind: ``"linear"``, ``"cosine"`` or ``"constant"`` (always ``end``; ramps can be switched off in configs).
        begin_epoch, end_epoch: Ramp range (see :func:`linear_ramp`).
        max_epochs: Default used when the call does not pass one.

    ``value`` holds the most recent result (``start`` before the first call), so the model can read it in
    every training step.
    """

    start: float
    end: float
    kind: str = "linear"
    begin_epoch: int = 0
    end_epoch: int | None = None
    max_epochs: int | None = None
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in (*_RAMPS, "constant"):
            msg = f"kind must be one of {(*_RAMPS, 'constant')}, got {self.kind!r}."
            raise ValueError(msg)
        self.value = float(self.end if self.kind == "constant" else self.start)

    def __call__(self, epoch: int, max_epochs: int | None = None) -> float:
        """Evaluate at ``epoch`` (0-based), store it in ``value`` and return it."""
        if self.kind == "constant":
            self.value = float(self.end)
        else:
            max_epochs = max_epochs if max_epochs is not None and max_epochs > 0 else self.max_epochs
            self.value = _RAMPS[self.kind](self.start, self.end, epoch, max_epochs, self.begin_epoch, self.end_epoch)
        return self.value
