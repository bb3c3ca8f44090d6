"""OKDDip: online knowledge distillation with diverse peers (Chen et al., AAAI 2020, arXiv 1912.00350).

One branched network (models/branched.py) of m branches: m - 1 auxiliary peers and a group leader.
Each peer a learns from its own peer teacher, an attention-weighted mix of the peers' logits
t_a = sum_b alpha_ab z_b with alpha_ab = softmax_b(q_a . k_b), where queries and keys are shared
bias-free projections of the peers' pooled stage-3 features; the leader learns from the peers' mean:
L = sum_a CE(z_a) + CE(z_L) + w(e) * [sum_a KD_T(t_a || z_a) + KD_T(mean_a z_a || z_L)], T = 3,
w(e) the sigmoid ramp-up. As in the official code (DefangChen/OKDDip @c6a05de8, train_GL.py) the
teachers are not detached: the distillation terms are how the projections learn (--detach-teachers
gives the detached variant). The leader is the deployed network; each peer and the peers' ensemble
(averaged softmax) are evaluated too, and the leader is written as a plain network (deployed.pt).

    python train_okddip.py --model resnet32 --dataset cifar100
"""
import argparse

import torch
import torch.nn.functional as F

import engine
import flags
import lifecycle
import stopping
import utils
from losses import accuracy, kd_loss, peer_attention_weights, peer_teachers
from models.branched import branch_members


def get_args_parser():
    """Flags: the shared ones plus the branches, the distillation, its ramp-up and the teachers' gradient."""
    parser = flags.get_args_parser("OKDDip: a branched network whose peers distil from attention-weighted peers.",
                                   script="okddip")
    add = flags.adder(parser.add_argument_group("online distillation with diverse peers (OKDDip)"))
    add("--branches", type=int, default=4, help="branches m: m - 1 peers and the leader (OKDDip: 4; at least 3, two peers)")
    add("--kd-weight", type=float, default=1.0, valid="non-negative",
        help="weight of the distillation terms at the end of the ramp-up (OKDDip: 1)")
    add("--temperature", type=float, default=3.0, valid="positive", help="distillation temperature T (OKDDip: 3)")
    add("--rampup-epochs", type=float, default=None, valid=(lambda v: v >= 0, ">= 0 (0 = off)"),
        help="epochs R of the sigmoid ramp-up w(e) = exp(-5 (1 - e/R)^2) of the distillation weight; 0 = off "
             "(default: 80/300 of --epochs, OKDDip's code's 80 of its 300 epochs)")
    add("--detach-teachers", action=argparse.BooleanOptionalAction, default=False,
        help="stop the gradient at the peer and leader teachers (the official code does not; then the "
             "attention projections do not learn)")
    parser.set_defaults(model="resnet32")
    return parser


def fix_projections(net):
    """--detach-teachers: no gradient reaches the attention projections, so they keep their initial
    weights; fixed (requires_grad off), the optimizer skips them and DDP does not wait for their gradients."""
    for projection in (net.query, net.key):
        projection.requires_grad_(False)


def leader_first(values):
    """Reorder a per-branch tensor (peers..., leader) to (leader, peers...), the rows' order."""
    return torch.cat([values[-1:], values[:-1]])


def okddip_outputs(nets, images):
    """Evaluation: the leader's and each peer's logits (leader first) and the peers' averaged softmax."""
    logits = nets[0](images, all_branches=True).logits
    return leader_first(logits), logits[:-1].float().softmax(-1).mean(0)


def okddip_step(run, images, labels, kd_weight):
    """One step of the branched network; returns its statistics per branch (leader first), each (m,).

    kd_weight: a device scalar, w(e) * --kd-weight (lifecycle.rampup_batch).
    """
    model, optimizer, args, rt = run.nets[0], run.optimizers[0], run.args, run.rt
    with utils.autocast(rt):
        out = model(utils.to_input(images, rt), all_branches=True)
    logits = out.logits.float()                                                    # (m, B, C): peers, leader
    peers, leader = logits[:-1], logits[-1]
    attention = peer_attention_weights(out.queries[:-1].float(), out.keys[:-1].float())   # (B, p, p)
    teachers = peer_teachers(attention, peers)                                     # t_a, (p, B, C)
    detach = args.detach_teachers  # False: the gradient flows into the teachers, as in the official code
    kd = torch.stack([*(kd_loss(z, t, args.temperature, detach_teacher=detach) for z, t in zip(peers, teachers)),
                      kd_loss(leader, peers.mean(0), args.temperature, detach_teacher=detach)])
    ce = torch.stack([F.cross_entropy(z, labels, label_smoothing=args.label_smoothing) for z in logits])
    loss = ce.sum() + kd_weight * kd.sum()
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clipped = {name: value.expand(len(logits)) for name, value in  # one network: its norm on every branch's row
               utils.step_optimizers([optimizer], run.scaler, args.clip_grad, args.clip_mode).items()}
    # Each peer's attention on itself (the diagonal's batch mean); the leader attends to nobody: 0.
    self_attention = torch.cat([attention.diagonal(dim1=1, dim2=2).mean(0).detach(), attention.new_zeros(1)])
    return {key: leader_first(value) for key, value in {
        "loss": (ce + kd_weight * kd).detach(), "ce": ce.detach(), "kd": kd.detach(), "acc": accuracy(logits, labels),
        "self_attention": self_attention, **clipped}.items()}


def main(args):
    """Train an OKDDip network on args.dataset; returns the results dict."""
    group = flags.branched_group(args, "okddip", minimum=3)
    run = lifecycle.start_run(args, okddip_step, group=group, members=branch_members(group.names[0]),
                              outputs=okddip_outputs, prepare=fix_projections if args.detach_teachers else None,
                              batch=lifecycle.rampup_batch, computed={"rampup_epochs": lifecycle.rampup_epochs(args)})
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)  # with deployed.pt: the leader as a plain network of the base architecture


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
