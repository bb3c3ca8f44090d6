"""Vanilla training of one network with cross-entropy: the baseline row of every comparison,
with the same data, schedule, logging and checkpoints as the collaborative scripts.

    python train.py --model resnet32 --dataset cifar100
"""
import torch.nn.functional as F

import engine
import utils
from losses import accuracy


def get_args_parser():
    """Flags: the shared ones (utils.get_args_parser) with the standard CIFAR recipe as defaults."""
    return utils.get_args_parser("Train one network with cross-entropy.")


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
    utils.check_args(args)
    names = utils.model_names(args)
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(names, data.info, rt, args, drop_path=args.drop_path)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    scaler = utils.make_scaler(rt)
    run = engine.start_run(args, "train", names, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           resumable={"scaler": scaler})
    # The whole step; with --cuda-graphs captured once and replayed (engine.CapturedStep).
    train_step = engine.CapturedStep(
        lambda images, labels: vanilla_step(nets[0], optimizers[0], scaler, images, labels, args, rt),
        enabled=rt.cuda_graphs)

    with engine.StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            stats = engine.EpochStats(rt)
            for step, (images, labels) in engine.remaining_batches(run, train_loader, epoch, stop, stats):
                schedule.step(epoch * len(train_loader) + step)
                stats.add(train_step(images, labels))
            evals = engine.evaluate_epoch(run, val_loader, test_loader, epoch)
            engine.log_epoch(run, epoch, stats, evals, schedule)
            engine.save_checkpoints(run, epoch, evals)
            if engine.stop_after_epoch(run, epoch, stop):
                break
    return engine.finish(run)


if __name__ == "__main__":
    utils.launch(main, get_args_parser())
