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
import functools
import sys

import torch

import capture
import engine
import flags
import stopping
import utils
from ema import ModelEma
from losses import accuracy, kd_loss, kdcl_teacher, mixed_accuracy, mixed_cross_entropy
from perturb import Perturber, add_perturbation_flags, bn_statistics_kept


def get_args_parser():
    """Flags: the shared ones plus the teacher, the distillation and (optional) perturbation settings."""
    parser = flags.get_args_parser("KDCL: online distillation of a group from an ensemble teacher.",
                                   script="kdcl", group=True, authors_pair=False)
    parser.set_defaults(views="independent")  # each network its own augmentation (KDCL, section 3)
    add = parser.add_argument_group("collaborative learning (KDCL)").add_argument
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


def kdcl_step(nets, optimizers, scaler, inputs, labels, labels_perm, lams, args, rt):
    """One step of the whole group; returns its statistics, each (n,) on the device.

    inputs: one batch per network, each its own view of the same images (a perturbed network's
    differs once more); lams: (n,) mixup weights, 1 for clean inputs.
    """
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
    scaler.scale(loss.sum()).backward()
    clipped = utils.step_optimizers(optimizers, scaler, args.clip_grad, args.clip_mode)
    return {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(),
            "acc": mixed_accuracy(logits, labels, labels_perm, lams),
            "teacher_acc": accuracy(teacher, labels).expand(len(nets)), **clipped}  # teacher_acc: the same for every network


def main(args):
    """Train the group on args.dataset with KDCL; returns the results dict."""
    group = flags.check_args(args)
    rt = utils.setup_runtime(args)
    views = len(group.names) if args.views == "independent" else 1  # one augmented copy per network, or one for all
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt, views)
    nets = utils.build_nets(group, data.info, rt, drop_path=args.drop_path)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    perturber = Perturber(every=args.perturb_every, ops=args.perturbations, num_nets=len(nets),
                          seed=args.seed, mean=data.info.mean, std=data.info.std, device=rt.device)
    scaler = utils.make_scaler(rt)
    averages = ModelEma(nets, args.model_ema, group.frozen)  # --model-ema; off by default
    run = engine.start_run(args, "kdcl", group, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           state={"scaler": scaler, "ema": averages, "perturber": perturber})
    train_step = functools.partial(kdcl_step, nets, optimizers, scaler, args=args, rt=rt)
    if rt.cuda_graphs:  # the whole group step captured once, then replayed
        train_step = capture.capture_step(run, train_step)

    with stopping.StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            stats = engine.epoch_stats(run, epoch)  # on a mid-epoch resume: the epoch's statistics so far
            for step, (images, labels) in engine.batches(run, train_loader, epoch):
                global_step = epoch * len(train_loader) + step
                schedule.step(global_step)
                # images: one view per network (--views independent), or one batch for all
                batch = perturber(global_step, images, labels)
                with bn_statistics_kept(nets[batch.net] if batch.net >= 0 and not args.update_bn_on_perturbed else None):
                    stats.add(train_step(batch.inputs, labels, batch.labels_perm, batch.lams))
                averages.update(nets)  # after the BatchNorm statistics are restored
                engine.log_step(run, epoch, step, stats)
                if stop.requested(step):  # SIGINT/SIGTERM: save last.pt and exit (130/143)
                    sys.exit(stopping.save_and_stop(run, stop, epoch, step + 1, stats))
            evals = engine.evaluate_epoch(run, val_loader, test_loader, epoch)
            rows = engine.log_epoch(run, epoch, stats, evals, schedule)
            if engine.diverged(rows):  # NaN/inf: stop before saving anything of this epoch (exit 3)
                raise engine.divergence(run, epoch, stats, rows)
            run.checkpoints.save(epoch, evals)
            if stop.requested() and epoch + 1 < args.epochs:
                sys.exit(stopping.save_and_stop(run, stop, epoch + 1, 0))
            if engine.stop_after(run, epoch):  # --stop-after N epochs in this invocation
                break
    return engine.finish(run)


if __name__ == "__main__":
    flags.launch(main, get_args_parser())
