"""Exponential-moving-average ("mean teacher") copy of a module (components.md C11, AGPNet).

The teacher starts as a copy of the student and afterwards moves only through :meth:`EMATeacher.update`:
``θ_teacher ← decay·θ_teacher + (1 − decay)·θ_student`` (floating-point buffers too, e.g. BN statistics). Call
``update`` from ``on_train_batch_end``. The teacher's parameters have ``requires_grad=False``; build the optimizer
from the student's parameters (or filter on ``requires_grad``) so it never sees them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMATeacher(nn.Module):
    """EMA teacher built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``.

    Args:
        student: The trained module; it is deep-copied, not shared.
        decay: EMA decay η in [0, 1] (AGPNet: 0.999 default, 0.9999 in the paper's text).
        update_every: Apply the EMA on every n-th :meth:`update` call (AGPNet's paper: every 10 steps).
        use_buffers: Average floating-point buffers as well (otherwise buffers are copied from the student).
        eval_mode: Keep the teacher in eval mode even when the parent module is in train mode.

    The wrapped ``AveragedModel`` starts with ``n_averaged = 1``: the construction copy counts as the first
    average, so the very first ``update`` is already an EMA step rather than AveragedModel's plain copy.
    """

    def __init__(
        self,
        student: nn.Module,
        decay: float = 0.999,
        update_every: int = 1,
        use_buffers: bool = True,
        eval_mode: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            msg = f"decay must be in [0, 1], got {decay}."
            raise ValueError(msg)
        if update_every < 1:
            msg = f"update_every must be >= 1, got {update_every}."
            raise ValueError(msg)
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.eval_mode = eval_mode
        self.averaged = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=use_buffers)
        self.averaged.n_averaged.fill_(1)
        self.averaged.requires_grad_(False)
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.long))
        if eval_mode:
            self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The teacher network itself (same class as the student)."""
        return self.averaged.module

    def train(self, mode: bool = True) -> EMATeacher:
        """Follow the parent's mode unless ``eval_mode`` pins the teacher to eval."""
        super().train(mode)
        if self.eval_mode:
            self.averaged.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> bool:
        """Move the teacher towards ``student`` (every ``update_every``-th call). Returns True if it moved."""
        self.num_calls += 1
        if int(self.num_calls) % self.update_every != 0:
            return False
        student_params = list(student.parameters())
        teacher_params = list(self.module.parameters())
        if len(student_params) != len(teacher_params) or any(
            s.shape != t.shape for s, t in zip(student_params, teacher_params, strict=True)
        ):
            msg = "EMATeacher.update: the student's parameters do not match the teacher's; pass the same module."
            raise ValueError(msg)
        self.averaged.update_parameters(student)
        return True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher. Wrap in ``torch.no_grad()`` when only its outputs/attention are read."""
        return self.averaged(*args, **kwargs)
