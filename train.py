"""Vanilla training of one network with cross-entropy: the baseline row of every comparison,
with the same data, schedule, logging and checkpoints as the collaborative scripts. With
--perturb-every N the network trains on a perturbed batch every N steps (the competitive
perturbation used as a data augmentation alone: the control that tells it apart from distillation).

    python train.py --model resnet32 --dataset cifar100
"""
import functools
import sys

import capture
import engine
import flags
import stopping
import utils
from ema import ModelEma
from losses import mixed_accuracy, mixed_cross_entropy
from perturb import Perturber, add_perturbation_flags, bn_statistics_kept


def get_args_parser():
    """Flags: the shared ones (flags.get_args_parser) with the standard CIFAR recipe as defaults, and
    the (optional) perturbation."""
    parser = flags.get_args_parser("Train one network with cross-entropy.", script="train")
    add = parser.add_argument_group("perturbation (a control: the competitive perturbation alone)").add_argument
    add_perturbation_flags(add, every=0, every_help="perturb the batch every N steps, counted over the whole run "
                                                    "(0 = off; a network of a competitive group of n networks "
                                                    "perturbed every N steps sees one in n*N)")
    return parser


def vanilla_step(net, optimizer, scaler, images, labels, labels_perm, lam, args, rt):
    """One optimisation step of one network; returns its statistics on the device. lam < 1 and
    labels_perm: a mixup batch, whose loss is lam * CE(y) + (1 - lam) * CE(y_perm)."""
    with utils.autocast(rt):
        logits = net(utils.to_input(images, rt)).float()
    loss = mixed_cross_entropy(logits, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    clipped = utils.step_optimizers([optimizer], scaler, args.clip_grad, args.clip_mode)
    return {"loss": loss.detach(), "acc": mixed_accuracy(logits, labels, labels_perm, lam), **clipped}


def main(args):
    """Train args.model on args.dataset; returns the results dict."""
    group = flags.check_args(args)
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(group, data.info, rt, drop_path=args.drop_path)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    perturber = Perturber(every=args.perturb_every, ops=args.perturbations, num_nets=1,
                          seed=args.seed, mean=data.info.mean, std=data.info.std, device=rt.device)
    scaler = utils.make_scaler(rt)
    averages = ModelEma(nets, args.model_ema, group.frozen)  # --model-ema; off by default
    run = engine.start_run(args, "train", group, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           state={"scaler": scaler, "ema": averages, "perturber": perturber})
    train_step = functools.partial(vanilla_step, nets[0], optimizers[0], scaler, args=args, rt=rt)
    if rt.cuda_graphs:  # captured once, then replayed
        train_step = capture.capture_step(run, train_step)

    with stopping.StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            stats = engine.epoch_stats(run, epoch)  # on a mid-epoch resume: the epoch's statistics so far
            for step, (images, labels) in engine.batches(run, train_loader, epoch):
                global_step = epoch * len(train_loader) + step
                schedule.step(global_step)
                batch = perturber(global_step, images, labels)  # the batch itself unless --perturb-every
                with bn_statistics_kept(nets[0] if batch.net >= 0 and not args.update_bn_on_perturbed else None):
                    stats.add(train_step(batch.inputs[0], labels, batch.labels_perm, batch.lams[0]))
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
