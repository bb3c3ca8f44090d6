"""BYOT: be your own teacher, self-distillation through early exits (Zhang et al., ICCV 2019, arXiv 1905.08094).

One network (a CIFAR ResNet or Wide ResNet) with a shallow classifier after each stage but the last
(models/exits.py). The deepest classifier learns from the labels; every shallow one from the labels,
from the deepest classifier's softened outputs and from its features (losses.self_distillation):
L = CE(z_C) + sum_i [(1 - a) CE(z_i) + a KL_T(sg(z_C) || z_i) + h ||f_i - sg(f_C)||], a = 0.3, T = 3,
h = 0.03, the constants of the only official code (the journal version's, ArchipLab-LinfengZhang/
pytorch-self-distillation-final, train.py), which the ICCV paper's readable text does not give. The
deepest exit, the network itself, is deployed (deployed.pt); every exit and the ensemble of all exits
(averaged softmax) are evaluated. docs/online_kd.md lists every choice and its source.

    python train_byot.py --model resnet32 --dataset cifar100
"""
import torch

import engine
import flags
import lifecycle
import models
import stopping
import utils
from errors import UsageError
from losses import accuracy, self_distillation
from models.exits import exit_members


def get_args_parser():
    """Flags: the shared ones plus the self-distillation weights."""
    parser = flags.get_args_parser("BYOT: a network whose shallow exits learn from its deepest one.", script="byot")
    add = flags.adder(parser.add_argument_group("self-distillation (BYOT)"))
    add("--kd-weight", type=float, default=0.3, valid="fraction",
        help="weight a of a shallow exit's distillation; its cross-entropy weighs 1 - a (official code: 0.3)")
    add("--temperature", type=float, default=3.0, valid="positive", help="distillation temperature T (official code: 3)")
    add("--hint-weight", type=float, default=0.03, valid="non-negative",
        help="weight h of the feature hint ||f_i - sg(f_deepest)|| (official code: 0.03; 0 = off)")
    parser.set_defaults(model="resnet32")
    return parser


def byot_group(args):
    """The run's Group with --model replaced by byot:BASE; UsageError for a network without BYOT's stages."""
    group = flags.check_args(args)
    try:
        return group._replace(names=[models.resolve_name(f"byot:{group.names[0]}")])
    except ValueError as error:
        raise UsageError(f"--model {args.model}: {str(error).split(': ', 1)[-1]}") from None


def byot_outputs(nets, images):
    """Evaluation: the deepest exit's logits first, then exits 1 and 2, and all exits' averaged softmax."""
    logits = nets[0](images, all_exits=True).logits
    return torch.cat([logits[-1:], logits[:-1]]), logits.float().softmax(-1).mean(0)


def byot_step(run, images, labels):
    """One step of the network and its exits; statistics per exit, the deepest first, (k,)."""
    model, optimizer, args, rt = run.nets[0], run.optimizers[0], run.args, run.rt
    with utils.autocast(rt):
        out = model(utils.to_input(images, rt), all_exits=True)
    loss, ce, kd, hint = self_distillation(out.logits.float(), out.features.float(), labels, temperature=args.temperature,
                                           kd_weight=args.kd_weight, hint_weight=args.hint_weight)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss.sum()).backward()
    clipped = {name: value.expand(len(loss)) for name, value in  # one network: its norm on every exit's row
               utils.step_optimizers([optimizer], run.scaler, args.clip_grad, args.clip_mode).items()}
    deepest_first = lambda values: torch.cat([values[-1:], values[:-1]])
    return {name: deepest_first(value) for name, value in {
        "loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(), "hint": hint.detach(),
        "acc": accuracy(out.logits.float(), labels), **clipped}.items()}


def main(args):
    """Train a network with BYOT's exits on args.dataset; returns the results dict."""
    group = byot_group(args)
    run = lifecycle.start_run(args, byot_step, group=group, members=exit_members(group.names[0]), outputs=byot_outputs)
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)  # with deployed.pt: the deepest exit, the network itself


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
