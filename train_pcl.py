"""PCL: peer collaborative learning for online knowledge distillation (Wu & Gong, AAAI 2021, arXiv 2006.04147).

One branched network (models/branched.py): a shared trunk (stem, stages 1-2) and m peers (stage 3,
pooling, classifier), each peer on its own random augmentation of the batch (--views independent: the
trunk runs once per view); a peer-ensemble teacher, a classifier on the peers' concatenated pooled
features; and a temporal mean network, a copy whose parameters follow the trained ones as an
exponential moving average with decay min(1 - 1/(t + 1), 0.999) at step t. Every peer learns from the
labels, from the peer ensemble and from the other peers of the temporal mean (the "peer mean teacher"):
L = CE(z_e) + sum_i [CE(z_i) + w(e) KD_T(sg(z_e) || z_i) + w(e) mean_{j != i} KD_T(sg(z'_j) || z_i)],
T = 3, w(e) the sigmoid ramp-up over the first 80 of 300 epochs. The temporal mean's peer 0 is the
deployed network (deployed.pt), its peers' averaged softmax the ensemble; the rows evaluate the
temporal mean's peers, while their training statistics are the trained peers'.

No official code was released; docs/online_kd.md lists the constants' sources and every choice made
where the paper's text could not be read.

    python train_pcl.py --model resnet32 --dataset cifar100
"""
import torch
import torch.nn.functional as F

import engine
import flags
import lifecycle
import stopping
import utils
from ema import blend
from losses import accuracy, kd_loss, peer_mean_kd
from models import unwrap
from models.branched import branch_members


def get_args_parser():
    """Flags: the shared ones plus the peers, their views, the distillation, its ramp-up and the temporal mean."""
    parser = flags.get_args_parser("PCL: peers distilling from their ensemble and from their temporal mean.", script="pcl")
    add = flags.adder(parser.add_argument_group("peer collaborative learning (PCL)"))
    add("--branches", type=int, default=3, help="peers m of the network (PCL: 3)")
    add("--views", default="independent", choices=["same", "independent"],
        help="independent: each peer its own random augmentation of the batch's images (PCL); same: one for all")
    add("--kd-weight", type=float, default=1.0, valid="non-negative",
        help="weight of each distillation term at the end of the ramp-up (PCL: 1)")
    add("--temperature", type=float, default=3.0, valid="positive", help="distillation temperature T (PCL: 3)")
    add("--rampup-epochs", type=float, default=None, valid=(lambda v: v >= 0, ">= 0 (0 = off)"),
        help="epochs R of the sigmoid ramp-up w(e) = exp(-5 (1 - e/R)^2) of the distillation weight; 0 = off "
             "(default: 80/300 of --epochs, PCL's 80 of its 300 epochs)")
    add("--mean-decay", type=float, default=0.999, valid="open fraction",
        help="largest decay of the temporal mean network; at step t it is min(1 - 1/(t + 1), this) "
             "(the mean-teacher schedule of the PCL reimplementation: 0.999)")
    parser.set_defaults(model="resnet32")
    return parser


def pcl_outputs(nets, images):
    """Evaluation: the temporal mean's peers' logits (peer 0, the deployed one, first) and their averaged softmax."""
    logits = unwrap(nets[0]).mean(images, all_branches=True).logits
    return logits, logits.float().softmax(-1).mean(0)


def pcl_batch(run, global_step, images, labels):
    """The step's arguments: each peer's view (the batch itself for every peer with --views same), the
    labels, w(e) * --kd-weight and the temporal mean's decay at this step, both device scalars."""
    (views, labels, kd_weight), _ = lifecycle.rampup_batch(run, global_step, images, labels)
    views = list(views) if isinstance(views, (list, tuple)) else [views] * run.args.branches
    decay = min(1 - 1 / (global_step + 1), run.args.mean_decay)  # 0 at the first step: the mean starts as a copy
    return (views, labels, kd_weight, torch.full((), decay, device=labels.device)), None


def pcl_step(run, views, labels, kd_weight, mean_decay):
    """One step of the peers and the ensemble head, then of the temporal mean; statistics per peer, (m,)."""
    model, optimizer, args, rt = run.nets[0], run.optimizers[0], run.args, run.rt
    network, views = unwrap(model), utils.to_inputs(views, rt)
    with utils.autocast(rt):
        out = model(views, all_branches=True)                                      # live peers and the ensemble
        with torch.no_grad():  # the mean's peers, each on its peer's view, in train mode: its own BN statistics
            mean_logits = network.mean(views, all_branches=True).logits.float()
    logits, ensemble = out.logits.float(), out.ensemble.float()                    # (m, B, C), (B, C)
    ce = torch.stack([F.cross_entropy(z, labels, label_smoothing=args.label_smoothing) for z in logits])
    ensemble_ce = F.cross_entropy(ensemble, labels, label_smoothing=args.label_smoothing)
    kd_ensemble = torch.stack([kd_loss(z, ensemble, args.temperature) for z in logits])   # sg(z_e): detached
    kd_mean = peer_mean_kd(logits, mean_logits, args.temperature)
    loss = ensemble_ce + (ce + kd_weight * (kd_ensemble + kd_mean)).sum()
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clipped = {name: value.expand(len(logits)) for name, value in  # one network: its norm on every peer's row
               utils.step_optimizers([optimizer], run.scaler, args.clip_grad, args.clip_mode).items()}
    with torch.no_grad():  # the temporal mean follows the trained parameters (its buffers stay its own)
        blend(list(network.mean.parameters()), [p.detach() for p in network.live.parameters()], 1 - mean_decay)
    m = len(logits)
    return {"loss": (ce + kd_weight * (kd_ensemble + kd_mean)).detach(), "ce": ce.detach(),
            "kd_ensemble": kd_ensemble.detach(), "kd_mean": kd_mean.detach(), "acc": accuracy(logits, labels),
            "ensemble_ce": ensemble_ce.detach().expand(m), "ensemble_acc": accuracy(ensemble, labels).expand(m),
            "mean_acc": accuracy(mean_logits, labels), **clipped}


def main(args):
    """Train a PCL network on args.dataset; returns the results dict."""
    group = flags.branched_group(args, "pcl")
    run = lifecycle.start_run(args, pcl_step, group=group, members=branch_members(group.names[0]), outputs=pcl_outputs,
                              views=args.branches if args.views == "independent" else 1, batch=pcl_batch,
                              computed={"rampup_epochs": lifecycle.rampup_epochs(args)})
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)  # with deployed.pt: the temporal mean's peer 0 as a plain network


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
