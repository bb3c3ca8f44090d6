"""Vanilla training of one network with cross-entropy (SPEC section 1): the baseline row of every
comparison, with the same data, schedule, logging and checkpoints as the collaborative scripts.

    python train.py --model resnet32 --dataset cifar100
"""
import torch
import torch.nn.functional as F

import engine
import utils


def get_args_parser():
    """Flags: the shared ones (utils.get_args_parser) with the CNN recipe of SPEC section 7."""
    return utils.get_args_parser("Train one network with cross-entropy.")


def main(args):
    """Train args.model on args.dataset; returns the results dict."""
    utils.check_args(args)
    names = utils.model_names(args)
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(names, data.info, rt)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    run = engine.Run(args, "train", names, rt, data, nets, optimizers, val_loader, test_loader, len(train_loader))
    net, optimizer = nets[0], optimizers[0]
    scaler = engine.make_scaler(rt, run)

    def vanilla_step(images, labels):  # the whole step: capturable in a CUDA graph
        with utils.autocast(rt):
            logits = net(utils.to_input(images, rt)).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        correct = (logits.argmax(-1) == labels).sum()
        return torch.stack([loss.detach(), correct, torch.full_like(loss, labels.numel())])[None]

    captured = engine.CapturedStep(vanilla_step, enabled=rt.cuda_graphs)

    def train_step(step, images, labels):
        return captured(images, labels)

    def state():
        return {"scaler": scaler.state_dict()}

    return engine.train_loop(args, rt, run, train_loader, schedule, ("loss", "correct", "seen"), train_step, state)


if __name__ == "__main__":
    utils.run(main, get_args_parser())
