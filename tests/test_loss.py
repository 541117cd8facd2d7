"""DINOLoss against the formula, written out by hand with numpy."""
import numpy as np
import pytest
import torch

from pretrain.loss import DINOLoss, teacher_temperature_schedule


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_loss(student, teacher, center, ncrops, tau_s, tau_t):
    """Sum over (teacher global i, student crop v != i) of batch-mean cross-entropy, / pairs."""
    batch = teacher.shape[0] // 2
    total, pairs = 0.0, 0
    for i in range(2):
        q = softmax((teacher[i * batch:(i + 1) * batch] - center) / tau_t)
        for v in range(ncrops):
            if v == i:
                continue
            log_p = np.log(softmax(student[v * batch:(v + 1) * batch] / tau_s))
            total += np.mean(-(q * log_p).sum(axis=1))
            pairs += 1
    return total / pairs, pairs


@pytest.mark.parametrize("ncrops", [2, 4, 10])
def test_loss_matches_formula_with_center_and_temperatures(ncrops):
    rng = np.random.default_rng(0)
    batch, dim = 3, 7
    student = rng.normal(size=(ncrops * batch, dim))
    teacher = rng.normal(size=(2 * batch, dim))
    loss_fn = DINOLoss(dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=3, nepochs=10, student_temp=0.1, center_momentum=0.9)
    center = rng.normal(size=(1, dim))
    loss_fn.center.copy_(torch.tensor(center))
    epoch = 1  # teacher temperature 0.055, halfway through the warm-up
    got = loss_fn(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32), epoch)
    want, pairs = reference_loss(student, teacher, center, ncrops, 0.1, 0.055)
    assert pairs == 2 * (ncrops - 1)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the center moved after the loss: 0.9 c + 0.1 mean of the raw teacher rows
    assert np.allclose(loss_fn.center.numpy(), 0.9 * center + 0.1 * teacher.mean(axis=0, keepdims=True), atol=1e-6)


def test_loss_uses_old_center_and_crop_major_pairing():
    # Student crop v predicts the teacher's global crop i only when v != i: with
    # identical student and teacher logits for global crops the loss differs from
    # a pairing that includes v == i.
    torch.manual_seed(0)
    loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 10)
    student = torch.randn(6, 5)
    teacher = student[:4].clone()
    loss = loss_fn(student, teacher, 0)
    want, _ = reference_loss(student.double().numpy(), teacher.double().numpy(), np.zeros((1, 5)), 3, 0.1, 0.04)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_gradient_flows_to_student_only():
    loss_fn = DINOLoss(4, 2, 0.04, 0.04, 0, 1)
    student = torch.randn(4, 4, requires_grad=True)
    teacher = torch.randn(4, 4, requires_grad=True)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_teacher_temperature_schedule_points():
    schedule = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(schedule) == 100
    assert schedule[0] == pytest.approx(0.04)
    assert schedule[29] == pytest.approx(0.07)  # linspace with 30 points: last warm-up epoch reaches 0.07
    assert schedule[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert np.all(schedule[29:] == pytest.approx(0.07))
    loss_fn = DINOLoss(4, 2, 0.04, 0.07, 30, 100)
    assert loss_fn.teacher_temp(500) == pytest.approx(0.07)  # past the end: the last value
    assert np.all(teacher_temperature_schedule(0.04, 0.04, 0, 5) == 0.04)  # code default: constant


def reference_monitors(student, teacher, center, ncrops, tau_s, tau_t):
    """Teacher entropy (mean over crops and batch) and KL(q_i || p_v) averaged over the loss's pairs, directly."""
    batch = teacher.shape[0] // 2
    targets = [softmax((teacher[i * batch:(i + 1) * batch] - center) / tau_t) for i in range(2)]
    entropy = np.mean([-(q * np.log(q)).sum(axis=1).mean() for q in targets])
    kls = []
    for i, q in enumerate(targets):
        for v in range(ncrops):
            if v != i:
                p = softmax(student[v * batch:(v + 1) * batch] / tau_s)
                kls.append((q * (np.log(q) - np.log(p))).sum(axis=1).mean())
    return entropy, np.mean(kls)


@pytest.mark.parametrize("ncrops", [2, 6])
def test_collapse_monitors_match_entropy_and_kl_formulas(ncrops):
    rng = np.random.default_rng(1)
    batch, dim = 4, 9
    student = rng.normal(size=(ncrops * batch, dim))
    teacher = rng.normal(size=(2 * batch, dim))
    center = rng.normal(size=(1, dim))
    loss_fn = DINOLoss(dim, ncrops, 0.04, 0.07, 3, 10)
    loss_fn.center.copy_(torch.tensor(center))
    loss, monitors = loss_fn.with_monitors(torch.tensor(student, dtype=torch.float32),
                                           torch.tensor(teacher, dtype=torch.float32),
                             2)
    want_entropy, want_kl = reference_monitors(student, teacher, center, ncrops, 0.1, 0.07)
    assert monitors["teacher_entropy"].item() == pytest.approx(want_entropy, rel=1e-4)
    assert monitors["teacher_student_kl"].item() == pytest.approx(want_kl, rel=1e-4, abs=1e-5)
    mean_target = np.concatenate([softmax((teacher[i * batch:(i + 1) * batch] - center) / 0.07)
                                  for i in range(2)]).mean(axis=0)
    assert monitors["teacher_batch_entropy"].item() == pytest.approx(-(mean_target * np.log(mean_target)).sum(),
                                                                     rel=1e-4)
    # same loss (and same center update) as without monitors
    plain = DINOLoss(dim, ncrops, 0.04, 0.07, 3, 10)
    plain.center.copy_(torch.tensor(center))
    assert plain(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32), 2).item() \
        == loss.item()
    assert torch.equal(plain.center, loss_fn.center)


def test_collapse_monitors_at_the_two_collapses():
    dim, batch = 16, 5
    # uniform collapse: constant logits everywhere -> H = ln K, KL = 0
    loss_fn = DINOLoss(dim, 4, 0.04, 0.04, 0, 10)
    _, uniform = loss_fn.with_monitors(torch.zeros(4 * batch, dim), torch.zeros(2 * batch, dim), 0)
    assert uniform["teacher_entropy"].item() == pytest.approx(np.log(dim), rel=1e-6)
    assert uniform["teacher_student_kl"].item() == pytest.approx(0.0, abs=1e-6)
    # one dimension dominates teacher and student: H -> 0 (0 log 0 counted as 0, no NaN), KL -> 0
    spike = torch.zeros(1, dim)
    spike[0, 3] = 100.0
    loss_fn = DINOLoss(dim, 4, 0.04, 0.04, 0, 10)
    _, peaked = loss_fn.with_monitors(spike.repeat(4 * batch, 1), spike.repeat(2 * batch, 1), 0)
    assert peaked["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert peaked["teacher_student_kl"].item() == pytest.approx(0.0, abs=1e-4)
    assert peaked["teacher_batch_entropy"].item() == pytest.approx(0.0, abs=1e-6)  # every image on dimension 3
    assert uniform["teacher_batch_entropy"].item() == pytest.approx(np.log(dim), rel=1e-6)
    # sharp but different dimensions per image: per-image entropy ~0, batch entropy ln(2B) (not one dimension)
    spread = torch.zeros(2 * batch, dim)
    spread[torch.arange(2 * batch), torch.arange(2 * batch)] = 100.0
    loss_fn = DINOLoss(dim, 2, 0.04, 0.04, 0, 10)
    _, sharp = loss_fn.with_monitors(spread.clone(), spread, 0)
    assert sharp["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert sharp["teacher_batch_entropy"].item() == pytest.approx(np.log(2 * batch), rel=1e-5)
