"""AGPNet's epoch ramps: noise intensity 0 → 1 and image-mask ratio 0.6 → 1.0, easy → hard.

The LightningModule evaluates the ramp once per epoch. Epochs are 0-based, as Lightning's ``current_epoch``. By
default the ramp runs from the first epoch (value ``start``) to the last epoch ``max_epochs − 1`` (value ``end``);
``begin_epoch``/``end_epoch`` move the ramp (paper: mask ratio from epoch 100 to 400) and the value is held
constant outside it.
"""

from __future__ import annotations

__all__ = ["linear_ramp"]


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
