"""The losses of the paper, as small pure functions.

KD(i <- j) = T^2 * KL(sg(p_j) || p_i) with p = softmax(z / T), summed over classes and averaged
over the batch (Hinton et al. 2015; deep mutual learning, Zhang et al. 2018; competitive
distillation, Shi et al. 2025, section 3); sg() is stop-gradient.
"""
import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """KD(student <- teacher) = T^2 KL(sg(p_teacher) || p_student), summed over classes, batch mean."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
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
