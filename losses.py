"""The losses of the papers, as small pure functions: competitive distillation and deep mutual learning,
and the online-distillation baselines (ONE, KDCL, OKDDip) at the end.

KD(i <- j) = T^2 * KL(sg(p_j) || p_i) with p = softmax(z / T), summed over classes and averaged
over the batch (Hinton et al. 2015; deep mutual learning, Zhang et al. 2018; competitive
distillation, Shi et al. 2025, section 3); sg() is stop-gradient.
"""
import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, temperature=1.0, detach_teacher=True):
    """KD(student <- teacher) = T^2 KL(sg(p_teacher) || p_student), summed over classes, batch mean;
    with detach_teacher=False, T^2 KL(p_teacher || p_student) and the gradient also flows into the teacher.

    OKDDip (Chen et al., AAAI 2020, arXiv 1912.00350) does not detach its teachers: in the official
    code (github.com/DefangChen/OKDDip @c6a05de8, utils.py KL_Loss) the KD term is the only way the
    attention projections learn. That code adds 1e-7 to the teacher's probabilities; this does not.
    """
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def pairwise_kd(logits, temperature=1.0):
    """kd[i, j] = KD(i <- j) for every pair of a group's logits (n, B, C); the diagonal is zero.

    Row i carries gradient only into network i: the targets (column networks) are detached, so
    one backward of a sum of rows gives each network exactly its own distillation gradient.
    """
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)          # (n, B, C), with gradient
    log_q = log_p.detach()                                               # the teachers' side
    kl = (log_q.exp()[None] * (log_q[None] - log_p[:, None])).sum(-1)   # (n_student, n_teacher, B)
    return temperature**2 * kl.mean(-1)


def mixed_cross_entropy(logits, labels, labels_perm, lam, label_smoothing=0.0):
    """lam * CE(logits, labels) + (1 - lam) * CE(logits, labels_perm), each a batch mean: the loss
    of a mixup batch (Zhang et al. 2018), and plain CE when lam = 1."""
    return (lam * F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + (1 - lam) * F.cross_entropy(logits, labels_perm, label_smoothing=label_smoothing))


def soft_target_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (mixup/cutmix with label smoothing), batch mean."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def accuracy(logits, labels):
    """Top-1 accuracy in % over the last-but-one axis: (B, C) -> scalar, (n, B, C) -> (n,)."""
    return (logits.argmax(-1) == labels).float().mean(-1) * 100


def mixed_accuracy(logits, labels, labels_perm, lams):
    """Top-1 accuracy in % of batches that may be mixup batches, weighted as their loss is:
    lam * acc(labels) + (1 - lam) * acc(labels_perm); plain accuracy when lam = 1.
    (n, B, C) logits with (n,) lams -> (n,); (B, C) with a scalar lam -> scalar."""
    return lams * accuracy(logits, labels) + (1 - lams) * accuracy(logits, labels_perm)


def sigmoid_rampup(epoch, rampup_epochs):
    """w(e) = exp(-5 (1 - clip(e, 0, R) / R)^2), and 1.0 when R = 0 (no ramp-up).

    The ramp-up of Laine & Aila 2017 (arXiv 1610.02242) that ONE and OKDDip put on their
    distillation terms, as in utils/ramps.py of github.com/Lan1991Xu/ONE_NeurIPS2018 @54afde30 and
    train_GL.py of github.com/DefangChen/OKDDip @c6a05de8: e is the 0-based epoch (both loops run
    `for epoch in range(start_epoch, epochs)` from 0), so w(0) = exp(-5) and w(e) = 1 from e = R.
    """
    if rampup_epochs == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), rampup_epochs) / rampup_epochs
    return math.exp(-5.0 * phase * phase)


def kdcl_teacher(logits, labels, mode):
    """KDCL's ensemble teacher (Guo et al., "Online Knowledge Distillation via Collaborative
    Learning", CVPR 2020, pp. 11020-11029) from n networks' logits (n, B, C); detached, (B, C).

    naive:    per sample, the logits of the network with the lowest cross-entropy on that sample
              (ties: the lowest index);
    minlogit: z_t[c] = min_k (z_k[c] - z_k[y]), so z_t[y] = 0 and CE(z_t) <= min_k CE(z_k) per sample;
    mean:     the mean of the logits, not one of the paper's variants but the teacher of the unofficial
              reimplementation (github.com/shaoeric/Online-Knowledge-Distillation-via-Collaborative-Learning
              @1ba54615, train.py).
    The paper's Linear and General variants are not here: the readable sources do not fix their
    constraints and solver.
    """
    logits = logits.detach()
    if mode == "naive":
        ce = -F.log_softmax(logits.float(), dim=-1).gather(-1, labels.expand(len(logits), -1)[..., None])[..., 0]
        best = ce.argmin(dim=0)                                       # (B,), first index on ties
        return logits[best, torch.arange(logits.shape[1], device=logits.device)]
    if mode == "minlogit":
        target = logits.gather(-1, labels.expand(len(logits), -1)[..., None])   # (n, B, 1): z_k[y]
        return (logits - target).min(dim=0).values
    if mode == "mean":
        return logits.mean(dim=0)
    raise ValueError(f"kdcl_teacher: unknown mode '{mode}'; choose from: naive, minlogit, mean")


def gated_ensemble(branch_logits, gate):
    """ONE's teacher z_e = sum_i g_i z_i per sample (Lan et al., NeurIPS 2018, arXiv 1806.04606):
    branch logits (m, B, C) and gate (B, m) -> (B, C)."""
    return torch.einsum("mbc,bm->bc", branch_logits, gate)


def peer_attention_weights(queries, keys):
    """OKDDip's alpha_ab = softmax over b of q_a . k_b (Chen et al., AAAI 2020, arXiv 1912.00350):
    queries and keys (p, B, d) -> (B, p, p), rows summing to 1; a attends to itself too, and
    there is no 1/sqrt(d) scaling, as in the official resnet_GL.py (github.com/DefangChen/OKDDip @c6a05de8)."""
    return F.softmax(torch.einsum("abd,ebd->bae", queries, keys), dim=-1)


def peer_teachers(attention, peer_logits):
    """OKDDip's peer teachers t_a = sum_b alpha_ab z_b: attention (B, p, p) and peer logits (p, B, C)
    -> (p, B, C); not detached here (the official code trains through them)."""
    return torch.einsum("bae,ebc->abc", attention, peer_logits)


def peer_mean_kd(logits, mean_logits, temperature=3.0):
    """PCL's peer mean teacher (Wu & Gong, AAAI 2021, section 3): for each peer i, the mean over the other
    peers j of KD_T(sg(z'_j) || z_i), z'_j the temporal mean network's peer j (on its own view); (m,).
    logits, mean_logits: (m, B, C)."""
    m = len(logits)
    return torch.stack([sum(kd_loss(logits[i], mean_logits[j], temperature) for j in range(m) if j != i) / (m - 1)
                        for i in range(m)])


def self_distillation(logits, features, labels, *, temperature=3.0, kd_weight=0.3, hint_weight=0.03):
    """BYOT's losses per exit (Zhang et al., ICCV 2019, section 3.2), the deepest exit last; returns (loss,
    ce, kd, hint), each (k,). logits (k, B, C) and pooled features (k, B, F) of every exit.

    The deepest exit learns from the labels alone: loss = ce = CE(z_C, y). A shallow exit i learns from the
    labels, from the deepest exit's softened outputs and from its features: loss = (1 - kd_weight) ce + kd
    + hint, ce = CE(z_i, y), kd = kd_weight KL(sg(softmax(z_C / T)) || softmax(z_i / T)) (without T^2: the
    official code's soft cross-entropy, which has this gradient), hint = hint_weight ||f_i - sg(f_C)||_2
    (batch mean of the L2 norm, not squared, as the official code). Defaults: the official code's 0.3,
    T = 3 and 0.03, for every shallow exit (that code skips the hint of one of them)."""
    k = len(logits)
    ce = torch.stack([F.cross_entropy(z, labels) for z in logits.float()])
    teacher, deepest = logits[-1].float().detach(), features[-1].float().detach()
    kd = torch.stack([kd_loss(z, teacher, temperature) / temperature**2 for z in logits[:-1]] + [ce.new_zeros(())])
    hint = torch.stack([(f.float() - deepest).norm(dim=-1).mean() for f in features[:-1]] + [ce.new_zeros(())])
    ce_weight = torch.where(torch.arange(k, device=ce.device) < k - 1, 1 - kd_weight, 1.0)
    return ce_weight * ce + kd_weight * kd + hint_weight * hint, ce, kd_weight * kd, hint_weight * hint
