"""The distillation losses, the competitive rule and one group step, on hand-computed examples."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import losses
import utils
from helpers import step_run
from train_competitive_distillation import competitive_step, select_teachers
from train_mutual_learning import mutual_step


def teacher_sets(mask):
    """Teacher index sets per student from a boolean (n, n) mask."""
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_three_networks_better_rule():
    mask = select_teachers(torch.tensor([0.5, 1.0, 2.0]), "better")
    assert teacher_sets(mask) == [set(), {0}, {0, 1}]


def test_three_networks_best_rule():
    mask = select_teachers(torch.tensor([0.5, 1.0, 2.0]), "best")
    assert teacher_sets(mask) == [set(), {0}, {0}]


def test_rule_does_not_depend_on_order():
    mask = select_teachers(torch.tensor([2.0, 0.5, 1.0]), "better")
    assert teacher_sets(mask) == [{1, 2}, set(), {1}]
    mask = select_teachers(torch.tensor([2.0, 0.5, 1.0]), "best")
    assert teacher_sets(mask) == [{1}, set(), {1}]


@pytest.mark.parametrize("rule", ["better", "best"])
def test_ties_teach_nobody(rule):
    assert teacher_sets(select_teachers(torch.tensor([1.0, 1.0]), rule)) == [set(), set()]
    assert teacher_sets(select_teachers(torch.tensor([0.7, 0.7, 0.7]), rule)) == [set(), set(), set()]
    # two tied leaders: neither teaches the other; the worse network learns from both (better)
    # or from the first of them (best)
    mask = select_teachers(torch.tensor([0.5, 0.5, 2.0]), rule)
    assert teacher_sets(mask)[:2] == [set(), set()]
    assert teacher_sets(mask)[2] == ({0, 1} if rule == "better" else {0})


def test_rules_coincide_for_pairs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        ce = torch.rand(2, generator=generator)
        assert torch.equal(select_teachers(ce, "better"), select_teachers(ce, "best"))


def test_kd_loss_matches_kl_div_and_temperature():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    for T in (1.0, 4.0):
        p = F.softmax(teacher / T, dim=-1)
        expected = T**2 * (p * (p.log() - F.log_softmax(student / T, dim=-1))).sum(-1).mean()
        assert torch.allclose(losses.kd_loss(student, teacher, T), expected, atol=1e-6)


def test_kd_is_zero_for_identical_logits():
    logits = torch.randn(4, 10)
    assert losses.kd_loss(logits, logits.clone()).abs().item() < 1e-6
    assert losses.pairwise_kd(torch.stack([logits, logits, logits])).abs().max().item() < 1e-6


def test_pairwise_kd_matches_pairs():
    logits = torch.randn(3, 6, 5)
    kd = losses.pairwise_kd(logits, 2.0)
    for i in range(3):
        for j in range(3):
            assert torch.allclose(kd[i, j], losses.kd_loss(logits[i], logits[j], 2.0), atol=1e-6)
    assert torch.all(kd.diagonal() == 0)


def test_no_gradient_reaches_the_teacher_through_kd():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    kd = losses.pairwise_kd(logits)
    kd[1, 0].backward()  # network 1 learns from network 0
    assert logits.grad[0].abs().max() == 0
    assert logits.grad[1].abs().max() > 0


class Linear(nn.Module):
    """A tiny network for step tests."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


def group(n):
    nets = [Linear(seed) for seed in range(n)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]
    return nets, optimizers


def step_args(**kwargs):
    values = dict(label_smoothing=0.0, teacher_rule="better", temperature=1.0, kd_weight=1.0, clip_grad=None, clip_mode="norm")
    values.update(kwargs)
    return argparse.Namespace(**values)


RT = utils.Runtime(torch.device("cpu"), None, False)


def expected_gradients(nets, x, y, loss_of):
    """Gradients of each network when it alone is trained on loss_of(i, logits) (others frozen)."""
    grads = []
    for i, net in enumerate(nets):
        logits = [m(x) for m in nets]
        loss = loss_of(i, logits)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    return grads


@pytest.mark.parametrize("rule", ["better", "best"])
def test_competitive_step_gradients_and_stats(rule):
    torch.manual_seed(1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nets, optimizers = group(3)
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(net(x), y) for net in nets])
    mask = select_teachers(ce, rule)

    def loss_of(i, logits):
        teachers = torch.nonzero(mask[i]).flatten().tolist()
        kd = sum(losses.kd_loss(logits[i], logits[j]) for j in teachers) / max(len(teachers), 1)
        return F.cross_entropy(logits[i], y) + kd

    expected = expected_gradients(nets, x, y, loss_of)
    before = [[p.detach().clone() for p in net.parameters()] for net in nets]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = competitive_step(step_run(nets, optimizers, scaler, step_args(teacher_rule=rule), RT), [x] * 3, y, y, torch.ones(3))
    for net, old, grads in zip(nets, before, expected):  # SGD lr 0.1: new = old - 0.1 * grad
        for p, p0, g in zip(net.parameters(), old, grads):
            assert torch.allclose(p.detach(), p0 - 0.1 * g, atol=1e-6)
    leader = ce.argmin().item()
    assert stats["leader_share"].tolist() == [float(i == leader) for i in range(3)]   # leader one-hot
    assert stats["teachers"].tolist() == mask.sum(1).float().tolist()             # teacher counts
    assert stats["kd"][leader].item() == 0                                       # the leader: CE only
    assert torch.allclose(stats["ce"], ce, atol=1e-6)


def test_mutual_step_averages_over_peers():
    torch.manual_seed(2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nets, optimizers = group(3)

    def loss_of(i, logits):
        return F.cross_entropy(logits[i], y) + sum(losses.kd_loss(logits[i], logits[j]) for j in range(3) if j != i) / 2

    expected = expected_gradients(nets, x, y, loss_of)
    with torch.no_grad():
        logits = [net(x) for net in nets]
        kd = [sum(losses.kd_loss(logits[i], logits[j]) for j in range(3) if j != i) / 2 for i in range(3)]
    before = [[p.detach().clone() for p in net.parameters()] for net in nets]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = mutual_step(step_run(nets, optimizers, scaler, step_args(), RT), [x] * 3, y, y, torch.ones(3))
    assert torch.allclose(stats["kd"], torch.stack(kd), atol=1e-6)
    for net, old, grads in zip(nets, before, expected):
        for p, p0, g in zip(net.parameters(), old, grads):
            assert torch.allclose(p.detach(), p0 - 0.1 * g, atol=1e-6)


def test_perturbed_network_uses_mixup_loss():
    torch.manual_seed(3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    y_perm = y.flip(0)
    nets, optimizers = group(2)
    lam = 0.3
    with torch.no_grad():
        z1 = nets[1](x)
        expected = lam * F.cross_entropy(z1, y) + (1 - lam) * F.cross_entropy(z1, y_perm)
        ce0 = F.cross_entropy(nets[0](x), y)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = competitive_step(step_run(nets, optimizers, scaler, step_args(), RT), [x, x], y, y_perm, torch.tensor([1.0, lam]))
    assert torch.allclose(stats["ce"][1], expected, atol=1e-6)
    assert torch.allclose(stats["ce"][0], ce0, atol=1e-6)


def test_lr_schedule_shapes():
    kw = dict(total_steps=100, warmup_steps=10, milestones=(0.5, 0.75), gamma=0.1)
    assert utils.lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert utils.lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert utils.lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert utils.lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.5)
    assert utils.lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert utils.lr_factor(49, schedule="step", **kw) == pytest.approx(1.0)
    assert utils.lr_factor(50, schedule="step", **kw) == pytest.approx(0.1)
    assert utils.lr_factor(80, schedule="step", **kw) == pytest.approx(0.01)
    assert utils.lr_factor(80, schedule="constant", **kw) == 1.0
    assert utils.lr_factor(100, schedule="cosine", min_lr=0.1, **kw) == pytest.approx(0.1)


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert engine.topk_correct(logits, labels, ks=(1, 2, 5)).tolist() == [1, 1, 3]


def test_a_mixup_batchs_training_accuracy_is_weighted_as_its_loss():
    """lam * acc(y) + (1 - lam) * acc(y_perm): a network right on y for 3 of 4 samples and on y_perm
    for 1 of 4, with lam 0.7, scores 0.7 * 75 + 0.3 * 25 = 60; with lam 1 it is plain accuracy."""
    logits = torch.eye(4)[None].repeat(2, 1, 1)            # predicts class i for sample i
    labels, labels_perm = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 3, 3])
    acc = losses.mixed_accuracy(logits, labels, labels_perm, torch.tensor([0.7, 1.0]))
    assert torch.allclose(acc, torch.tensor([60.0, 75.0]))
