"""Vanilla training of one network with cross-entropy: the baseline row of every comparison,
with the same data, schedule, logging and checkpoints as the collaborative scripts.

    python train.py --model resnet32 --dataset cifar100
"""
import functools
import sys

import torch.nn.functional as F

import engine
import flags
import utils
from losses import accuracy


def get_args_parser():
    """Flags: the shared ones (flags.get_args_parser) with the standard CIFAR recipe as defaults."""
    return flags.get_args_parser("Train one network with cross-entropy.")


def vanilla_step(net, optimizer, scaler, images, labels, args, rt):
    """One optimisation step of one network; returns its statistics on the device."""
    with utils.autocast(rt):
        logits = net(utils.to_input(images, rt)).float()
    loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), "acc": accuracy(logits, labels)}


def main(args):
    """Train args.model on args.dataset; returns the results dict."""
    group = flags.check_args(args)
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(group, data.info, rt, drop_path=args.drop_path)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    scaler = utils.make_scaler(rt)
    run = engine.start_run(args, "train", group, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           state={"scaler": scaler})
    train_step = functools.partial(vanilla_step, nets[0], optimizers[0], scaler, args=args, rt=rt)
    if rt.cuda_graphs:  # captured once, then replayed
        train_step = utils.CapturedStep(train_step)

    with engine.StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            stats = engine.epoch_stats(run, epoch)  # on a mid-epoch resume: the epoch's statistics so far
            for step, (images, labels) in engine.batches(run, train_loader, epoch):
                schedule.step(epoch * len(train_loader) + step)
                stats.add(train_step(images, labels))
                engine.log_step(run, epoch, step, stats)
                if stop.requested(step):  # SIGINT/SIGTERM: save last.pt and exit (130/143)
                    sys.exit(engine.save_and_stop(run, stop, epoch, step + 1, stats))
            evals = engine.evaluate_epoch(run, val_loader, test_loader, epoch)
            rows = engine.log_epoch(run, epoch, stats, evals, schedule)
            if engine.diverged(rows):  # NaN/inf: stop before saving anything of this epoch (exit 3)
                raise engine.divergence(run, epoch, stats, rows)
            run.checkpoints.save(epoch, evals)
            if stop.requested() and epoch + 1 < args.epochs:
                sys.exit(engine.save_and_stop(run, stop, epoch + 1, 0))
            if engine.stop_after(run, epoch):  # --stop-after N epochs in this invocation
                break
    return engine.finish(run)


if __name__ == "__main__":
    flags.launch(main, get_args_parser())
