"""ONE: on-the-fly native ensemble (Lan, Zhu & Gong, NeurIPS 2018, arXiv 1806.04606).

One network with m branches: a CIFAR ResNet or Wide ResNet whose stem and stages 1-2 are shared
and whose stage 3 and classifier are repeated m times (models/branched.py). A gate (Linear -> BN ->
ReLU -> softmax over the branches, on the pooled stage-2 features) weighs the branches per sample
into the ensemble teacher z_e = sum_i g_i z_i, from which every branch distils:
L = sum_i CE(z_i) + CE(z_e) + w(e) * T^2 * sum_i KL(sg(p_e) || p_i), T = 3, w(e) the sigmoid
ramp-up of the official code. The teacher is detached, as in the official code: the gate learns
only through CE(z_e). Branch 1 alone (here branch0) is the deployed network ("ONE"), the gated
ensemble is "ONE-E"; both are evaluated every epoch, and the deployed branch is written as a plain
network of the base architecture (deployed.pt) at the end.

    python train_one.py --model resnet32 --dataset cifar100
    python train_one.py --model resnet32 --dataset cifar100 --epochs 300 --no-nesterov --weight-decay 1e-4 \\
        --schedule step --milestones 0.5033 0.75 --warmup-epochs 0  # the official recipe (docs/online_kd.md)
"""
import functools
import os
import sys

import torch
import torch.nn.functional as F

import capture
import checkpoints
import engine
import flags
import models
import stopping
import utils
from ema import ModelEma
from losses import accuracy, gated_ensemble, kd_loss, sigmoid_rampup


def get_args_parser():
    """Flags: the shared ones plus the branches, the distillation and its ramp-up."""
    parser = flags.get_args_parser("ONE: a branched network distilling from its gated ensemble.", script="one")
    add = parser.add_argument_group("on-the-fly native ensemble (ONE)").add_argument
    add("--branches", type=int, default=3, help="branches m of the network (ONE: 3)")
    add("--kd-weight", type=float, default=1.0, help="weight of the distillation term at the end of the ramp-up (ONE: 1)")
    add("--temperature", type=float, default=3.0, help="distillation temperature T (ONE: 3)")
    add("--rampup-epochs", type=float, default=None,
        help="epochs R of the sigmoid ramp-up w(e) = exp(-5 (1 - e/R)^2) of the distillation weight; 0 = off "
             "(default: 80/300 of --epochs, ONE's code's 80 of its 300 epochs)")
    parser.set_defaults(model="resnet32")
    return parser


def branched_group(args, method):
    """The run's Group with --model replaced by the branched network METHOD:BASE:M."""
    group = flags.check_args(args)
    if args.branches < 2:
        raise flags.UsageError(f"--branches must be >= 2, got {args.branches}")
    if args.rampup_epochs is None:  # the official proportion; written back, so args.json records it
        args.rampup_epochs = args.epochs * 80 / 300
    if args.rampup_epochs < 0:
        raise flags.UsageError(f"--rampup-epochs must be >= 0 (0 = off), got {args.rampup_epochs}")
    base = group.names[0]
    if base not in models.BRANCHABLE:
        raise flags.UsageError(f"--model {args.model}: {base} cannot branch; choose from: {', '.join(models.BRANCHABLE)}")
    return group._replace(names=[f"{method}:{base}:{args.branches}"])


def one_outputs(nets, images):
    """Evaluation: every branch's logits (branch0, the deployed one, first) and the gated ensemble."""
    out = nets[0](images, all_branches=True)
    return out.logits, gated_ensemble(out.logits.float(), out.gate.float()).softmax(-1)


def one_step(model, optimizer, scaler, images, labels, kd_weight, args, rt):
    """One step of the branched network; returns its statistics per branch, each (m,) on the device.

    kd_weight: a device scalar, w(e) * --kd-weight (a tensor, so that a captured step reads each
    epoch's value).
    """
    with utils.autocast(rt):
        out = model(utils.to_input(images, rt), all_branches=True)
    logits = out.logits.float()                                                    # (m, B, C)
    ensemble = gated_ensemble(logits, out.gate.float())                            # z_e, (B, C)
    ce = torch.stack([F.cross_entropy(z, labels, label_smoothing=args.label_smoothing) for z in logits])
    ensemble_ce = F.cross_entropy(ensemble, labels, label_smoothing=args.label_smoothing)
    # sg(z_e): the teacher is detached (the official code's `.data`).
    kd = torch.stack([kd_loss(z, ensemble, args.temperature) for z in logits])
    loss = ce.sum() + ensemble_ce + kd_weight * kd.sum()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    clipped = {name: value.expand(len(logits)) for name, value in  # one network: its norm on every branch's row
               utils.step_optimizers([optimizer], scaler, args.clip_grad, args.clip_mode).items()}
    m = len(logits)
    return {"loss": (ce + kd_weight * kd).detach(), "ce": ce.detach(), "kd": kd.detach(), "acc": accuracy(logits, labels),
            "ensemble_ce": ensemble_ce.detach().expand(m), "ensemble_acc": accuracy(ensemble, labels).expand(m),
            "gate": out.gate.detach().float().mean(0), **clipped}               # gate: each branch's mean gate weight


def describe_deployed(run):
    """The startup line of the deployed network: what is used after training, with its own size."""
    state = utils.unwrap(run.nets[0]).deployed_state_dict()
    engine.print_main(run.rt, f"  deployed network: {run.labels[0]}, a plain {run.models[0]} of "
                              f"{sum(v.numel() for k, v in state.items() if 'running' not in k and 'num_batches' not in k) / 1e6:.2f}M "
                              f"parameters (deployed.pt at the end)")


def save_deployed(run):
    """At the end of training, the deployed branch as a plain network of the base architecture:
    <run_dir>/deployed.pt, a state_dict that models.create_model(base) loads (and --init takes)."""
    if run.rt.is_main and run.last_rows and run.last_rows[0]["epoch"] == run.args.epochs:
        checkpoints.atomic_save(utils.unwrap(run.nets[0]).deployed_state_dict(), os.path.join(run.run_dir, "deployed.pt"))


def main(args):
    """Train a ONE network on args.dataset; returns the results dict."""
    group = branched_group(args, "one")
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(group, data.info, rt)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    scaler = utils.make_scaler(rt)
    base = utils.unwrap(nets[0]).base
    members = [(f"branch{i}_{base}", base) for i in range(args.branches)]  # branch0: the deployed network
    averages = ModelEma(nets, args.model_ema, group.frozen)  # --model-ema; off by default
    run = engine.start_run(args, "one", group, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           state={"scaler": scaler, "ema": averages}, members=members, outputs=one_outputs)
    describe_deployed(run)
    kd_weight = torch.zeros((), device=rt.device)
    train_step = functools.partial(one_step, nets[0], optimizers[0], scaler, args=args, rt=rt)
    if rt.cuda_graphs:  # captured once, then replayed
        train_step = capture.capture_step(run, train_step)

    with stopping.StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            kd_weight.fill_(args.kd_weight * sigmoid_rampup(epoch, args.rampup_epochs))  # w(e), 0-based epoch
            stats = engine.epoch_stats(run, epoch)  # on a mid-epoch resume: the epoch's statistics so far
            for step, (images, labels) in engine.batches(run, train_loader, epoch):
                schedule.step(epoch * len(train_loader) + step)
                stats.add(train_step(images, labels, kd_weight))
                averages.update(nets)
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
    save_deployed(run)
    return engine.finish(run)


if __name__ == "__main__":
    flags.launch(main, get_args_parser())
