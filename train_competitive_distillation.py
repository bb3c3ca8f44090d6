"""Competitive distillation (Shi et al., ICCV 2025; SPEC section 3).

A group of n >= 2 networks trains on one task. Every step the networks compete on their batch
cross-entropy; each network learns (KL distillation) from the networks that beat it, the step's
leader trains on cross-entropy alone, and all networks update together. Every --perturb-every
steps one random network sees a perturbed copy of the batch (stochastic perturbation, SPEC 3.2).

    python train_competitive_distillation.py --models resnet32 resnet32 --dataset cifar100
    python train_competitive_distillation.py --teacher resnet --student vit --dataset cifar10
"""
import torch

import engine
import utils
from perturb import PERTURBATIONS, Perturber, mixed_cross_entropy

KEYS = ("loss", "ce", "kd", "correct", "seen", "leader", "teachers")  # per-network statistics logged each epoch


def get_args_parser():
    """Flags: the shared ones plus the competition, distillation and perturbation settings."""
    parser = utils.get_args_parser("Competitive distillation of a group of networks.", group=True)
    add = parser.add_argument
    add("--teacher-rule", default="better", choices=["better", "best"],
        help="better: learn from every network with a lower loss (authors' code); best: only from the step's leader (paper text)")
    add("--kd-weight", type=float, default=1.0, help="weight w of the distillation term (authors: 1)")
    add("--temperature", type=float, default=1.0, help="distillation temperature T (authors: 1)")
    add("--perturb-every", type=int, default=10, help="perturb one random network every N steps of an epoch (authors: 10; 0 = off)")
    add("--perturbations", nargs="+", default=list(PERTURBATIONS), choices=PERTURBATIONS,
        help="operations drawn uniformly for the perturbed network")
    return parser


def select_teachers(ranking_ce, rule):
    """Competitive rule (SPEC 3.1): teacher_mask[i, j] is True when network j teaches network i.

    ranking_ce: (n,) batch-mean cross-entropy of each network on its own input (lower is better).
    rule "better": every network with a strictly lower loss teaches (S_i = {j : l_j < l_i}).
    rule "best":   only the step's leader (argmin, first index on ties) teaches, and only the
                   networks whose loss is strictly higher than the leader's.
    Ties never teach each other and the leader has no teacher, under both rules; for n = 2 the
    rules coincide. Pure tensor operations: no host synchronisation, so the step can be captured.
    """
    teacher_mask = ranking_ce[None, :] < ranking_ce[:, None]
    if rule == "best":
        leader = torch.arange(ranking_ce.numel(), device=ranking_ce.device) == ranking_ce.argmin()
        teacher_mask = teacher_mask & leader[None, :]
    return teacher_mask


def competitive_step(nets, optimizers, scaler, inputs, labels, labels_perm, lams, args, rt):
    """One synchronous step of the whole group; returns per-network stats (n, 7) on the device.

    inputs: one batch per network (the perturbed network's differs); lams: (n,) mixup weights
    (1 for clean inputs), so every network's loss is lam * CE(y) + (1 - lam) * CE(y_perm).
    """
    with utils.autocast(rt):
        logits = torch.stack([net(x) for net, x in zip(nets, inputs)]).float()       # (n, B, C)
    ce = torch.stack([mixed_cross_entropy(z, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
                      for z, lam in zip(logits, lams)])
    # Under data parallelism every process must pick the same teachers: rank on the global mean.
    ranking_ce = utils.all_reduce_sum(ce.detach().clone(), rt) / rt.world_size
    teacher_mask = select_teachers(ranking_ce, args.teacher_rule).float()
    teachers = teacher_mask.sum(1)
    kd = (utils.pairwise_kd(logits, args.temperature) * teacher_mask).sum(1) / teachers.clamp(min=1)
    loss = ce + args.kd_weight * kd                   # the leader's kd is 0: it trains on CE only
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    # Every target in kd is detached, so one backward gives each network exactly its own gradient.
    scaler.scale(loss.sum()).backward()
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    # one_hot would check its input on the host; a comparison keeps the step free of syncs
    leader = (torch.arange(len(nets), device=ce.device) == ranking_ce.argmin()).float()
    correct = (logits.argmax(-1) == labels).sum(-1).float()
    seen = torch.full_like(correct, labels.numel())
    return torch.stack([loss.detach(), ce.detach(), kd.detach(), correct, seen, leader, teachers], dim=1)


def main(args):
    """Train the group on args.dataset with competitive distillation; returns the results dict."""
    utils.check_args(args)
    names = utils.model_names(args)
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(names, data.info, rt)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    try:
        perturber = Perturber(every=args.perturb_every, ops=args.perturbations, num_nets=len(nets),
                              seed=args.seed, mean=data.info.mean, std=data.info.std, device=rt.device)
    except ValueError as error:
        raise utils.UsageError(str(error)) from None
    run = engine.Run(args, "competitive", names, rt, data, nets, optimizers, val_loader, test_loader, len(train_loader))
    scaler = engine.make_scaler(rt, run)
    if run.resume_extra("perturber"):
        perturber.load_state_dict(run.resume_extra("perturber"))

    def group_step(labels, labels_perm, lams, *inputs):  # the whole step: capturable in a CUDA graph
        inputs = [utils.to_input(x, rt) for x in inputs]
        return competitive_step(nets, optimizers, scaler, inputs, labels, labels_perm, lams, args, rt)

    captured = engine.CapturedStep(group_step, enabled=rt.cuda_graphs)

    def train_step(step, images, labels):
        # The perturbation runs before the captured step and writes its inputs.
        inputs, labels_perm, lams = perturber.group_batch(step, images, labels)
        return captured(labels, labels_perm, lams, *inputs)

    def state():
        return {"scaler": scaler.state_dict(), "perturber": perturber.state_dict()}

    return engine.train_loop(args, rt, run, train_loader, schedule, KEYS, train_step, state)


if __name__ == "__main__":
    utils.run(main, get_args_parser())
