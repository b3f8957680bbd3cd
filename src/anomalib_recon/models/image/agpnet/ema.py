"""Exponential-moving-average ("mean teacher") copy of AGPNet's decoder (paper Sec. 3.1, Eq. 3).

The teacher starts as a copy of the student and afterwards moves only through :meth:`EMATeacher.update`:
``θ_teacher ← η·θ_teacher + (1 − η)·θ_student`` (floating-point buffers too), applied every ``update_every``-th
call. It is hand-written with in-place ``lerp_`` under ``no_grad`` rather than built on
``torch.optim.swa_utils.AveragedModel``: AveragedModel's EMA function is a closure
(``get_ema_multi_avg_fn.<locals>.ema_update``) that cannot be pickled, which broke
``anomalib export --export_type torch`` (it pickles the whole Lightning module). This module holds only tensors,
a copy of the student and plain numbers, so it pickles.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMATeacher"]


class EMATeacher(nn.Module):
    """EMA copy of a module, never optimised (its parameters have ``requires_grad=False``).

    Args:
        student: The trained module; it is deep-copied, not shared.
        decay: EMA decay η in [0, 1] (paper: 0.9999 every 10 steps).
        update_every: Apply the EMA on every n-th :meth:`update` call.
        eval_mode: Keep the teacher in eval mode even when the parent module is in train mode.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, update_every: int = 1, eval_mode: bool = True) -> None:
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
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.long))
        if eval_mode:
            self.module.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """Follow the parent's mode unless ``eval_mode`` pins the teacher to eval."""
        super().train(mode)
        if self.eval_mode:
            self.module.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> bool:
        """Move the teacher towards ``student`` (every ``update_every``-th call). Returns True if it moved."""
        self.num_calls += 1
        if int(self.num_calls) % self.update_every != 0:
            return False
        pairs = [
            *zip(self.module.parameters(), student.parameters(), strict=False),
            *zip(self.module.buffers(), student.buffers(), strict=False),
        ]
        n_teacher = sum(1 for _ in self.module.parameters()) + sum(1 for _ in self.module.buffers())
        n_student = sum(1 for _ in student.parameters()) + sum(1 for _ in student.buffers())
        if n_teacher != n_student or any(t.shape != s.shape for t, s in pairs):
            msg = "EMATeacher.update: the student's parameters do not match the teacher's; pass the same module."
            raise ValueError(msg)
        weight = 1.0 - self.decay
        for teacher, source in pairs:
            if teacher.is_floating_point():
                teacher.lerp_(source.detach().to(teacher.dtype), weight)
            else:  # integer buffers (counters) are copied
                teacher.copy_(source)
        return True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Read checkpoints written by the former AveragedModel-based teacher (``averaged.module.*`` keys)."""
        old = prefix + "averaged.module."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "module." + key[len(old) :]] = state_dict.pop(key)
        state_dict.pop(prefix + "averaged.n_averaged", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher. Wrap in ``torch.no_grad()`` when only its outputs/attention are read."""
        return self.module(*args, **kwargs)
