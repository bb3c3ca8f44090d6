"""Competitive distillation (Shi et al., ICCV 2025, section 3).

A group of n >= 2 networks trains on one task. Every step the networks compete on their batch
cross-entropy; each network learns (KL distillation) from the networks that beat it, the step's
leader trains on cross-entropy alone, and all networks update together. Every --perturb-every
steps one random network sees a perturbed copy of the batch (stochastic perturbation, section 3.2).

    python train_competitive_distillation.py --models resnet32 resnet32 --dataset cifar100
    python train_competitive_distillation.py --teacher resnet --student vit --dataset cifar10
"""
import torch

import engine
import flags
import lifecycle
import stopping
import utils
from losses import mixed_accuracy, mixed_cross_entropy, pairwise_kd
from perturb import add_perturbation_flags


def get_args_parser():
    """Flags: the shared ones plus the competition, distillation and perturbation settings."""
    parser = flags.get_args_parser("Competitive distillation of a group of networks.", script="competitive", group=True)
    add = flags.adder(parser.add_argument_group("competitive distillation"))
    add("--teacher-rule", default="better", choices=["better", "best"],
        help="better: learn from every network with a lower loss (authors' code); "
             "best: only from the step's leader (paper text)")
    add("--kd-weight", type=float, default=1.0, valid="non-negative", help="weight w of the distillation term (authors: 1)")
    add("--temperature", type=float, default=1.0, valid="positive", help="distillation temperature T (authors: 1)")
    add_perturbation_flags(add, every=10, every_help="perturb one random network every N steps, counted over the whole run "
                                                     "(authors: 10; 0 = off)")
    return parser


def select_teachers(ranking_ce, rule):
    """Competitive rule (section 3.1): teacher_mask[i, j] is True when network j teaches network i.

    ranking_ce: (n,) batch-mean cross-entropy of each network on its own input (lower is better).
    rule "better": every network with a strictly lower loss teaches (S_i = {j : l_j < l_i}).
    rule "best":   only the step's leader (argmin, first index on ties) teaches, and only the
                   networks whose loss is strictly higher than the leader's.
    Ties never teach each other and the leader has no teacher, under both rules; for n = 2 the
    rules coincide. Pure tensor operations: no host synchronisation, so the step can be captured.
    """
    teacher_mask = ranking_ce[None, :] < ranking_ce[:, None]
    if rule == "best":
        leader = torch.arange(ranking_ce.numel(), device=ranking_ce.device) == ranking_ce.argmin()
        teacher_mask = teacher_mask & leader[None, :]
    return teacher_mask


def competitive_step(run, inputs, labels, labels_perm, lams):
    """One synchronous step of the whole group; returns its statistics, each (n,) on the device.

    inputs: one batch per network (the perturbed network's differs); lams: (n,) mixup weights
    (1 for clean inputs), so every network's loss is lam * CE(y) + (1 - lam) * CE(y_perm).
    """
    nets, optimizers, args, rt = run.nets, run.optimizers, run.args, run.rt
    with utils.autocast(rt):
        logits = torch.stack([net(x) for net, x in zip(nets, utils.to_inputs(inputs, rt))]).float()  # (n, B, C)
    ce = torch.stack([mixed_cross_entropy(z, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
                      for z, lam in zip(logits, lams)])
    # Under data parallelism every process must pick the same teachers: rank on the global mean.
    ranking_ce = utils.all_reduce_sum(ce.detach().clone(), rt) / rt.world_size
    teacher_mask = select_teachers(ranking_ce, args.teacher_rule).float()
    teachers = teacher_mask.sum(1)
    kd = (pairwise_kd(logits, args.temperature) * teacher_mask).sum(1) / teachers.clamp(min=1)
    loss = ce + args.kd_weight * kd                   # the leader's kd is 0: it trains on CE only
    for optimizer in optimizers:
        if optimizer is not None:  # a --freeze network has none
            optimizer.zero_grad(set_to_none=True)
    # Every target in kd is detached, so one backward gives each network exactly its own gradient.
    run.scaler.scale(loss.sum()).backward()
    clipped = utils.step_optimizers(optimizers, run.scaler, args.clip_grad, args.clip_mode)
    # one_hot would check its input on the host; a comparison keeps the step free of syncs
    leader = (torch.arange(len(nets), device=ce.device) == ranking_ce.argmin()).float()
    # Who learned from whom: taught_by_net<j>[i] = 1 when network j taught network i at this step.
    taught_by = {f"taught_by_net{j}": teacher_mask[:, j] for j in range(len(nets))}
    return {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(),
            "acc": mixed_accuracy(logits, labels, labels_perm, lams),  # a mixup batch's weighted as its loss
            "leader_share": leader, "teachers": teachers, **taught_by, **clipped}


def main(args):
    """Train the group on args.dataset with competitive distillation; returns the results dict."""
    run = lifecycle.start_run(args, competitive_step, views=args.views, perturbation=True)
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
