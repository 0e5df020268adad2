"""The distillation loss: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE (no Ray)."""

import pytest
import torch
import torch.nn.functional as F

from raylm.compress.distill import distillation_loss


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g, requires_grad=True)  # (B, T, V)
    teacher = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    return student, teacher, targets


def test_matching_teacher_leaves_only_cross_entropy(logits):
    student, _, targets = logits
    loss, kl, ce = distillation_loss(student, student.detach(), targets, temperature=2.0, alpha=0.5)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert ce.item() == pytest.approx(F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1)).item())
    assert loss.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


def test_kl_is_per_token_and_scaled_by_temperature_squared(logits):
    student, teacher, targets = logits
    T = 3.0
    loss, kl, _ = distillation_loss(student, teacher, targets, temperature=T, alpha=1.0)
    p = F.softmax(teacher / T, dim=-1)
    expected = (p * (p.log() - F.log_softmax(student / T, dim=-1))).sum(-1).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(T * T * expected.item(), rel=1e-5)


def test_gradients_reach_the_student_only(logits):
    student, teacher, targets = logits
    teacher = teacher.clone().requires_grad_(False)
    loss, _, _ = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.7)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
