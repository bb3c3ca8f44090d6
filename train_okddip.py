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
import functools
import sys

import torch
import torch.nn.functional as F

import capture
import engine
import flags
import stopping
import utils
from ema import ModelEma
from losses import accuracy, kd_loss, peer_attention_weights, peer_teachers, sigmoid_rampup
from train_one import branched_group, describe_deployed, save_deployed


def get_args_parser():
    """Flags: the shared ones plus the branches, the distillation, its ramp-up and the teachers' gradient."""
    parser = flags.get_args_parser("OKDDip: a branched network whose peers distil from attention-weighted peers.",
                                   script="okddip")
    add = parser.add_argument_group("online distillation with diverse peers (OKDDip)").add_argument
    add("--branches", type=int, default=4, help="branches m: m - 1 peers and the leader (OKDDip: 4)")
    add("--kd-weight", type=float, default=1.0, help="weight of the distillation terms at the end of the ramp-up (OKDDip: 1)")
    add("--temperature", type=float, default=3.0, help="distillation temperature T (OKDDip: 3)")
    add("--rampup-epochs", type=float, default=None,
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


def okddip_step(model, optimizer, scaler, images, labels, kd_weight, args, rt):
    """One step of the branched network; returns its statistics per branch (leader first), each (m,).

    kd_weight: a device scalar, w(e) * --kd-weight.
    """
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
    scaler.scale(loss).backward()
    clipped = {name: value.expand(len(logits)) for name, value in  # one network: its norm on every branch's row
               utils.step_optimizers([optimizer], scaler, args.clip_grad, args.clip_mode).items()}
    # Each peer's attention on itself (the diagonal's batch mean); the leader attends to nobody: 0.
    self_attention = torch.cat([attention.diagonal(dim1=1, dim2=2).mean(0).detach(), attention.new_zeros(1)])
    return {key: leader_first(value) for key, value in {
        "loss": (ce + kd_weight * kd).detach(), "ce": ce.detach(), "kd": kd.detach(), "acc": accuracy(logits, labels),
        "self_attention": self_attention, **clipped}.items()}


def main(args):
    """Train an OKDDip network on args.dataset; returns the results dict."""
    group = branched_group(args, "okddip")
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(group, data.info, rt, prepare=fix_projections if args.detach_teachers else None)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    scaler = utils.make_scaler(rt)
    base = utils.unwrap(nets[0]).base
    members = [(f"leader_{base}", base)] + [(f"peer{i}_{base}", base) for i in range(args.branches - 1)]
    averages = ModelEma(nets, args.model_ema, group.frozen)  # --model-ema; off by default
    run = engine.start_run(args, "okddip", group, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           state={"scaler": scaler, "ema": averages}, members=members, outputs=okddip_outputs)
    describe_deployed(run)
    kd_weight = torch.zeros((), device=rt.device)
    train_step = functools.partial(okddip_step, nets[0], optimizers[0], scaler, args=args, rt=rt)
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
