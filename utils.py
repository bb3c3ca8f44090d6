"""The one room of setup every training script shares: device, precision and data parallelism;
the data, the networks and their optimizers; the learning-rate schedule; evaluation; and the
capture of a whole step in a CUDA graph. The command line is flags.py, a run's life lifecycle.py, the
loop engine.py, checkpoints checkpoints.py, the papers' losses losses.py."""
import dataclasses
import datetime
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import models
from datasets import DatasetError, build_data, data_from_arrays, make_loaders
from datasets.sources import subset
from errors import UsageError
from flags import Group
from models import unwrap
from models.weights import load_initial_weights, load_state

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
    sync_bn: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    deterministic: bool = False

    @property
    def is_main(self):
        """True on the process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self):
        """True under torchrun with more than one process."""
        return self.world_size > 1


def resolve_device(name, local_rank=None):
    """--device (auto, cpu, cuda, cuda:N) as a torch.device; a CUDA device always gets an index
    (torch.cuda.set_device refuses a bare 'cuda'), under torchrun this process's GPU (local_rank).
    A device that is not there is a UsageError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and (local_rank is not None or device.index is None):
        device = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return device


def setup_runtime(args):
    """Pick the device and precision, seed everything and join the process group under torchrun."""
    if getattr(args, "sync_bn", False) and args.compile:
        # Dynamo breaks the graph at every SyncBatchNorm (pytorch/pytorch#161302, open), and compiled
        # DDP networks with SyncBatchNorm have failed to compile (pytorch/pytorch#107372, open).
        raise UsageError("--sync-bn and --compile cannot be combined (torch.compile breaks its graph at every "
                         "SyncBatchNorm layer); drop one of them")
    world_size, rank, local_rank = distributed_env()
    device = resolve_device(args.device, local_rank if world_size > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = args.amp
    if amp == "auto":  # on the CPU fp32: bf16 autocast measured no faster there (docs/speed.md)
        amp = "bf16" if device.type == "cuda" else "none"
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
    sync_bn = getattr(args, "sync_bn", False) and world_size > 1
    if sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (torch.nn.SyncBatchNorm has no CPU implementation); "
                         "use --no-sync-bn on the CPU")
    if world_size > 1 and not dist.is_initialized():
        # torchrun keeps one key-value store across its --max-restarts attempts (PyTorch 2.x); a
        # per-attempt prefix stops a restarted group from reading the dead attempt's addresses.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        # A stopped or hung peer ends the run after --dist-timeout, in one line, instead of gloo's 30 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=getattr(args, "dist_timeout", 300)))
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
    cuda_graphs = getattr(args, "cuda_graphs", False)
    if cuda_graphs and (device.type != "cuda" or world_size > 1 or amp_dtype == torch.float16):
        raise UsageError("--cuda-graphs needs one CUDA process and --amp bf16 or none (no fp16 loss scaling)")
    return Runtime(device, amp_dtype, args.channels_last, rank, world_size, sync_bn, args.compile, cuda_graphs,
                   args.deterministic)


def distributed_env():
    """(WORLD_SIZE, RANK, LOCAL_RANK) from the environment torchrun sets, (1, 0, 0) without it;
    UsageError in one line for values that are not numbers or do not fit together."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        if not text.isascii() or not text.isdecimal():
            raise UsageError(f"environment variable {name}={text!r} is not a non-negative integer "
                             f"(torchrun sets WORLD_SIZE, RANK and LOCAL_RANK)")
        values[name] = int(text)
    if values["WORLD_SIZE"] > 1 and "RANK" not in os.environ:
        raise UsageError(f"WORLD_SIZE={values['WORLD_SIZE']} without RANK: start the processes with torchrun, "
                         f"which sets both, or unset WORLD_SIZE")
    if not 1 <= values["WORLD_SIZE"] or values["RANK"] >= values["WORLD_SIZE"]:
        raise UsageError(f"RANK={values['RANK']} is not below WORLD_SIZE={values['WORLD_SIZE']}")
    return values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(rt):
    """Autocast context for the runtime's precision (a no-op when it is fp32)."""
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None)


def make_scaler(rt):
    """Gradient scaler for fp16 autocast (a pass-through otherwise)."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)


def all_reduce_sum(tensor, rt):
    """Sum a tensor over all processes in place (no-op in a single process)."""
    if rt.distributed:
        dist.all_reduce(tensor)
    return tensor


# Integer views of each float width: a parameter's bit pattern summed as integers is an exact,
# order-independent checksum, so equal tensors give equal sums on any device and thread count.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sync_replicas(nets, rt, epoch):
    """Give every process rank 0's buffers and check that all hold identical parameters.

    DDP keeps parameters equal by averaging gradients; buffers (BatchNorm running statistics) are
    broadcast from rank 0 at each training forward, so copying them now changes nothing in training
    and lets every rank evaluate, and rank 0 save, the same model. Raises RuntimeError naming the
    first parameter that differs (a bug or a silent hardware error), instead of training on.
    """
    if not rt.distributed:
        return
    for i, net in enumerate(nets):
        module = unwrap(net)
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
        names, params = zip(*module.named_parameters())
        checksums = torch.stack([p.detach().view(_BITS[p.element_size()]).sum(dtype=torch.int64) for p in params])
        gathered = [torch.empty_like(checksums) for _ in range(rt.world_size)]
        dist.all_gather(gathered, checksums)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                name = names[int((other != gathered[0]).nonzero()[0])]
                raise RuntimeError(f"data-parallel replicas diverged after epoch {epoch + 1}: network {i} "
                                   f"parameter '{name}' differs between rank 0 and rank {rank}")


# ----------------------------------------------------------------------------------------------
# Data and networks
# ----------------------------------------------------------------------------------------------
def setup_data(args, rt, *, eval_batch_size=None, views=1, repeats=1, rand_augment_impl="auto"):
    """Build the dataset and its train/val/test loaders from the flags; with views > 1 every training
    batch holds that many independently augmented copies of its images (--views independent), with
    repeats > 1 an epoch is one of repeated augmentation (train_ceit.py's --repeated-aug). The transformer
    recipe's per-image flags (--rand-augment, --reprob) are train_ceit.py's: off for the other scripts."""
    def build(download):
        return build_data(args.dataset, args.data_dir, img_size=args.img_size, val_size=args.val_size,
                          split_seed=args.split_seed, download=download, num_classes=args.num_classes,
                          skip_bad_images=args.skip_bad_images, crop=args.crop, rotate=args.rotate,
                          rand_augment=getattr(args, "rand_augment", "none"), rand_augment_impl=rand_augment_impl,
                          erase_prob=getattr(args, "reprob", 0.0), folder_split=args.folder_split)

    if rt.distributed and args.download:
        # One download per file system, never several processes writing one archive: rank 0
        # first, then the first process of every other node (whose disk may be its own), then
        # everyone else reads the files they left.
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        data = None
        for my_turn in (rt.rank == 0, rt.rank != 0 and first_on_node):
            if my_turn:
                data = build(download=True)
            dist.barrier()
        data = data or build(download=False)
    else:
        data = build(args.download)
    if args.train_subset is not None:
        data = train_subset(data, args.train_subset, args.split_seed)
    if getattr(args, "eval_subset", None) is not None:
        data = eval_subset(data, args.eval_subset, args.split_seed)
    loaders = make_loaders(data, batch_size=args.batch_size, eval_batch_size=eval_batch_size or eval_batch_size_of(args),
                           loader=args.loader, device=rt.device, workers=resolve_workers(args.workers, rt.device), seed=args.seed,
                           drop_last=True, rank=rt.rank, world_size=rt.world_size, views=views, repeats=repeats)
    if len(loaders[0]) == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than this process's share of the "
                         f"{data.info.train_size} training images")
    return data, loaders


def eval_batch_size_of(args):
    """--eval-batch-size, or its default: twice the training batch."""
    return args.eval_batch_size or 2 * args.batch_size


def resolve_workers(workers, device):
    """--workers, or its default: on CUDA min(8, the CPUs this process may use / processes on this
    node), since 2 workers cannot decode and augment image files (ImageNet, image folders) as fast as
    a GPU trains on them; on the CPU 2, whose cores the training itself needs."""
    if workers is not None:
        return workers
    if torch.device(device).type != "cuda":
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def train_subset(data, size, seed):
    """Keep `size` images of the training split (quick experiments, smoke tests), every class among them: the
    first `size` of an in-memory set (whose order mixes the classes), a seeded class-stratified choice from an
    image folder (whose order is by class); datasets.sources.subset. The kept class counts go into the info."""
    if not 0 < size <= data.info.train_size:
        raise UsageError(f"--train-subset must be in 1..{data.info.train_size} (the training split's size), got {size}")
    in_memory = data.arrays is not None
    try:
        index, words = subset(split_labels(data, "train"), size, data.info.classes, stratified=not in_memory, seed=seed)
    except DatasetError as error:
        raise UsageError(str(error)) from None
    info = dataclasses.replace(data.info, train_size=size, subset=words)
    if in_memory:
        images, labels = data.arrays["train"]
        return data_from_arrays(info, {**data.arrays, "train": (images[index], labels[index])})
    return dataclasses.replace(data, info=info, train=torch.utils.data.Subset(data.train, index.tolist()))


def split_labels(data, split):
    """The labels of a split of `data`, in its order (numpy)."""
    if data.arrays is not None:
        return data.arrays[split][1].numpy()
    dataset = getattr(data, split)
    return np.array([dataset.folder.samples[int(i)][1] for i in dataset.indices])


def eval_subset(data, size, seed):
    """--eval-subset: keep `size` images of the validation and of the test split (a split no larger stays
    whole), every class among them, chosen as train_subset chooses; info.eval_subset says so."""
    info, arrays, kept = data.info, dict(data.arrays or {}), {}
    for split in ("val", "test"):
        total = info.val_size if split == "val" else info.test_size
        if getattr(data, split) is None or size >= total:
            continue
        try:
            index, _ = subset(split_labels(data, split), size, info.classes, stratified=data.arrays is None, seed=seed,
                              flag="--eval-subset", split="validation" if split == "val" else "test")
        except DatasetError as error:
            raise UsageError(str(error)) from None
        kept[split] = (index, total)
        if data.arrays is not None:
            images, labels = arrays[split]
            arrays[split] = (images[index], labels[index])
    words = ", ".join(f"{split} {size} of {total} images" for split, (_, total) in kept.items())
    info = dataclasses.replace(data.info, eval_subset=words, **{f"{split}_size": size for split in kept})
    if data.arrays is not None:
        return data_from_arrays(info, arrays)
    return dataclasses.replace(data, info=info, **{split: torch.utils.data.Subset(getattr(data, split), index.tolist())
                                                   for split, (index, _) in kept.items()})


def build_nets(group, info, rt, drop_path=0.0, prepare=None):
    """Create the networks of `group` (a flags.Group, or a list of model names) for the dataset's
    geometry, on the device (DDP-wrapped under torchrun); the transformers among them get stochastic
    depth `drop_path` (the CNNs have none); --init gives some their initial weights, --freeze fixes some;
    prepare(net), when given, runs on each plain network before it is moved and wrapped (e.g. to fix
    some parameters: DDP must know which ones train)."""
    group = group if isinstance(group, Group) else Group(list(group))
    nets = []
    for i, name in enumerate(group.names):
        try:
            extra = {"drop_path_rate": drop_path} if models.is_transformer(models.resolve_name(name)) else {}
            net = models.create_model(name, num_classes=info.num_classes, img_size=info.img_size,
                                      in_chans=info.in_chans, **extra)
            label, notes = f"network {i} ({name})", []
            if i in group.init:
                notes = load_initial_weights(net, *group.init[i], label=label, reset_classifier=group.reset_classifier)
            elif i in group.pretrained:
                notes = load_state(net, pretrained_state(name, rt), source="--pretrained", label=label,
                                   reset_classifier=group.reset_classifier, replace_head=True)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if rt.is_main:
            for note in notes:
                print(note, flush=True)
        if rt.deterministic and rt.device.type == "cuda":
            check_deterministic_backward(net, f"network {i} ({name})")
        if i in group.frozen:
            # eval mode: BatchNorm normalises with (and keeps) its running statistics, dropout is off
            net.requires_grad_(False).eval()
        if prepare is not None:
            prepare(net)
        if rt.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        memory_format = torch.channels_last if rt.channels_last else torch.preserve_format
        net = net.to(rt.device, memory_format=memory_format)
        if rt.distributed and i not in group.frozen:  # (DDP refuses a module without trainable parameters)
            # One DDP per network: each averages its own gradients over the processes during the
            # group's single backward. Every registered model uses all its parameters in forward
            # (tests/test_models.py), so no unused-parameter search is needed; a script that leaves
            # some without gradient fixes them first (prepare).
            net = DDP(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if rt.compile:
            # Compiled outside DDP: Dynamo's DDP optimizer then splits the graph at DDP's gradient
            # bucket boundaries, so the all-reduce of one bucket overlaps the rest of the backward
            # (PyTorch's "Distributed Data Parallel with torch.compile" notes). The compiled module
            # shares the parameters; checkpoints and evaluation use the plain module (unwrap), so
            # checkpoints do not depend on this flag.
            net = torch.compile(net)
        nets.append(net)
    return nets


def pretrained_state(name, rt):
    """A tv:/timm: network's pretrained weights (models.zoo.pretrained_state); under torchrun rank 0 fetches
    them first, so a download into the shared cache happens once, then the others read the cache."""
    if not rt.distributed:
        return models.zoo.pretrained_state(name)
    state, error = None, None
    for my_turn in (rt.rank == 0, rt.rank != 0):
        if my_turn:
            try:
                state = models.zoo.pretrained_state(name)
            except ValueError as failed:  # every rank reaches the barrier, then fails in one line
                error = failed
        dist.barrier()
    if error is not None:
        raise error
    return state


# Modules whose backward on CUDA has no deterministic implementation: under
# torch.use_deterministic_algorithms(True) their first backward raises a RuntimeError (the list in that
# function's documentation). Adaptive average pooling to size 1 is exempt: ATen computes it as a mean.
_NONDETERMINISTIC_ON_CUDA = (torch.nn.AdaptiveMaxPool2d, torch.nn.AvgPool3d, torch.nn.FractionalMaxPool2d,
                             torch.nn.FractionalMaxPool3d, torch.nn.ReflectionPad1d, torch.nn.ReflectionPad2d,
                             torch.nn.ReflectionPad3d, torch.nn.MaxUnpool1d, torch.nn.MaxUnpool2d, torch.nn.MaxUnpool3d)


def nondeterministic_on_cuda(module):
    """True when `module`'s CUDA backward has no deterministic implementation."""
    if isinstance(module, (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d)):
        size = module.output_size
        return any(s != 1 for s in (size if isinstance(size, (tuple, list)) else [size]))  # None: the input's size
    if isinstance(module, torch.nn.Upsample):
        return module.mode in ("linear", "bilinear", "bicubic", "trilinear")
    return isinstance(module, _NONDETERMINISTIC_ON_CUDA)


def check_deterministic_backward(net, label):
    """--deterministic on CUDA: a UsageError naming the first module of `net` whose backward would raise
    mid-run (torchvision's VGG and AlexNet pool adaptively to 7x7 and 6x6), before anything trains."""
    for name, module in net.named_modules():
        if nondeterministic_on_cuda(module):
            raise UsageError(f"--deterministic on CUDA: {label} has {module!r} at '{name}', whose CUDA backward "
                             "has no deterministic implementation; use --no-deterministic or another network")


def to_input(images, rt):
    """Lay a batch out in the networks' memory format."""
    return images.contiguous(memory_format=torch.channels_last) if rt.channels_last and images.dim() == 4 else images


def to_inputs(batches, rt):
    """to_input of each network's batch, converting a batch that several networks share only once (the
    scripts hand every network the same tensor unless it is perturbed or has its own view)."""
    converted = {}
    for x in batches:
        if id(x) not in converted:
            converted[id(x)] = to_input(x, rt)
    return [converted[id(x)] for x in batches]


# ----------------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules
# ----------------------------------------------------------------------------------------------
def build_optimizer(net, name, lr, weight_decay, *, momentum=0.9, nesterov=True, decay_norm_and_bias=True,
                    fused=False, capturable=False):
    """SGD (momentum, Nesterov), AdamW (decoupled decay) or Adam over one network's parameters.

    fused=True builds the fused kernels (one kernel per parameter group and dtype), foreach kernels
    otherwise. capturable=True (fused only) holds the learning rate in a device tensor: a step
    captured in a CUDA graph then reads the rate the schedule wrote, instead of a baked-in number.
    """
    named = [(name, p) for name, p in unwrap(net).named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:  # the transformer recipe exempts norms, biases (1-d tensors) and the models' embeddings
        skip = set(getattr(unwrap(net), "no_weight_decay", set)())
        exempt = [p.ndim <= 1 or name in skip for name, p in named]
        groups = [{"params": [p for p, e in zip(params, exempt) if not e], "weight_decay": weight_decay},
                  {"params": [p for p, e in zip(params, exempt) if e], "weight_decay": 0.0}]
    kernels = {"fused": True} if fused else {"foreach": True}
    if capturable:
        if not fused:
            raise ValueError("capturable optimizers are built with fused kernels here (fused=True)")
        lr = torch.tensor(float(lr), device=params[0].device)
        if name != "sgd":  # Adam's step() refuses graph capture unless its groups are capturable
            kernels["capturable"] = True
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **kernels)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kernels)
    if name == "adam":
        # Adam's decay is the L2 kind (added to the gradient); AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=lr, **kernels)
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
    """Write the learning rate into every parameter group (in place when it is a device tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def use_fused(name, rt):
    """Fused kernels on CUDA: fewer launches than foreach, and with --amp fp16 GradScaler hands them
    its scale and inf flag on the device instead of reading each optimizer's flag back with .item().

    Not SGD under fp16 loss scaling: fused SGD allocates its momentum buffers uninitialised
    (torch.empty_like) before a first step that its kernel then skips when the scaler found an
    overflow, which the first fp16 steps routinely do; later steps add to that garbage. (Fused
    Adam/AdamW keep their state untouched on a skipped step.)
    """
    if rt is None or rt.device.type != "cuda":
        return False
    return not (name == "sgd" and rt.amp_dtype == torch.float16)


def default_lrs(args, n):
    """--lr, or its default for the networks' optimizers (one value when they agree): what the run records."""
    if args.lr:
        return list(args.lr)
    defaults = [default_lr(name, args.batch_size) for name in per_net(args.optimizer, n, "--optimizer")]
    return defaults[:1] if len(set(defaults)) == 1 else defaults


def build_optimizers(args, nets, rt=None, lr=None):
    """One optimizer per network from the flags, its rate `lr` (one or one per network; default: --lr or its
    default, default_lrs), peak lrs scaled to rt's processes; returns (optimizers, peak lrs). A network
    without trainable parameters (--freeze) gets None and a rate of 0."""
    n = len(nets)
    names = per_net(args.optimizer, n, "--optimizer")
    lrs = per_net(default_lrs(args, n) if lr is None else lr, n, "--lr")
    if args.lr_scaling == "linear" and rt is not None:  # --batch-size is per process; the rate follows the global one
        lrs = [lr * rt.world_size for lr in lrs]
    decays = per_net(args.weight_decay, n, "--weight-decay")
    decay_all = getattr(args, "decay_norm_and_bias", None)
    capturable = rt is not None and rt.cuda_graphs
    trainable = [any(p.requires_grad for p in unwrap(net).parameters()) for net in nets]
    # A transformer keeps the DeiT exemptions in any group; a CNN is decayed everywhere, as in the
    # CIFAR recipe; the flag overrides both.
    optimizers = [build_optimizer(net, name, lr, wd, momentum=args.momentum, nesterov=args.nesterov,
                                  decay_norm_and_bias=(not models.is_transformer(unwrap(net))
                                                       if decay_all is None else decay_all),
                                  fused=use_fused(name, rt), capturable=capturable) if train else None
                  for net, name, lr, wd, train in zip(nets, names, lrs, decays, trainable)]
    return optimizers, [lr if train else 0.0 for lr, train in zip(lrs, trainable)]


def step_optimizers(optimizers, scaler, clip_grad=None, clip_mode="norm"):
    """Step every optimizer through the gradient scaler, then update the scaler; returns the statistics
    it adds to the step's: {"grad_norm": (n,)} with --clip-grad by norm, else {}.

    optimizers: one per network (None for a --freeze network, whose norm reads 0). With clip_grad, each
    network's gradients are clipped before its step as timm's --clip-grad/--clip-mode do: "norm" scales
    them so that their global L2 norm is at most clip_grad (torch.nn.utils.clip_grad_norm_), "value"
    clamps each element to [-clip_grad, clip_grad]. Under fp16 they are unscaled first, so the bound is
    on the true gradient. Both are tensor operations: no host synchronisation, the step stays capturable.
    """
    norms = []
    for optimizer in optimizers:
        if optimizer is None:
            norms.append(None)
            continue
        norms.append(clip_gradients(optimizer, scaler, clip_grad, clip_mode))
        scaler.step(optimizer)
    scaler.update()
    known = [norm for norm in norms if norm is not None]
    if not known:
        return {}
    return {"grad_norm": torch.stack([known[0].new_zeros(()) if norm is None else norm for norm in norms])}


def clip_gradients(optimizer, scaler, clip_grad, clip_mode="norm"):
    """Clip the gradients of one optimizer's parameters (see step_optimizers); returns their L2 norm
    before clipping in "norm" mode, else None (also when clip_grad is None: nothing is clipped)."""
    if clip_grad is None:
        return None
    scaler.unscale_(optimizer)  # fp16: the bound applies to the true gradient (a no-op otherwise)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip_mode == "value":
        torch.nn.utils.clip_grad_value_(params, clip_grad)
        return None
    return torch.nn.utils.clip_grad_norm_(params, clip_grad).float()


class Schedule:
    """Per-iteration learning rates for a group of optimizers with their own peak rates."""

    def __init__(self, args, optimizers, peak_lrs, steps_per_epoch, min_lr=None):
        """min_lr: the cosine schedule's final rate as a fraction of the peak (default: --min-lr)."""
        self.optimizers, self.peak_lrs = optimizers, peak_lrs
        self.kwargs = dict(total_steps=args.epochs * steps_per_epoch,
                           warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                           schedule=args.schedule, milestones=args.milestones, gamma=args.gamma,
                           min_lr=args.min_lr if min_lr is None else min_lr)

    def rates(self, global_step):
        """Each optimizer's rate at iteration `global_step`."""
        factor = lr_factor(global_step, **self.kwargs)
        return [peak * factor for peak in self.peak_lrs]

    def step(self, global_step):
        """Set every optimizer's rate for iteration `global_step`; returns the rates."""
        lrs = self.rates(global_step)
        for optimizer, lr in zip(self.optimizers, lrs):
            if optimizer is not None:  # a --freeze network has none
                set_lr(optimizer, lr)
        return lrs
