"""Deep mutual learning (Zhang et al., CVPR 2018), the baseline of competitive distillation.

A group of n >= 2 networks trains on one task; every network learns from every other one:
L_i = CE_i + w * mean over j != i of KD(i <- j). By default all networks are updated together,
from the same step's predictions (synchronous, as the competitive step); --sequential updates
them one after the other, each learning from the others' latest predictions (the DML paper's
Algorithm 1). The authors' DML baseline also perturbed one random network every 10 steps: off
here unless --perturb-every.

    python train_mutual_learning.py --models resnet32 mobilenet_v1 --dataset cifar100
    python train_mutual_learning.py --model1 resnet --model2 mobilenet --dataset cifar10
"""
import torch

import engine
import flags
import lifecycle
import stopping
import utils
from losses import kd_loss, mixed_accuracy, mixed_cross_entropy, pairwise_kd
from perturb import add_perturbation_flags, bn_statistics_kept


def get_args_parser():
    """Flags: the shared ones plus the distillation and (optional) perturbation settings."""
    parser = flags.get_args_parser("Deep mutual learning of a group of networks.", script="mutual", group=True)
    add = flags.adder(parser.add_argument_group("mutual learning"))
    add("--kd-weight", type=float, default=1.0, valid="non-negative", help="weight w of the distillation term (DML: 1)")
    add("--temperature", type=float, default=1.0, valid="positive", help="distillation temperature T (DML: 1)")
    add("--sequential", action="store_true",
        help="update the networks one after the other, each distilling from the others' latest predictions "
             "(DML paper, Algorithm 1; one extra forward per network and step); default: all at once")
    add_perturbation_flags(add, every=0, every_help="perturb one random network every N steps, counted over the whole run "
                                                    "(0 = plain DML; the authors' baseline used 10)")
    return parser


def mutual_step(run, inputs, labels, labels_perm, lams):
    """One synchronous step of the whole group; returns its statistics, each (n,) on the device.

    inputs: one batch per network (a perturbed network's differs); lams: (n,) mixup weights
    (1 for clean inputs), so every network's loss is lam * CE(y) + (1 - lam) * CE(y_perm).
    """
    nets, optimizers, args, rt = run.nets, run.optimizers, run.args, run.rt
    with utils.autocast(rt):
        logits = torch.stack([net(x) for net, x in zip(nets, utils.to_inputs(inputs, rt))]).float()  # (n, B, C)
    ce = torch.stack([mixed_cross_entropy(z, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
                      for z, lam in zip(logits, lams)])
    # Every peer teaches: the mean over the n - 1 others (the diagonal KD(i <- i) is zero).
    kd = pairwise_kd(logits, args.temperature).sum(1) / (len(nets) - 1)
    loss = ce + args.kd_weight * kd
    for optimizer in optimizers:
        if optimizer is not None:  # a --freeze network has none
            optimizer.zero_grad(set_to_none=True)
    # Every target in kd is detached, so one backward gives each network exactly its own gradient.
    run.scaler.scale(loss.sum()).backward()
    clipped = utils.step_optimizers(optimizers, run.scaler, args.clip_grad, args.clip_mode)
    return {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(),
            "acc": mixed_accuracy(logits, labels, labels_perm, lams), **clipped}


def sequential_mutual_step(run, inputs, labels, labels_perm, lams):
    """The DML paper's update (Zhang et al. 2018, Algorithm 1): network i steps after networks < i
    and learns from their updated predictions. Same arguments and statistics as mutual_step."""
    nets, optimizers, scaler, args, rt = run.nets, run.optimizers, run.scaler, run.args, run.rt
    inputs = utils.to_inputs(inputs, rt)
    with utils.autocast(rt):
        logits = [net(x).float() for net, x in zip(nets, inputs)]  # i's graph is valid until i steps
    targets = [z.detach() for z in logits]
    ce = [mixed_cross_entropy(z, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
          for z, lam in zip(logits, lams)]
    kd, norms = [], [None] * len(nets)
    for i, (net, optimizer) in enumerate(zip(nets, optimizers)):
        kd.append(sum(kd_loss(logits[i], targets[j], args.temperature) for j in range(len(nets)) if j != i)
                  / (len(nets) - 1))
        if optimizer is None:  # a --freeze network: no update, and its predictions stay as they were
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(ce[i] + args.kd_weight * kd[i]).backward()
        norms[i] = utils.clip_gradients(optimizer, scaler, args.clip_grad, args.clip_mode)
        scaler.step(optimizer)
        if i < len(nets) - 1:  # the later networks learn from i's new predictions (its BatchNorm counts the batch once)
            with torch.no_grad(), utils.autocast(rt), bn_statistics_kept(net):
                targets[i] = net(inputs[i]).float()
    scaler.update()
    ce, kd = torch.stack(ce).detach(), torch.stack(kd).detach()
    clipped = {"grad_norm": torch.stack([ce.new_zeros(()) if n is None else n for n in norms])} \
        if any(n is not None for n in norms) else {}
    return {"loss": ce + args.kd_weight * kd, "ce": ce, "kd": kd,
            "acc": mixed_accuracy(torch.stack(logits).detach(), labels, labels_perm, lams), **clipped}


def main(args):
    """Train the group on args.dataset with deep mutual learning; returns the results dict."""
    step = sequential_mutual_step if args.sequential else mutual_step
    run = lifecycle.start_run(args, step, views=args.views, perturbation=True)
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
