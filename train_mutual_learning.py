"""Deep mutual learning (Zhang et al., CVPR 2018; SPEC section 2).

A group of n >= 2 networks trains on one task; every network learns from every other one:
L_i = CE_i + w * mean over j != i of KD(i <- j), all networks updated together. The authors'
DML baseline also perturbed one random network every 10 steps: off here unless --perturb-every.

    python train_mutual_learning.py --models resnet32 mobilenet_v1 --dataset cifar100
    python train_mutual_learning.py --model1 resnet --model2 mobilenet --dataset cifar10
"""
import torch

import engine
import utils
from perturb import PERTURBATIONS, Perturber, mixed_cross_entropy

KEYS = ("loss", "ce", "kd", "correct", "seen")  # per-network statistics logged each epoch


def get_args_parser():
    """Flags: the shared ones plus the distillation and (optional) perturbation settings."""
    parser = utils.get_args_parser("Deep mutual learning of a group of networks.", group=True)
    add = parser.add_argument
    add("--kd-weight", type=float, default=1.0, help="weight w of the distillation term (DML: 1)")
    add("--temperature", type=float, default=1.0, help="distillation temperature T (DML: 1)")
    add("--perturb-every", type=int, default=0, help="perturb one random network every N steps of an epoch (0 = plain DML; the authors' baseline used 10)")
    add("--perturbations", nargs="+", default=list(PERTURBATIONS), choices=PERTURBATIONS,
        help="operations drawn uniformly for the perturbed network")
    return parser


def mutual_step(nets, optimizers, scaler, inputs, labels, labels_perm, lams, args, rt):
    """One synchronous step of the whole group; returns per-network stats (n, 5) on the device.

    inputs: one batch per network (a perturbed network's differs); lams: (n,) mixup weights
    (1 for clean inputs), so every network's loss is lam * CE(y) + (1 - lam) * CE(y_perm).
    """
    with utils.autocast(rt):
        logits = torch.stack([net(x) for net, x in zip(nets, inputs)]).float()       # (n, B, C)
    ce = torch.stack([mixed_cross_entropy(z, labels, labels_perm, lam, label_smoothing=args.label_smoothing)
                      for z, lam in zip(logits, lams)])
    # Every peer teaches: the mean over the n - 1 others (the diagonal KD(i <- i) is zero).
    kd = utils.pairwise_kd(logits, args.temperature).sum(1) / (len(nets) - 1)
    loss = ce + args.kd_weight * kd
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    # Every target in kd is detached, so one backward gives each network exactly its own gradient.
    scaler.scale(loss.sum()).backward()
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    correct = (logits.argmax(-1) == labels).sum(-1).float()
    seen = torch.full_like(correct, labels.numel())
    return torch.stack([loss.detach(), ce.detach(), kd.detach(), correct, seen], dim=1)


def main(args):
    """Train the group on args.dataset with deep mutual learning; returns the results dict."""
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
    run = engine.Run(args, "mutual", names, rt, data, nets, optimizers, val_loader, test_loader, len(train_loader))
    scaler = engine.make_scaler(rt, run)
    if run.resume_extra("perturber"):
        perturber.load_state_dict(run.resume_extra("perturber"))

    def group_step(labels, labels_perm, lams, *inputs):  # the whole step: capturable in a CUDA graph
        inputs = [utils.to_input(x, rt) for x in inputs]
        return mutual_step(nets, optimizers, scaler, inputs, labels, labels_perm, lams, args, rt)

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
