"""Vanilla training of one network with cross-entropy: the baseline row of every comparison,
with the same data, schedule, logging and checkpoints as the collaborative scripts. With
--perturb-every N the network trains on a perturbed batch every N steps (the competitive
perturbation used as a data augmentation alone: the control that tells it apart from distillation).

    python train.py --model resnet32 --dataset cifar100
"""
import engine
import flags
import lifecycle
import stopping
import utils
from losses import mixed_accuracy, mixed_cross_entropy
from perturb import add_perturbation_flags


def get_args_parser():
    """Flags: the shared ones (flags.get_args_parser) with the standard CIFAR recipe as defaults, and
    the (optional) perturbation."""
    parser = flags.get_args_parser("Train one network with cross-entropy.", script="train")
    add = flags.adder(parser.add_argument_group("perturbation (a control: the competitive perturbation alone)"))
    add_perturbation_flags(add, every=0, every_help="perturb the batch every N steps, counted over the whole run "
                                                    "(0 = off; a network of a competitive group of n networks "
                                                    "perturbed every N steps sees one in n*N)")
    return parser


def vanilla_step(run, inputs, labels, labels_perm, lams):
    """One optimisation step of one network; returns its statistics on the device. inputs, lams: the
    network's batch and mixup weight, lists of one (the perturbation's); lam < 1 and labels_perm: a mixup
    batch, whose loss is lam * CE(y) + (1 - lam) * CE(y_perm)."""
    net, optimizer, args, lam = run.nets[0], run.optimizers[0], run.args, lams[0]
    with utils.autocast(run.rt):
        logits = net(utils.to_input(inputs[0], run.rt)).float()
    loss = mixed_cross_entropy(logits, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clipped = utils.step_optimizers([optimizer], run.scaler, args.clip_grad, args.clip_mode)
    return {"loss": loss.detach(), "acc": mixed_accuracy(logits, labels, labels_perm, lam), **clipped}


def main(args):
    """Train args.model on args.dataset; returns the results dict."""
    run = lifecycle.start_run(args, vanilla_step, perturbation=True)
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
