"""Plumbing shared by every training script: flags, device and precision, data and model setup,
optimizers and schedules, losses shared by the collaborative paradigms, evaluation, logging,
checkpoints and interruption. What makes a paradigm itself stays in its script."""
import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
from datasets import DatasetError, build_data, make_loaders
from datasets.dataset import data_from_arrays

CHECKPOINT_FORMAT = 1


class UsageError(Exception):
    """A user-facing, one-line error: bad flag values, a wrong checkpoint, missing data."""


def fail(message, code=2):
    """Print `error: message` on one line to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run(main, parser, argv=None):
    """Parse argv and run main(args); user errors become one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (UsageError, DatasetError) as error:
        fail(str(error))


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def get_args_parser(description, *, group=False, epochs=200, batch_size=128, optimizer="sgd",
                    schedule="cosine", weight_decay=5e-4, warmup_epochs=0.0, label_smoothing=0.0):
    """The flags every script shares; scripts add their own and may change the recipe defaults."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    if group:
        add("--models", nargs="+", metavar="NAME", help="the networks of the group (n >= 2; default: resnet32 resnet32)")
        add("--model1", help="first network of a pair (authors' spelling; same as --models A B)")
        add("--model2", help="second network of a pair")
        add("--teacher", help="first network of a pair (authors' spelling: roles are decided every step by the competition, not by this name)")
        add("--student", help="second network of a pair (see --teacher)")
    else:
        add("--model", default="resnet32", help="network name or alias (see README's model table)")
    add("--dataset", default="cifar10", help="cifar10, cifar100, fashion-mnist, mnist, svhn, imagenet, imagefolder, fake")
    add("--data-dir", default="./data", help="where datasets are looked for and downloaded")
    add("--download", action=argparse.BooleanOptionalAction, default=True, help="download missing datasets when the network allows")
    add("--img-size", type=int, default=None, help="input size fed to the networks (default: the dataset's native size; the authors used 224 for CIFAR-100)")
    add("--val-size", type=int, default=None, help="images held out from the training set to select the best checkpoint (default: 5000 for CIFAR/MNIST-like sets, 0 otherwise)")
    add("--split-seed", type=int, default=0, help="seed of the train/validation split (fixed across runs so runs compare)")
    add("--train-subset", type=int, default=None, help="train on only the first N images of the training split (quick experiments; validation and test sets stay whole)")
    add("--num-classes", type=int, default=None, help="class count of the synthetic 'fake' dataset (other datasets set their own)")
    add("--epochs", type=int, default=epochs, help="training epochs")
    add("--batch-size", type=int, default=batch_size, help="training batch size (per process)")
    add("--eval-batch-size", type=int, default=None, help="evaluation batch size (default: 2 x batch size)")
    add("--optimizer", nargs="+", default=[optimizer], choices=["sgd", "adamw", "adam"], help="optimizer, one for all networks or one per network")
    add("--lr", nargs="+", type=float, default=None, help="learning rate, one or one per network (default: sgd 0.1 x batch/128, adam/adamw 1e-3)")
    add("--weight-decay", nargs="+", type=float, default=[weight_decay], help="weight decay, one or one per network (decoupled for AdamW)")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum for SGD")
    add("--schedule", default=schedule, choices=["cosine", "step", "constant"], help="learning-rate schedule, stepped every iteration")
    add("--warmup-epochs", type=float, default=warmup_epochs, help="linear warm-up length in epochs")
    add("--milestones", nargs="+", type=float, default=[0.5, 0.75], help="step schedule: decay points as fractions of training")
    add("--gamma", type=float, default=0.1, help="step schedule: decay factor at each milestone")
    add("--min-lr", type=float, default=0.0, help="cosine schedule: final learning rate as a fraction of the peak")
    add("--label-smoothing", type=float, default=label_smoothing, help="label smoothing of the cross-entropy")
    add("--seed", type=int, default=0, help="seed of weights, data order, augmentation and perturbation")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=False, help="deterministic kernels (slower); exact resume")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"], help="autocast precision (auto: bf16 on CUDA, none on CPU)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format (faster convolutions on CPU and GPU)")
    add("--loader", default="auto", choices=["auto", "gpu", "torch"], help="gpu: dataset held on the device with batched augmentation there (in-memory sets); torch: DataLoader with workers")
    add("--workers", type=int, default=2, help="DataLoader worker processes (torch loader)")
    add("--out-dir", default=None, help="run directory (default: runs/<script>-<dataset>-<models>-<time>)")
    add("--resume", default=None, help="checkpoint to continue from, or 'auto' for <out-dir>/last.pt when it exists")
    add("--stop-after", type=int, default=None, help="stop this invocation after N epochs (for time-limited jobs); continue with --resume")
    add("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm progress bars (default: when stdout is a terminal)")
    return parser


def check_args(args):
    """Reject flag values that cannot work, with one line saying what is accepted."""
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    for lr in args.lr or []:
        if not lr > 0:
            raise UsageError(f"--lr must be positive, got {lr}")
    for wd in args.weight_decay:
        if wd < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {wd}")
    if args.img_size is not None and args.img_size < 8:
        raise UsageError(f"--img-size must be >= 8, got {args.img_size}")
    if args.val_size is not None and args.val_size < 0:
        raise UsageError(f"--val-size must be >= 0, got {args.val_size}")
    if args.warmup_epochs < 0 or not 0 <= args.min_lr <= 1 or not 0 <= args.label_smoothing < 1:
        raise UsageError("--warmup-epochs must be >= 0, --min-lr in [0, 1] and --label-smoothing in [0, 1)")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be a positive integer, got {args.stop_after}")
    if args.resume == "auto" and args.out_dir is None:
        raise UsageError("--resume auto needs --out-dir (the run directory to continue)")


def model_names(args):
    """Canonical names of the run's networks, from --model or a group's --models/--model1/... flags."""
    if hasattr(args, "model"):
        given = [args.model]
    else:
        pair = [getattr(args, k) for k in ("model1", "model2", "teacher", "student") if getattr(args, k)]
        if args.models and pair:
            raise UsageError("name the group either with --models or with --model1/--model2 (--teacher/--student), not both")
        given = args.models or pair or ["resnet32", "resnet32"]
        if len(given) < 2:
            raise UsageError(f"a group needs at least 2 networks, got {len(given)}: {' '.join(given)}")
    try:
        return [models.resolve_name(name) for name in given]
    except ValueError as error:
        raise UsageError(str(error)) from None


def per_net(values, n, flag):
    """Broadcast a one-or-per-network flag value to a list of length n."""
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise UsageError(f"{flag} takes one value or one per network ({n}), got {len(values)}")
    return list(values)


def default_lr(optimizer, batch_size):
    """Default peak rate: SGD 0.1 x batch/128 (linear scaling rule), Adam/AdamW 1e-3."""
    return 0.1 * batch_size / 128 if optimizer == "sgd" else 1e-3


# ----------------------------------------------------------------------------------------------
# Device, precision, seeding, data parallelism
# ----------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Where and how this process computes."""
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        """True on the process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self):
        """True under torchrun with more than one process."""
        return self.world_size > 1


def setup_runtime(args):
    """Pick the device and precision, seed everything and join the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got '{args.device}'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        if device.type == "cuda" and world_size > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.deterministic:
        # cuBLAS reads this once at initialisation; setting it here is early enough because no
        # CUDA work has been done yet.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)
    return Runtime(device, amp_dtype, args.channels_last, rank, world_size)


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(rt):
    """Autocast context for the runtime's precision (a no-op when it is fp32)."""
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None)


def all_reduce_sum(tensor, rt):
    """Sum a tensor over all processes in place (no-op in a single process)."""
    if rt.distributed:
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------------------------
# Data and networks
# ----------------------------------------------------------------------------------------------
def setup_data(args, rt):
    """Build the dataset and its train/val/test loaders from the flags."""
    data = build_data(args.dataset, args.data_dir, img_size=args.img_size, val_size=args.val_size,
                      split_seed=args.split_seed, download=args.download, num_classes=args.num_classes)
    if args.train_subset is not None:
        data = train_subset(data, args.train_subset)
    if args.loader == "gpu" and not data.info.in_memory:
        raise UsageError(f"--loader gpu needs an in-memory dataset; {args.dataset} streams from disk: use --loader torch")
    loaders = make_loaders(data, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                           loader=args.loader, device=rt.device, workers=args.workers, seed=args.seed,
                           drop_last=True, rank=rt.rank, world_size=rt.world_size)
    if len(loaders[0]) == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than this process's share of the "
                         f"{data.info.train_size} training images")
    return data, loaders


def train_subset(data, size):
    """Keep only the first `size` images of the training split (quick experiments, smoke tests)."""
    if not 0 < size <= data.info.train_size:
        raise UsageError(f"--train-subset must be in 1..{data.info.train_size} (the training split's size), got {size}")
    info = dataclasses.replace(data.info, train_size=size)
    if data.arrays is not None:
        images, labels = data.arrays["train"]
        return data_from_arrays(info, {**data.arrays, "train": (images[:size], labels[:size])})
    return dataclasses.replace(data, info=info, train=torch.utils.data.Subset(data.train, range(size)))


def build_nets(names, info, rt, **kwargs):
    """Create the named networks for the dataset's geometry, on the device and memory format."""
    nets = []
    for name in names:
        try:
            net = models.create_model(name, num_classes=info.num_classes, img_size=info.img_size,
                                      in_chans=info.in_chans, **kwargs)
        except ValueError as error:
            raise UsageError(str(error)) from None
        memory_format = torch.channels_last if rt.channels_last else torch.preserve_format
        nets.append(net.to(rt.device, memory_format=memory_format))
    return nets


def to_input(images, rt):
    """Lay a batch out in the networks' memory format."""
    return images.contiguous(memory_format=torch.channels_last) if rt.channels_last else images


# ----------------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules
# ----------------------------------------------------------------------------------------------
def build_optimizer(net, name, lr, weight_decay, *, momentum=0.9, nesterov=True, decay_norm_and_bias=True):
    """SGD (momentum, Nesterov), AdamW (decoupled decay) or Adam over one network's parameters."""
    params = [p for p in net.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:  # the transformer recipe exempts norms, biases and embeddings (1-d tensors) from decay
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    foreach = {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **foreach)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **foreach)
    if name == "adam":
        # Adam's decay is the L2 kind (added to the gradient); AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=lr, **foreach)
    raise UsageError(f"unknown optimizer '{name}'; choose from: sgd, adamw, adam")


def lr_factor(step, *, total_steps, warmup_steps, schedule, milestones=(), gamma=0.1, min_lr=0.0):
    """Multiplier of the peak learning rate at iteration `step`: linear warm-up, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    return 1.0


def set_lr(optimizer, lr):
    """Write the learning rate into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizers(args, nets):
    """One optimizer per network from the one-or-per-network flags; returns (optimizers, peak lrs)."""
    n = len(nets)
    names = per_net(args.optimizer, n, "--optimizer")
    lrs = per_net(args.lr, n, "--lr") if args.lr else [default_lr(name, args.batch_size) for name in names]
    decays = per_net(args.weight_decay, n, "--weight-decay")
    decay_norm_and_bias = getattr(args, "decay_norm_and_bias", True)
    optimizers = [build_optimizer(net, name, lr, wd, momentum=args.momentum, nesterov=args.nesterov,
                                  decay_norm_and_bias=decay_norm_and_bias)
                  for net, name, lr, wd in zip(nets, names, lrs, decays)]
    return optimizers, lrs


class Schedule:
    """Per-iteration learning rates for a group of optimizers with their own peak rates."""

    def __init__(self, args, optimizers, peak_lrs, steps_per_epoch):
        self.optimizers, self.peak_lrs = optimizers, peak_lrs
        self.kwargs = dict(total_steps=args.epochs * steps_per_epoch,
                           warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                           schedule=args.schedule, milestones=args.milestones, gamma=args.gamma,
                           min_lr=args.min_lr)

    def step(self, global_step):
        """Set every optimizer's rate for iteration `global_step`; returns the rates."""
        factor = lr_factor(global_step, **self.kwargs)
        lrs = [peak * factor for peak in self.peak_lrs]
        for optimizer, lr in zip(self.optimizers, lrs):
            set_lr(optimizer, lr)
        return lrs


# ----------------------------------------------------------------------------------------------
# Losses shared by the collaborative paradigms
# ----------------------------------------------------------------------------------------------
def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """KD(student <- teacher) = T^2 KL(sg(p_teacher) || p_student), summed over classes, batch mean."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def pairwise_kd(logits, temperature=1.0):
    """kd[i, j] = KD(i <- j) for every pair of a group's logits (n, B, C); the diagonal is zero.

    Row i carries gradient only into network i: the targets (column networks) are detached, so
    one backward of a sum of rows gives each network exactly its own distillation gradient.
    """
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)          # (n, B, C), with gradient
    log_q = log_p.detach()                                               # the teachers' side
    kl = (log_q.exp()[None] * (log_q[None] - log_p[:, None])).sum(-1)   # (n_student, n_teacher, B)
    return temperature**2 * kl.mean(-1)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def topk_correct(logits, labels, ks=(1, 5)):
    """Number of samples whose label is among the top-k logits, for each k (device tensor)."""
    k_max = min(max(ks), logits.shape[-1])
    top = logits.topk(k_max, dim=-1).indices
    hits = top == labels[..., None]
    return torch.stack([hits[..., :min(k, k_max)].any(-1).sum(-1) for k in ks], dim=-1)


@torch.no_grad()
def evaluate(nets, loader, rt):
    """Loss, top-1 and top-5 (%) of each network and of the group's averaged softmax (ensemble)."""
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    n = len(nets)
    sums = torch.zeros(n + 1, 4, device=rt.device, dtype=torch.float64)  # loss, top1, top5, count
    for images, labels in loader:
        images = to_input(images, rt)
        with autocast(rt):
            logits = torch.stack([net(images) for net in nets]).float()
        probs = logits.softmax(-1).mean(0)
        losses = torch.stack([F.cross_entropy(z, labels, reduction="sum") for z in logits])
        sums[:n, 0] += losses
        sums[n, 0] += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        sums[:n, 1:3] += topk_correct(logits, labels)
        sums[n, 1:3] += topk_correct(probs, labels)
        sums[:, 3] += labels.numel()
    all_reduce_sum(sums, rt)
    sums = sums.tolist()
    for net, mode in zip(nets, modes):
        net.train(mode)
    return [{"loss": s[0] / max(s[3], 1), "acc": 100 * s[1] / max(s[3], 1), "top5": 100 * s[2] / max(s[3], 1)}
            for s in sums]


class StepStats:
    """Per-network training sums kept on the device; read once per epoch (no per-step sync)."""

    def __init__(self, keys, n, device):
        self.keys = keys
        self.sums = torch.zeros(n, len(keys), device=device, dtype=torch.float64)
        self.steps = 0

    def add(self, values):
        """Add one step's (n, len(keys)) tensor of values."""
        self.sums += values.detach().to(torch.float64)
        self.steps += 1

    def means(self, rt):
        """Per-network dicts of step means (sums over processes; `correct`/`seen` become `acc` in %)."""
        sums = all_reduce_sum(self.sums.clone(), rt).tolist()
        steps = max(self.steps * rt.world_size, 1)
        rows = []
        for row in sums:
            values = dict(zip(self.keys, row))
            out = {k: v / steps for k, v in values.items() if k not in ("correct", "seen")}
            if "correct" in values:
                out["acc"] = 100 * values["correct"] / max(values["seen"], 1)
            rows.append(out)
        return rows

    def state_dict(self):
        """Sums and step count, for a mid-epoch checkpoint."""
        return {"sums": self.sums.cpu(), "steps": self.steps}

    def load_state_dict(self, state):
        """Restore sums and step count."""
        self.sums.copy_(state["sums"])
        self.steps = int(state["steps"])


# ----------------------------------------------------------------------------------------------
# Run directory, metrics CSV, TensorBoard, console
# ----------------------------------------------------------------------------------------------
def net_labels(names):
    """Unique display labels: net0_resnet32, net1_vit_tiny, ..."""
    return [f"net{i}_{name}" for i, name in enumerate(names)]


def default_run_dir(script, args, names):
    """runs/<script>-<dataset>-<models>-<time>."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{script}-{args.dataset}-{'-'.join(names)}-{stamp}")


class RunLogger:
    """metrics.csv (one row per epoch per network, plus the ensemble), TensorBoard and the console."""

    COLUMNS = ["epoch", "net", "model", "lr", "train_loss", "train_ce", "train_kd", "train_acc",
               "leader_share", "teachers", "val_loss", "val_acc", "val_top5", "test_loss", "test_acc",
               "test_top5", "epoch_time_s", "images_per_s"]

    def __init__(self, run_dir, rt, start_epoch):
        self.run_dir, self.enabled = run_dir, rt.is_main
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._drop_rows_from(start_epoch)
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 needs it
        self.writer = SummaryWriter(run_dir, purge_step=start_epoch + 1 if start_epoch else None)

    def _drop_rows_from(self, epoch):
        """On resume, forget rows of epochs that will be trained again (no duplicates)."""
        if not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epoch]
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def log_epoch(self, epoch, rows):
        """Append this epoch's rows (dicts keyed by COLUMNS) and mirror them to TensorBoard."""
        if not self.enabled:
            return
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k)) for k in self.COLUMNS})
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            for key, value in row.items():
                if key not in ("epoch", "net", "model") and isinstance(value, (int, float)):
                    split, _, metric = key.partition("_")
                    tag = f"{split}/{metric}/{row['net']}" if metric else f"{key}/{row['net']}"
                    self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def print(self, *lines):
        """Print on the main process only."""
        if self.enabled:
            for line in lines:
                print(line, flush=True)

    def close(self):
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()


def _fmt(value):
    """CSV cell: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def epoch_line(epoch, epochs, row):
    """One console summary line for one network (or the ensemble) after an epoch."""
    parts = [f"epoch {epoch:>3}/{epochs}", f"{row['net']:<18}"]
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.4g}")
    if row.get("train_loss") is not None:
        train = f"train loss {row['train_loss']:.4f}"
        if row.get("train_kd") is not None:
            train += f" (ce {row['train_ce']:.4f} kd {row['train_kd']:.4f})"
        parts.append(train + f" acc {row['train_acc']:.2f}%")
    if row.get("leader_share") is not None:
        parts.append(f"lead {row['leader_share']:.2f} teachers {row['teachers']:.2f}")
    for split in ("val", "test"):
        if row.get(f"{split}_acc") is not None:
            parts.append(f"{split} {row[f'{split}_acc']:.2f}%")
    if row.get("epoch_time_s") is not None:
        parts.append(f"{row['epoch_time_s']:.1f}s {row['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def progress(iterable, enabled, **kwargs):
    """tqdm progress bar, or the bare iterable when disabled."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def progress_enabled(args, rt):
    """--progress if given, else only when stdout is a terminal (and on the main process)."""
    wanted = sys.stdout.isatty() if args.progress is None else args.progress
    return wanted and rt.is_main


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load one of our checkpoints (weights only); UsageError when missing, corrupt or foreign."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' does not exist")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"'{path}' is not a PyTorch checkpoint file (expected a .pt written by this repository's scripts)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UsageError(f"'{path}' is not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "nets" not in ckpt:
        raise UsageError(f"'{path}' is not a checkpoint written by this repository's scripts")
    return ckpt


def rng_state(rt):
    """All random generator states, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2] if len(random.getstate()) > 2 else None,
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None}


def set_rng_state(state, rt):
    """Restore what rng_state() saved."""
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)


def unwrap(net):
    """The plain module inside a DDP or torch.compile wrapper."""
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)


def make_checkpoint(args, info, names, nets, optimizers, rt, *, epoch, step, extra=None):
    """Everything needed to rebuild the group (demo.py) and to continue training exactly.

    `epoch` is the number of completed epochs and `step` the iterations already done in the next
    one (0 at an epoch boundary; > 0 only when training was interrupted mid-epoch).
    """
    return {"format": CHECKPOINT_FORMAT, "models": list(names), "num_classes": info.num_classes,
            "img_size": info.img_size, "in_chans": info.in_chans, "dataset": info.name,
            "classes": list(info.classes), "mean": list(info.mean), "std": list(info.std),
            "args": {k: v for k, v in vars(args).items()}, "epoch": epoch, "step": step,
            "nets": [{k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()} for net in nets],
            "optimizers": [opt.state_dict() for opt in optimizers],
            "rng": rng_state(rt), "extra": extra or {}}


def restore_checkpoint(ckpt, path, info, names, nets, optimizers, rt):
    """Load a training checkpoint into the group after checking it is the same group and task."""
    if list(ckpt["models"]) != list(names):
        raise UsageError(f"--resume '{path}' holds models {ckpt['models']}, this run builds {list(names)}")
    if ckpt["num_classes"] != info.num_classes or ckpt["img_size"] != info.img_size or ckpt["in_chans"] != info.in_chans:
        raise UsageError(f"--resume '{path}' was trained for {ckpt['num_classes']} classes at "
                         f"{ckpt['in_chans']}x{ckpt['img_size']}px; this run has {info.num_classes} classes at "
                         f"{info.in_chans}x{info.img_size}px")
    if ckpt["args"].get("world_size", 1) != rt.world_size:
        raise UsageError(f"--resume '{path}' was written by {ckpt['args'].get('world_size', 1)} processes; "
                         f"resume it with the same number (this run has {rt.world_size})")
    for net, state in zip(nets, ckpt["nets"]):
        unwrap(net).load_state_dict(state)
    for optimizer, state in zip(optimizers, ckpt["optimizers"]):
        optimizer.load_state_dict(state)
    set_rng_state(ckpt["rng"], rt)


def resolve_resume(args):
    """The checkpoint path to resume from (None for a fresh run); 'auto' finds <out-dir>/last.pt."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = os.path.join(args.out_dir, "last.pt")
        return path if os.path.exists(path) else None
    if not os.path.isfile(args.resume):
        raise UsageError(f"--resume: checkpoint '{args.resume}' does not exist")
    return args.resume


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a stop never lands mid-update."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def exit_code(self):
        """128 + signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal


def save_json(obj, path):
    """Write JSON atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def now():
    """Wall-clock seconds (after a device sync, so GPU work is included)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# One run's bookkeeping: resume, per-epoch evaluation/logging/checkpoints, interruption, summary
# ----------------------------------------------------------------------------------------------
class Run:
    """Bookkeeping of one training run around a loop that the script owns.

    Resumes from a checkpoint when asked, and after each epoch evaluates every network on the
    validation and test sets, writes metrics.csv/TensorBoard/console, `last.pt` (every epoch) and
    `best.pt` (each network at its best validation accuracy; the test set never selects).
    """

    def __init__(self, args, script, names, rt, data, nets, optimizers, val_loader, test_loader, steps_per_epoch):
        self.args, self.script, self.names, self.rt = args, script, list(names), rt
        self.info, self.nets, self.optimizers = data.info, nets, optimizers
        self.val_loader, self.test_loader = val_loader, test_loader
        self.steps_per_epoch = steps_per_epoch
        self.labels = net_labels(self.names)
        args.world_size = rt.world_size
        resume = resolve_resume(args)
        if args.out_dir:
            self.run_dir = args.out_dir
        elif resume:
            self.run_dir = os.path.dirname(os.path.abspath(resume))
        else:
            self.run_dir = default_run_dir(script, args, self.names)
        n = len(nets)
        self.best = {"val_acc": [-1.0] * n, "epoch": [0] * n, "test_acc": [None] * n}
        self.best_states = [None] * n
        self.start_epoch, self.start_step, self.extra = 0, 0, {}
        if resume:
            ckpt = load_checkpoint(resume)
            restore_checkpoint(ckpt, resume, self.info, self.names, nets, optimizers, rt)
            self.start_epoch, self.start_step, self.extra = ckpt["epoch"], ckpt["step"], ckpt["extra"]
            self.best = self.extra.get("best", self.best)
            best_path = os.path.join(self.run_dir, "best.pt")
            if os.path.exists(best_path):
                self.best_states = load_checkpoint(best_path)["nets"]
            if self.start_epoch >= args.epochs:
                raise UsageError(f"--resume '{resume}' has already trained {self.start_epoch} of {args.epochs} epochs; raise --epochs to continue")
        self.logger = RunLogger(self.run_dir, rt, self.start_epoch)
        if rt.is_main:
            save_json(vars(args), os.path.join(self.run_dir, "args.json"))
        what = "resuming" if resume else "training"
        where = f" from epoch {self.start_epoch + 1}" + (f" step {self.start_step}" if self.start_step else "") if resume else ""
        synthetic = " (SYNTHETIC data: numbers mean nothing)" if self.info.synthetic else ""
        self.logger.print(f"{what} {', '.join(self.labels)} on {self.info.name}{synthetic}{where}: "
                          f"{self.info.train_size} train / {self.info.val_size} val / {self.info.test_size} test images, "
                          f"{self.info.in_chans}x{self.info.img_size}px, {self.info.num_classes} classes, device {rt.device}, "
                          f"amp {rt.amp_dtype}, {rt.world_size} process(es) x batch {args.batch_size} "
                          f"(global {args.batch_size * rt.world_size}); run dir {self.run_dir}")

    def resume_extra(self, key, default=None):
        """A piece of script state stored by a previous invocation (None on a fresh run)."""
        return self.extra.get(key, default)

    def skip_steps(self, epoch):
        """Iterations of `epoch` already done before an interrupted run was resumed."""
        return self.start_step if epoch == self.start_epoch else 0

    def _checkpoint(self, epoch, step, extra):
        extra = dict(extra or {}, best=self.best)
        return make_checkpoint(self.args, self.info, self.names, self.nets, self.optimizers, self.rt,
                               epoch=epoch, step=step, extra=extra)

    def end_epoch(self, epoch, train_rows, lrs, seconds, extra=None):
        """Evaluate, log and checkpoint after epoch `epoch` (0-based); returns the logged rows."""
        val = evaluate(self.nets, self.val_loader, self.rt) if self.val_loader is not None else None
        test = evaluate(self.nets, self.test_loader, self.rt)
        images = self.steps_per_epoch * self.args.batch_size * self.rt.world_size
        rows = []
        for i, label in enumerate(self.labels + (["ensemble"] if len(self.nets) > 1 else [])):
            row = {"epoch": epoch + 1, "net": label, "model": self.names[i] if i < len(self.names) else "+".join(self.names)}
            if i < len(self.nets):
                row["lr"] = lrs[i]
                row.update({f"train_{k}": v for k, v in train_rows[i].items()})
                row["train_loss"] = train_rows[i].get("loss")
                row.pop("train_leader", None), row.pop("train_teachers", None)
                if "leader" in train_rows[i]:
                    row["leader_share"], row["teachers"] = train_rows[i]["leader"], train_rows[i]["teachers"]
                row["epoch_time_s"], row["images_per_s"] = seconds, images / seconds
            for split, result in (("val", val), ("test", test)):
                if result is not None:
                    row.update({f"{split}_{k}": v for k, v in result[i].items()})
            rows.append(row)
        self.logger.log_epoch(epoch + 1, rows)
        self.logger.print(*(epoch_line(epoch + 1, self.args.epochs, row) for row in rows))
        if val is not None:
            improved = False
            for i in range(len(self.nets)):
                if val[i]["acc"] > self.best["val_acc"][i]:
                    self.best["val_acc"][i], self.best["epoch"][i] = val[i]["acc"], epoch + 1
                    self.best["test_acc"][i] = test[i]["acc"]
                    self.best_states[i] = {k: v.detach().cpu().clone() for k, v in unwrap(self.nets[i]).state_dict().items()}
                    improved = True
            if improved and self.rt.is_main:
                best = self._checkpoint(epoch + 1, 0, extra)
                best["nets"], best["optimizers"] = self.best_states, []
                atomic_save(best, os.path.join(self.run_dir, "best.pt"))
        self.final = rows
        if self.rt.is_main:
            atomic_save(self._checkpoint(epoch + 1, 0, extra), os.path.join(self.run_dir, "last.pt"))
        return rows

    def should_stop_after(self, epoch):
        """True when --stop-after epochs have run in this invocation."""
        return self.args.stop_after is not None and epoch + 1 - self.start_epoch >= self.args.stop_after

    def interrupt(self, stop, epoch, step, extra=None):
        """Save the state after `step` iterations of `epoch` as last.pt, say how to resume, exit 130/143."""
        path = os.path.join(self.run_dir, "last.pt")
        if self.rt.is_main:
            atomic_save(self._checkpoint(epoch, step, extra), path)
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg == "--resume":
                skip = not skip and arg == "--resume"
                continue
            if not arg.startswith("--resume="):
                argv.append(arg)
        command = " ".join(["python", os.path.basename(sys.argv[0]), *argv, "--resume", path])
        name = signal.Signals(stop.signal).name
        self.logger.print(f"{name}: stopped at epoch {epoch + 1} step {step}; state saved to {path}; continue with: {command}")
        self.logger.close()
        sys.exit(stop.exit_code)

    def finish(self):
        """Print and save (results.json) the last epoch's and the best-validation numbers."""
        self.logger.close()
        if not getattr(self, "final", None):
            return None
        results = {"run_dir": self.run_dir, "dataset": self.info.name, "synthetic": self.info.synthetic,
                   "epochs": self.final[0]["epoch"], "networks": []}
        for i, row in enumerate(self.final):
            entry = {"net": row["net"], "model": row["model"], "final_test_acc": row["test_acc"],
                     "final_val_acc": row.get("val_acc")}
            if i < len(self.nets) and self.val_loader is not None:
                entry.update(best_val_acc=self.best["val_acc"][i], best_epoch=self.best["epoch"][i],
                             test_acc_at_best_val=self.best["test_acc"][i])
            results["networks"].append(entry)
        if self.rt.is_main:
            save_json(results, os.path.join(self.run_dir, "results.json"))
            self.logger.print("final test accuracy (last epoch): " + ", ".join(
                f"{e['net']} {e['final_test_acc']:.2f}%" for e in results["networks"]))
        return results


def make_scaler(rt, run):
    """Gradient scaler for fp16 autocast (a pass-through otherwise), restored on resume."""
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    if run.resume_extra("scaler"):
        scaler.load_state_dict(run.resume_extra("scaler"))
    return scaler


def train_loop(args, rt, run, train_loader, schedule, keys, train_step, state=dict):
    """The epoch skeleton every script shares; the script's `train_step` is its paradigm.

    train_step(step, images, labels) runs one optimisation step of the whole group and returns
    its (n, len(keys)) tensor of statistics, which stays on the device until the epoch ends.
    state() returns the script's extra resumable state (scaler, perturbation generators).
    A SIGINT/SIGTERM is honoured between steps: the state is saved and the process exits.
    """
    show = progress_enabled(args, rt)
    with StopRequest() as stop:
        for epoch in range(run.start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            stats = StepStats(keys, len(run.nets), rt.device)
            skip = run.skip_steps(epoch)
            if skip:
                stats.load_state_dict(run.resume_extra("stats"))
            start = now()
            for step, (images, labels) in enumerate(progress(train_loader, show, desc=f"epoch {epoch + 1}")):
                lrs = schedule.step(epoch * len(train_loader) + step)
                if step < skip:  # replaying the loader keeps its random stream exact on resume
                    continue
                stats.add(train_step(step, images, labels))
                if stop.signal:
                    run.interrupt(stop, epoch, step + 1, {"stats": stats.state_dict(), **state()})
            run.end_epoch(epoch, stats.means(rt), lrs, now() - start, state())
            if stop.signal:
                run.interrupt(stop, epoch + 1, 0, state())
            if run.should_stop_after(epoch):
                break
    return run.finish()
