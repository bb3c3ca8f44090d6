"""The online-distillation baselines' losses (ONE, KDCL, OKDDip) against hand-computed small examples."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses


def per_sample_ce(logits, labels):
    """Cross-entropy of each sample (B,) of logits (B, C)."""
    return F.cross_entropy(logits, labels, reduction="none")


# --- ramp-up ---------------------------------------------------------------------------------

def test_sigmoid_rampup_values():
    """exp(-5 (1 - e/R)^2) on the 0-based epoch, clipped to [0, R]; 1 when R = 0."""
    assert losses.sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5.0))
    assert losses.sigmoid_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert losses.sigmoid_rampup(79, 80) == pytest.approx(math.exp(-5.0 / 80**2))
    assert losses.sigmoid_rampup(80, 80) == 1.0
    assert losses.sigmoid_rampup(299, 80) == 1.0
    assert losses.sigmoid_rampup(-3, 80) == pytest.approx(math.exp(-5.0))
    assert losses.sigmoid_rampup(0, 0) == 1.0 and losses.sigmoid_rampup(17, 0) == 1.0
    weights = [losses.sigmoid_rampup(epoch, 10) for epoch in range(12)]
    assert weights == sorted(weights) and weights[0] < weights[5] < weights[10] == 1.0


# --- KD with or without the teacher's gradient -----------------------------------------------

def test_kd_loss_matches_hand_computation():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    for T in (1.0, 3.0):
        p = F.softmax(teacher / T, dim=-1)
        expected = T**2 * (p * (p.log() - F.log_softmax(student / T, dim=-1))).sum(-1).mean()
        for detach in (True, False):
            assert torch.allclose(losses.kd_loss(student, teacher, T, detach_teacher=detach),
                                  expected, atol=1e-6)


def test_kd_loss_gradient_reaches_the_teacher_only_when_asked():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    losses.kd_loss(student, teacher, 3.0).backward()
    assert teacher.grad is None and student.grad.abs().max() > 0
    losses.kd_loss(student, teacher, 3.0, detach_teacher=False).backward()
    assert teacher.grad.abs().max() > 0
    # by hand: d/dz_t of T^2 KL(q || p) with q = softmax(z_t/T) is T (q * (log q - log p - KL)) per sample
    T = 3.0
    q, log_p = F.softmax(teacher / T, -1), F.log_softmax(student / T, -1)
    kl = (q * (q.log() - log_p)).sum(-1, keepdim=True)
    expected = T * q * (q.log() - log_p - kl) / len(teacher)
    assert torch.allclose(teacher.grad, expected.detach(), atol=1e-6)


# --- KDCL ------------------------------------------------------------------------------------

def kdcl_example():
    """Three networks, two samples, three classes; labels (0, 2)."""
    logits = torch.tensor([
        [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]],     # network 0: good on sample 0, fair on sample 1
        [[0.0, 3.0, 0.0], [0.0, 0.0, 4.0]],     # network 1: wrong on sample 0, best on sample 1
        [[3.0, 0.0, 0.0], [1.0, 2.0, 0.0]],     # network 2: best on sample 0, wrong on sample 1
    ])
    return logits, torch.tensor([0, 2])


def test_kdcl_naive_picks_the_lowest_ce_network_per_sample():
    logits, labels = kdcl_example()
    teacher = losses.kdcl_teacher(logits, labels, "naive")
    assert torch.equal(teacher, torch.stack([logits[2, 0], logits[1, 1]]))


def test_kdcl_naive_ties_go_to_the_first_network():
    # networks 1 and 2 have exactly the same CE (log 2: exp(-100) vanishes next to 1 + 1) with
    # different logits; network 0 is worse
    logits = torch.tensor([[[0.0, 1.0, 1.0]], [[0.0, 0.0, -100.0]], [[0.0, -100.0, 0.0]]])
    labels = torch.tensor([0])
    ce = torch.stack([per_sample_ce(z, labels) for z in logits])[:, 0]
    assert ce[1] == ce[2] < ce[0]
    assert torch.equal(losses.kdcl_teacher(logits, labels, "naive"), logits[1])
    assert torch.equal(losses.kdcl_teacher(logits[[0, 2, 1]], labels, "naive"), logits[2])


def test_kdcl_minlogit_by_hand():
    logits, labels = kdcl_example()
    teacher = losses.kdcl_teacher(logits, labels, "minlogit")
    # sample 0 (y = 0): z_k - z_k[0] = [0,-1,-2], [0,3,0], [0,-3,-3] -> min [0,-3,-3]
    # sample 1 (y = 2): z_k - z_k[2] = [-1,-1,0], [-4,-4,0], [1,2,0]  -> min [-4,-4,0]
    assert torch.equal(teacher, torch.tensor([[0.0, -3.0, -3.0], [-4.0, -4.0, 0.0]]))


def test_kdcl_minlogit_zero_target_and_ce_never_above_the_best():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (16,), generator=generator)
    teacher = losses.kdcl_teacher(logits, labels, "minlogit")
    assert torch.all(teacher.gather(1, labels[:, None]) == 0)
    best = torch.stack([per_sample_ce(z, labels) for z in logits]).min(0).values
    assert torch.all(per_sample_ce(teacher, labels) <= best + 1e-6)


def test_kdcl_mean_and_detach():
    logits, labels = kdcl_example()
    logits.requires_grad_(True)
    for mode in ("naive", "minlogit", "mean"):
        assert not losses.kdcl_teacher(logits, labels, mode).requires_grad
    assert torch.allclose(losses.kdcl_teacher(logits, labels, "mean"),
                          torch.tensor([[5 / 3, 4 / 3, 0.0], [1 / 3, 2 / 3, 5 / 3]]))


def test_kdcl_unknown_mode_is_a_value_error():
    logits, labels = kdcl_example()
    with pytest.raises(ValueError, match="naive, minlogit, mean"):
        losses.kdcl_teacher(logits, labels, "linear")


# --- ONE -------------------------------------------------------------------------------------

def test_gated_ensemble_by_hand():
    branch_logits = torch.tensor([[[1.0, 0.0], [2.0, 2.0]],
                                  [[0.0, 1.0], [4.0, 0.0]],
                                  [[3.0, 3.0], [0.0, 6.0]]])       # (m=3, B=2, C=2)
    gate = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])      # (B, m)
    expected = torch.tensor([[0.5, 0.5], [1.5, 3.5]])
    assert torch.allclose(losses.gated_ensemble(branch_logits, gate), expected)


def test_one_teacher_detached_sends_no_gradient_to_gate_or_other_branches():
    generator = torch.Generator().manual_seed(1)
    branch_logits = torch.randn(3, 4, 5, generator=generator).requires_grad_(True)
    gate_logits = torch.randn(4, 3, generator=generator).requires_grad_(True)
    ensemble = losses.gated_ensemble(branch_logits, F.softmax(gate_logits, dim=1))
    losses.kd_loss(branch_logits[1], ensemble, 3.0).backward(retain_graph=True)
    assert gate_logits.grad is None
    assert branch_logits.grad[[0, 2]].abs().max() == 0 and branch_logits.grad[1].abs().max() > 0
    # the ensemble's CE is what trains the gate (and every branch)
    labels = torch.tensor([0, 1, 2, 3])
    F.cross_entropy(ensemble, labels).backward()
    assert gate_logits.grad.abs().max() > 0 and branch_logits.grad[0].abs().max() > 0


# --- OKDDip ----------------------------------------------------------------------------------

def test_peer_attention_weights_by_hand():
    queries = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])     # (p=2, B=1, d=2)
    keys = torch.tensor([[[1.0, 1.0]], [[2.0, 0.0]]])
    attention = losses.peer_attention_weights(queries, keys)
    # energies q_a . k_b: a=0: [1, 2]; a=1: [2, 0]; softmax over b, no 1/sqrt(d)
    e = math.e
    expected = torch.tensor([[[e / (e + e**2), e**2 / (e + e**2)],
                              [e**2 / (e**2 + 1), 1 / (e**2 + 1)]]])
    assert attention.shape == (1, 2, 2)
    assert torch.allclose(attention, expected, atol=1e-6)


def test_peer_attention_rows_sum_to_one_and_teachers_by_hand():
    generator = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(3, 4, 8, generator=generator), torch.randn(3, 4, 8, generator=generator)
    attention = losses.peer_attention_weights(queries, keys)
    assert attention.shape == (4, 3, 3)
    assert torch.allclose(attention.sum(-1), torch.ones(4, 3), atol=1e-6)
    peer_logits = torch.randn(3, 4, 5, generator=generator)
    teachers = losses.peer_teachers(attention, peer_logits)
    assert teachers.shape == (3, 4, 5)
    for a in range(3):
        for sample in range(4):
            expected = sum(attention[sample, a, b] * peer_logits[b, sample] for b in range(3))
            assert torch.allclose(teachers[a, sample], expected, atol=1e-6)


def test_projections_learn_only_through_undetached_teachers():
    """W_q, W_k get gradients from the peers' KD only when the teachers are not detached."""
    torch.manual_seed(3)
    features = torch.randn(3, 4, 16)
    query, key = torch.nn.Linear(16, 2, bias=False), torch.nn.Linear(16, 2, bias=False)
    peer_logits = torch.randn(3, 4, 5, requires_grad=True)
    for detach, learns in ((True, False), (False, True)):
        query.zero_grad(set_to_none=True)
        key.zero_grad(set_to_none=True)
        attention = losses.peer_attention_weights(query(features), key(features))
        teachers = losses.peer_teachers(attention, peer_logits)
        kd = sum(losses.kd_loss(peer_logits[a], teachers[a], 3.0, detach_teacher=detach) for a in range(3))
        kd.backward()
        for projection in (query, key):
            received = projection.weight.grad is not None and projection.weight.grad.abs().max() > 0
            assert received == learns


def test_peer_mean_kd_by_hand():
    """PCL's peer mean teacher: peer i's KD from each other peer j of the temporal mean, averaged over j."""
    import math
    logits = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 2.0]]])      # three peers, one sample, two classes
    mean = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]], [[3.0, 0.0]]])

    def kl(teacher, student, t):   # T^2 KL(softmax(teacher / T) || softmax(student / T)), written out
        p = [math.exp(v / t) for v in teacher]
        q = [math.exp(v / t) for v in student]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        return t * t * sum(a * math.log(a / b) for a, b in zip(p, q))

    t = 3.0
    expected = [(kl(mean[1, 0].tolist(), logits[0, 0].tolist(), t) + kl(mean[2, 0].tolist(), logits[0, 0].tolist(), t)) / 2,
                (kl(mean[0, 0].tolist(), logits[1, 0].tolist(), t) + kl(mean[2, 0].tolist(), logits[1, 0].tolist(), t)) / 2,
                (kl(mean[0, 0].tolist(), logits[2, 0].tolist(), t) + kl(mean[1, 0].tolist(), logits[2, 0].tolist(), t)) / 2]
    assert losses.peer_mean_kd(logits, mean, t).tolist() == pytest.approx(expected, rel=1e-5)
    student = logits.clone().requires_grad_(True)
    teacher = mean.clone().requires_grad_(True)
    losses.peer_mean_kd(student, teacher, t).sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the temporal mean is never trained


def test_self_distillation_by_hand():
    """BYOT per exit: the deepest exit CE only; a shallow exit (1 - a) CE + a KL(deepest || exit) at T
    (no T^2) + h ||f_i - f_deepest||; no gradient into the deepest exit's logits or features through them."""
    import math
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)   # exits 1, 2, deepest
    features = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]], [[0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([1])
    loss, ce, kd, hint = losses.self_distillation(logits, features, labels, temperature=2.0, kd_weight=0.3, hint_weight=0.1)
    ce_of = lambda z: -z[1] + math.log(math.exp(z[0]) + math.exp(z[1]))
    assert ce.tolist() == pytest.approx([ce_of([2.0, 0.0]), ce_of([0.0, 0.0]), ce_of([0.0, 1.0])])
    p = [math.exp(0.0) / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]      # deepest at T = 2
    q1 = [math.exp(1.0) / (math.exp(1.0) + 1), 1 / (math.exp(1.0) + 1)]                 # exit 1 at T = 2
    kl1 = sum(a * math.log(a / b) for a, b in zip(p, q1))
    kl2 = sum(a * math.log(a / 0.5) for a in p)
    assert kd.tolist() == pytest.approx([0.3 * kl1, 0.3 * kl2, 0.0], rel=1e-5)
    assert hint.tolist() == pytest.approx([0.1 * 5.0, 0.0, 0.0])                          # |(3, 4)| = 5
    assert loss.tolist() == pytest.approx([0.7 * ce[0].item() + 0.3 * kl1 + 0.5, 0.7 * ce[1].item() + 0.3 * kl2, ce[2].item()],
                                          rel=1e-5)
    (kd.sum() + hint.sum()).backward()
    assert logits.grad[2].abs().sum() == 0 and features.grad[2].abs().sum() == 0     # the deepest exit teaches only


def test_pcl_and_byot_parameter_counts():
    """PCL on ResNet-32, 3 peers, 100 classes: ONE's branched network without the gate plus the peer-ensemble
    classifier (3 x 64 -> 100), and a temporal mean of the same size that never trains; BYOT on ResNet-32:
    the network plus its two exits, counted by hand (see below); both deploy a plain ResNet-32 (0.47 M)."""
    import models
    one = models.create_model("one:resnet32:3", num_classes=100, img_size=32, in_chans=3)
    gate = sum(p.numel() for p in one.gate.parameters())
    pcl = models.create_model("pcl:resnet32:3", num_classes=100, img_size=32, in_chans=3)
    trained = sum(p.numel() for p in pcl.parameters() if p.requires_grad)
    assert trained == sum(p.numel() for p in one.parameters()) - gate + (3 * 64 * 100 + 100)
    assert sum(p.numel() for p in pcl.mean.parameters()) == trained and not any(p.requires_grad for p in pcl.mean.parameters())
    plain = sum(p.numel() for p in models.create_model("resnet32", num_classes=100, img_size=32, in_chans=3).parameters())
    assert plain == pytest.approx(0.47e6, rel=0.01)
    # exit 1 (16 channels): 1x1 16->4 (64), BN 4 (8), 4x4 stride 4, 4->4 (256), BN (8), 1x1 4->64 (256), BN 64 (128),
    # Linear 64->100 (6,500): 7,220; exit 2 (32 channels): 256 + 16 + 2x2x8x8 (256) + 16 + 512 + 128 + 6,500 = 7,684
    byot = models.create_model("byot:resnet32", num_classes=100, img_size=32, in_chans=3)
    assert sum(p.numel() for p in byot.parameters()) == plain + 7220 + 7684
    for net in (pcl, byot):
        assert sum(v.numel() for k, v in net.deployed_state_dict().items() if "running" not in k and "num_batches" not in k) == plain
