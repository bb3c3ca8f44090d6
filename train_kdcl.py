"""KDCL: online knowledge distillation via collaborative learning (Guo et al., CVPR 2020, pp. 11020-11029).

A group of n >= 2 independent networks (any registered models, of different architectures too)
trains on one task; each network sees its own random augmentation of the batch's images (the
paper's invariance to perturbations; --views). Every step an ensemble teacher is built from all
networks' detached logits, and every network learns from it:
L_i = CE_i + lambda * T^2 * KL(sg(p_t) || p_i). The teacher (--teacher) is the paper's naive one
(per sample, the logits of the network with the lowest cross-entropy on that sample), its MinLogit
one (z_t[c] = min_k (z_k[c] - z_k[y])), or the mean of the logits (what an unofficial
reimplementation used). No official code was released.

    python train_kdcl.py --models resnet32 resnet32 --dataset cifar100
    python train_kdcl.py --models resnet32 mobilenet_v2 --teacher minlogit --dataset cifar100
"""
import torch

import engine
import flags
import lifecycle
import stopping
import utils
from losses import accuracy, kd_loss, kdcl_teacher, mixed_accuracy, mixed_cross_entropy
from perturb import add_perturbation_flags


def get_args_parser():
    """Flags: the shared ones plus the teacher, the distillation and (optional) perturbation settings."""
    parser = flags.get_args_parser("KDCL: online distillation of a group from an ensemble teacher.",
                                   script="kdcl", group=True, authors_pair=False)
    parser.set_defaults(views="independent")  # each network its own augmentation (KDCL, section 3)
    add = flags.adder(parser.add_argument_group("collaborative learning (KDCL)"))
    add("--teacher", dest="kdcl_teacher", default="naive", choices=["naive", "minlogit", "mean"],
        help="the ensemble teacher: naive (per sample the best network's logits) or minlogit (Guo et al. 2020), "
             "mean (the mean logits, as an unofficial reimplementation)")
    add("--kd-weight", type=float, default=1.0,
        help="weight lambda of the distillation term (the paper's value is not given in its readable text; an "
             "unofficial reimplementation's 0.5 CE + 0.5 KD is this loss halved)")
    add("--temperature", type=float, default=4.0,
        help="distillation temperature T (the unofficial reimplementation's 4; the paper's is not given in its readable text)")
    add_perturbation_flags(add, every=0, every_help="perturb one random network every N steps, counted over the whole run "
                                                    "(0 = off, as in KDCL)")
    return parser


def kdcl_step(run, inputs, labels, labels_perm, lams):
    """One step of the whole group; returns its statistics, each (n,) on the device.

    inputs: one batch per network, each its own view of the same images (a perturbed network's
    differs once more); lams: (n,) mixup weights, 1 for clean inputs.
    """
    nets, optimizers, args, rt = run.nets, run.optimizers, run.args, run.rt
    with utils.autocast(rt):
        logits = torch.stack([net(x) for net, x in zip(nets, utils.to_inputs(inputs, rt))]).float()  # (n, B, C)
    ce = torch.stack([mixed_cross_entropy(z, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
                      for z, lam in zip(logits, lams)])
    # The teacher is built from every network's logits on its own view, detached (Guo et al. 2020, section 3).
    teacher = kdcl_teacher(logits, labels, args.kdcl_teacher)                                  # (B, C)
    kd = torch.stack([kd_loss(z, teacher, args.temperature) for z in logits])
    loss = ce + args.kd_weight * kd
    for optimizer in optimizers:
        if optimizer is not None:  # a --freeze network has none
            optimizer.zero_grad(set_to_none=True)
    # The teacher is detached, so one backward gives each network exactly its own gradient.
    run.scaler.scale(loss.sum()).backward()
    clipped = utils.step_optimizers(optimizers, run.scaler, args.clip_grad, args.clip_mode)
    return {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(),
            "acc": mixed_accuracy(logits, labels, labels_perm, lams),
            "teacher_acc": accuracy(teacher, labels).expand(len(nets)), **clipped}  # teacher_acc: the same for every network


def main(args):
    """Train the group on args.dataset with KDCL; returns the results dict."""
    run = lifecycle.start_run(args, kdcl_step, views=args.views, perturbation=True)  # --views independent by default
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
