"""Tests for the EMA mean teacher (C11)."""

import pytest
import torch
from torch import nn

from anomalib_recon.components.ema import EMATeacher


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _step(student: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    student(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()


def test_teacher_starts_as_copy_and_is_frozen():
    student = _student()
    teacher = EMATeacher(student, decay=0.9)
    for s, t in zip(student.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    assert all(not p.requires_grad for p in teacher.parameters())
    assert isinstance(teacher.module, nn.Sequential)


def test_optimizer_step_does_not_move_teacher_until_update_then_exact_ema():
    decay = 0.9
    student = _student()
    parent = nn.ModuleDict({"student": student, "teacher": EMATeacher(student, decay=decay)})
    parent.train()
    trainable = [p for p in parent.parameters() if p.requires_grad]
    assert len(trainable) == len(list(student.parameters()))  # the optimizer path sees only the student
    opt = torch.optim.SGD(trainable, lr=0.5)
    teacher = parent["teacher"]
    old = [p.clone() for p in teacher.module.state_dict().values()]
    _step(student, opt)
    for before, now in zip(old, teacher.module.state_dict().values(), strict=True):
        assert torch.equal(before, now)
    assert teacher.update(student)
    new_student = student.state_dict()
    for (name, now), before in zip(teacher.module.state_dict().items(), old, strict=True):
        if now.is_floating_point():  # parameters and BN running statistics
            torch.testing.assert_close(now, decay * before + (1 - decay) * new_student[name], rtol=1e-6, atol=1e-7)
    moved = teacher.module[0].weight
    assert not torch.equal(moved, student[0].weight) and not torch.equal(moved, old[0])


def test_update_every_and_modes():
    student = _student()
    teacher = EMATeacher(student, decay=0.5, update_every=3)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    w0 = teacher.module[0].weight.clone()
    _step(student, opt)
    assert not teacher.update(student) and not teacher.update(student)
    assert torch.equal(teacher.module[0].weight, w0)
    assert teacher.update(student)
    torch.testing.assert_close(teacher.module[0].weight, 0.5 * w0 + 0.5 * student[0].weight)
    teacher.train()
    assert not teacher.module.training  # pinned to eval
    with torch.no_grad():
        assert teacher(torch.randn(3, 4)).shape == (3, 2)
    free = EMATeacher(student, eval_mode=False).train()
    assert free.module.training


def test_decay_one_freezes_and_zero_copies():
    student = _student()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    frozen, copy = EMATeacher(student, decay=1.0), EMATeacher(student, decay=0.0)
    w0 = frozen.module[0].weight.clone()
    _step(student, opt)
    frozen.update(student)
    copy.update(student)
    assert torch.equal(frozen.module[0].weight, w0)
    torch.testing.assert_close(copy.module[0].weight, student[0].weight)


def test_clear_errors():
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(_student(), decay=1.5)
    with pytest.raises(ValueError, match="update_every"):
        EMATeacher(_student(), update_every=0)
    teacher = EMATeacher(_student())
    with pytest.raises(ValueError, match="do not match"):
        teacher.update(nn.Linear(4, 2))
