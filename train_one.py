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
import torch
import torch.nn.functional as F

import engine
import flags
import lifecycle
import stopping
import utils
from losses import accuracy, gated_ensemble, kd_loss
from models.branched import branch_members


def get_args_parser():
    """Flags: the shared ones plus the branches, the distillation and its ramp-up."""
    parser = flags.get_args_parser("ONE: a branched network distilling from its gated ensemble.", script="one")
    add = flags.adder(parser.add_argument_group("on-the-fly native ensemble (ONE)"))
    add("--branches", type=int, default=3, help="branches m of the network (ONE: 3)")
    add("--kd-weight", type=float, default=1.0, valid="non-negative",
        help="weight of the distillation term at the end of the ramp-up (ONE: 1)")
    add("--temperature", type=float, default=3.0, valid="positive", help="distillation temperature T (ONE: 3)")
    add("--rampup-epochs", type=float, default=None, valid=(lambda v: v >= 0, ">= 0 (0 = off)"),
        help="epochs R of the sigmoid ramp-up w(e) = exp(-5 (1 - e/R)^2) of the distillation weight; 0 = off "
             "(default: 80/300 of --epochs, ONE's code's 80 of its 300 epochs)")
    parser.set_defaults(model="resnet32")
    return parser


def one_outputs(nets, images):
    """Evaluation: every branch's logits (branch0, the deployed one, first) and the gated ensemble."""
    out = nets[0](images, all_branches=True)
    return out.logits, gated_ensemble(out.logits.float(), out.gate.float()).softmax(-1)


def one_step(run, images, labels, kd_weight):
    """One step of the branched network; returns its statistics per branch, each (m,) on the device.

    kd_weight: a device scalar, w(e) * --kd-weight (a tensor, so that a captured step reads each
    epoch's value; lifecycle.rampup_batch).
    """
    model, optimizer, args, rt = run.nets[0], run.optimizers[0], run.args, run.rt
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
    run.scaler.scale(loss).backward()
    clipped = {name: value.expand(len(logits)) for name, value in  # one network: its norm on every branch's row
               utils.step_optimizers([optimizer], run.scaler, args.clip_grad, args.clip_mode).items()}
    m = len(logits)
    return {"loss": (ce + kd_weight * kd).detach(), "ce": ce.detach(), "kd": kd.detach(), "acc": accuracy(logits, labels),
            "ensemble_ce": ensemble_ce.detach().expand(m), "ensemble_acc": accuracy(ensemble, labels).expand(m),
            "gate": out.gate.detach().float().mean(0), **clipped}               # gate: each branch's mean gate weight


def main(args):
    """Train a ONE network on args.dataset; returns the results dict."""
    group = flags.branched_group(args, "one")
    run = lifecycle.start_run(args, one_step, group=group, members=branch_members(group.names[0]), outputs=one_outputs,
                              batch=lifecycle.rampup_batch, computed={"rampup_epochs": lifecycle.rampup_epochs(args)})
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)  # with deployed.pt: branch0 as a plain network of the base architecture


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
