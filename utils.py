"""Plumbing shared by every training script: flags, device and precision, data and model setup,
optimizers and learning-rate schedules, and evaluation. The helpers a script's loop calls
(batches, logging, checkpoints, resume) are in engine.py, the paper's losses in losses.py, and
what makes a paradigm itself stays in its script."""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import models
from datasets import DatasetError, build_data, data_from_arrays, make_loaders

class UsageError(Exception):
    """A user-facing, one-line error: bad flag values, a wrong checkpoint, missing data (exit code 2)."""


class RunFailure(Exception):
    """A run that cannot go on, said in one line: a full or read-only disk (exit code 1), or
    training that diverged (exit code 3, so that a job scheduler can tell it apart)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class RunComplete(Exception):
    """--resume auto found a run that has already trained every epoch: nothing to do (exit code 0)."""


def fail(message, code=2):
    """Print `error: message` on one line to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def launch(main, parser, argv=None):
    """Parse argv and run main(args); what a user can cause ends in one line on stderr and a
    non-zero exit code (2 for bad input), never in a traceback."""
    try:
        args = parse_args(parser, argv)
    except UsageError as error:
        fail(str(error))

    def checked_main(args):
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        try:
            return main(args)
        except (UsageError, DatasetError) as error:
            fail(rank + str(error))
        except RunFailure as error:
            fail(rank + str(error), error.exit_code)
        except RunComplete as error:
            print(str(error), flush=True)
            return None
        except KeyboardInterrupt:  # a second Ctrl-C while a step ran: the first one had not been honoured yet
            for sig in (signal.SIGINT, signal.SIGTERM):  # a third one must not interrupt the exit
                signal.signal(sig, signal.SIG_IGN)
            fail(rank + "interrupted twice: stopped at once; last.pt holds the state of the last completed epoch", 130)
        except (MemoryError, torch.OutOfMemoryError) as error:
            fail(rank + out_of_memory_message(error), 1)
        except RuntimeError as error:
            if "can't allocate memory" not in str(error) and "out of memory" not in str(error):
                raise
            fail(rank + out_of_memory_message(error), 1)

    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun, record() saves a crashing rank's traceback for the launcher's
        # end-of-job summary, whose "Root Cause" names the rank that failed first.
        from torch.distributed.elastic.multiprocessing.errors import record
        checked_main = record(checked_main)
    result = checked_main(args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def parse_args(parser, argv=None):
    """parser.parse_args(argv) with the values of --config FILE (a run's args.json) as defaults, so
    that the flags given on the command line override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is not None and any(action.dest == "config" for action in parser._actions):
        parser.set_defaults(**read_config(path, parser))
    return parser.parse_args(argv)


# args.json entries that belong to the run that wrote them, not to a run repeating it: its directory
# (a repeat must not write over it), how it was resumed or stopped, and values recorded for the log.
CONFIG_SKIPPED = ("config", "out_dir", "resume", "overwrite", "stop_after", "world_size")


def read_config(path, parser):
    """The flag values of --config FILE, checked against the parser's flags; UsageError in one line."""
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as error:
        raise UsageError(f"--config '{path}': {error.strerror or error}") from None
    except ValueError as error:
        raise UsageError(f"--config '{path}' is not a JSON file of flag values ({error})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config '{path}' must hold a JSON object of flag values, as a run's args.json does")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    defaults = {}
    for key, value in config.items():
        if key in CONFIG_SKIPPED:
            continue
        if key not in actions:
            raise UsageError(f"--config '{path}': '{key}' is not a flag of {parser.prog} (an args.json of another script?)")
        if not config_value_ok(actions[key], value):
            raise UsageError(f"--config '{path}': {key} = {json.dumps(value)} is not a value of {actions[key].option_strings[0]}")
        defaults[key] = [float(v) for v in value] if actions[key].type is float and isinstance(value, list) else \
            float(value) if actions[key].type is float and value is not None else value
    return defaults


def config_value_ok(action, value):
    """True when a JSON value is one that the flag could have given (type, list or not, choices)."""
    if value is None:
        return action.default is None
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            return False
        values = value
    else:
        values = [value]
    kinds = {int: (int,), float: (int, float), None: (str,)}
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        kinds = {None: (bool,)}
    allowed = kinds.get(action.type, (str,))
    return all(isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
               and (not action.choices or v in action.choices) for v in values)


def out_of_memory_message(error):
    """One line for an allocation that failed (host or device memory)."""
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return f"out of memory ({detail}); lower --batch-size, --eval-batch-size or --img-size"


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it is None or the help text already states it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ListModels(argparse.Action):
    """--list-models: print the registered model names and aliases, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        aliases = ", ".join(f"{alias} = {name}" for alias, name in sorted(models.ALIASES.items()))
        print("models: " + " ".join(models.list_models()) + f"\naliases: {aliases}\n"
              "tv:NAME (torchvision, random weights): " + " ".join(models.zoo.torchvision_models()) + "\n"
              "timm:NAME (timm, random weights; pip install timm): any name of timm.list_models()")
        parser.exit()


def get_args_parser(description, *, group=False, epochs=200, batch_size=128, optimizer="sgd",
                    schedule="cosine", weight_decay=5e-4, warmup_epochs=1.0, label_smoothing=0.0):
    """The flags every script shares, in groups; scripts add their own group and may change the
    recipe defaults given here."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_flags(parser.add_argument_group("model"), group)
    add_data_flags(parser.add_argument_group("data"))
    add_optimization_flags(parser.add_argument_group("optimization"), epochs=epochs, batch_size=batch_size,
                           optimizer=optimizer, schedule=schedule, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, label_smoothing=label_smoothing)
    add_run_flags(parser.add_argument_group("run"))
    add_speed_flags(parser.add_argument_group("speed"))
    add_distributed_flags(parser.add_argument_group("distributed (under torchrun)"))
    return parser


def add_model_flags(flags, group):
    """Which network(s): --model, or a group's --models (and the authors' pair spellings)."""
    add = flags.add_argument
    names = (f"{', '.join(models.list_models())}; tv:NAME a torchvision model, timm:NAME a timm model; "
             "aliases and zoo names: --list-models")
    if group:
        add("--models", nargs="+", metavar="NAME", help=f"the networks of the group (n >= 2; default: resnet32 resnet32; {names})")
        add("--model1", help="first network of a pair (authors' spelling; same as --models A B)")
        add("--model2", help="second network of a pair")
        add("--teacher", help="first network of a pair (authors' spelling: roles are decided every step "
                              "by the competition, not by this name)")
        add("--student", help="second network of a pair (see --teacher)")
        add("--freeze", nargs="+", type=int, default=[], metavar="NET",
            help="networks (their index in the group, 0 = first) whose weights stay fixed: eval-mode BatchNorm "
                 "and dropout, no optimizer, never a gradient; one trained frozen network makes competitive "
                 "distillation classic offline distillation in which the student may still lead")
    else:
        add("--model", default="resnet32", help=f"network name or alias ({names})")
    add("--list-models", action=ListModels, help="print the model names and aliases, then exit")
    add("--init", nargs="+", default=[], metavar="[NET=]FILE",
        help="initial weights of network NET (its index in the group, 0 = first; may be left out with one network): "
             "a checkpoint of this repository (best.pt, last.pt; FILE@K or FILE@LABEL picks one of its networks), "
             "a state_dict file, or a torchvision/timm weight file (.pth, .safetensors)")
    add("--reset-classifier", action=argparse.BooleanOptionalAction, default=False,
        help="with --init: keep each initialised network's fresh classifier (its last layer, which outputs the "
             "class logits) instead of loading it, for weights trained on another class count")


def add_data_flags(flags):
    """Data set, split and input size."""
    add = flags.add_argument
    add("--dataset", default="cifar10", help="cifar10, cifar100, fashion-mnist, mnist, svhn, imagenet, imagefolder, fake")
    add("--data-dir", default="./data", help="where datasets are looked for and downloaded")
    add("--download", action=argparse.BooleanOptionalAction, default=True,
        help="download missing datasets when the network allows")
    add("--img-size", type=int, default=None,
        help="input size fed to the networks (default: the dataset's native size; the authors used 224 for CIFAR-100)")
    add("--val-size", type=int, default=None,
        help="images held out from the training set to select the best checkpoint "
             "(default: 5000 for CIFAR, MNIST-likes and SVHN, 0 otherwise)")
    add("--split-seed", type=int, default=0, help="seed of the train/validation split (fixed across runs so runs compare)")
    add("--train-subset", type=int, default=None,
        help="train on only the first N images of the training split (quick experiments; validation and test sets stay whole)")
    add("--crop", action=argparse.BooleanOptionalAction, default=True,
        help="train on random crops of the zero-padded image (4 px on CIFAR and SVHN, 2 on MNIST-likes, the usual "
             "CIFAR augmentation); --no-crop trains on whole images, as the authors did on CIFAR-100 (in-memory sets "
             "only: image folders always use RandomResizedCrop)")
    add("--rotate", type=float, default=0.0, metavar="DEG",
        help="train: rotate each image by an angle uniform in [-DEG, DEG] at the input size, nearest sampling, "
             "black corners (torchvision's RandomRotation; the authors used 15); default 0: off")
    add("--num-classes", type=int, default=None, help="class count of the synthetic 'fake' dataset (other datasets set their own)")
    add("--loader", default="auto", choices=["auto", "gpu", "torch"],
        help="gpu: dataset held on the device with batched augmentation there (in-memory sets); torch: DataLoader with workers")
    add("--workers", type=int, default=None,
        help="DataLoader worker processes (torch loader; default: min(8, CPUs per process of this node) on CUDA, 2 on the CPU)")
    add("--skip-bad-images", action=argparse.BooleanOptionalAction, default=True,
        help="image folders: replace an unreadable image file (truncated, not an image) by the next image, with a "
             "warning naming it, as timm does; --no-skip-bad-images stops at the first with one line naming it")


def add_optimization_flags(flags, *, epochs, batch_size, optimizer, schedule, weight_decay, warmup_epochs, label_smoothing):
    """The recipe: epochs, batch, optimizer, learning-rate schedule, regularisation."""
    add = flags.add_argument
    add("--epochs", type=int, default=epochs, help="training epochs")
    add("--batch-size", type=int, default=batch_size, help="training batch size (per process)")
    add("--eval-batch-size", type=int, default=None, help="evaluation batch size (default: 2 x batch size)")
    add("--optimizer", nargs="+", default=[optimizer], choices=["sgd", "adamw", "adam"],
        help="optimizer, one for all networks or one per network")
    add("--lr", nargs="+", type=float, default=None,
        help="learning rate, one or one per network (default: sgd 0.1 x batch/128, adam/adamw 1e-3)")
    add("--weight-decay", nargs="+", type=float, default=[weight_decay],
        help="weight decay, one or one per network (decoupled for AdamW)")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum for SGD")
    add("--schedule", default=schedule, choices=["cosine", "step", "constant"],
        help="learning-rate schedule, stepped every iteration")
    add("--warmup-epochs", type=float, default=warmup_epochs,
        help="linear warm-up length in epochs (1 for the CNN recipe: at lr 0.1 a network that distils "
             "from a peer in its first steps can otherwise diverge)")
    add("--milestones", nargs="+", type=float, default=[0.5, 0.75], help="step schedule: decay points as fractions of training")
    add("--gamma", type=float, default=0.1, help="step schedule: decay factor at each milestone")
    add("--min-lr", type=float, default=0.0, help="cosine schedule: final learning rate as a fraction of the peak")
    add("--label-smoothing", type=float, default=label_smoothing, help="label smoothing of the cross-entropy")
    add("--drop-path", type=float, default=0.1,
        help="stochastic depth of the transformers (ViT/CeiT), rising linearly to this rate in the last "
             "block (DeiT/CeiT: 0.1); CNNs have none")
    add("--decay-norm-and-bias", action=argparse.BooleanOptionalAction, default=None,
        help="weight decay on norms, biases and embeddings too (default: not for transformers, as in "
             "DeiT/CeiT; for CNNs, as in the CIFAR recipe)")


def add_run_flags(flags):
    """Seeds, run directory, resume and output."""
    add = flags.add_argument
    add("--config", default=None, metavar="FILE",
        help="a run's args.json, whose values become this run's defaults (flags given here override them; "
             "its out_dir, resume, overwrite and stop_after are not taken): repeat a run, or change one flag")
    add("--seed", type=int, default=0, help="seed of weights, data order, augmentation and perturbation")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=False,
        help="deterministic kernels (slower); exact resume")
    add("--out-dir", default=None, help="run directory (default: runs/<script>-<dataset>-<models>-<time>)")
    add("--resume", default=None, help="checkpoint to continue from, or 'auto' for <out-dir>/last.pt when it exists")
    add("--overwrite", action="store_true",
        help="start afresh in a --out-dir that holds an earlier run, deleting that run's files (without it such a directory is refused)")
    add("--stop-after", type=int, default=None,
        help="stop this invocation after N epochs (for time-limited jobs); continue with --resume")
    add("--eval-every", type=int, default=1,
        help="evaluate (validation and test sets) every N epochs and always after the last one; "
             "best.pt is chosen among the evaluated epochs")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="tqdm progress bars (default: when stdout is a terminal)")
    add("--log-interval", type=int, default=None, metavar="N",
        help="print a line every N training steps: loss, lr, images/s, time left in the epoch and the run "
             "(default: 50 when stdout is not a terminal, as in a batch job; 0 = off)")


def add_speed_flags(flags):
    """Device, precision, memory format, compilation and CUDA graphs."""
    add = flags.add_argument
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
        help="autocast precision (auto: bf16 on CUDA, none on CPU)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="channels_last memory format (faster convolutions on CPU and GPU)")
    add("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
        help="capture each whole training step in one CUDA graph and replay it (CUDA, one process, fp32/bf16)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile every network for training (costs a compilation of a minute or more)")


def add_distributed_flags(flags):
    """Data parallelism under torchrun."""
    add = flags.add_argument
    add("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
        help="normalise BatchNorm with statistics of the global batch (SyncBatchNorm, GPUs only); "
             "off: each process uses its own batch's statistics, running statistics follow rank 0 (DDP's default)")
    add("--lr-scaling", default="linear", choices=["linear", "none"],
        help="with K processes, linear multiplies the peak lr (--lr, or its default computed from the "
             "per-process batch) by K, so K processes x batch B follow the recipe of one process with batch K*B "
             "(Goyal et al. 2017; DeiT); none uses the rate as given")


# Ranges of the numeric flags: a flag outside its range is refused in one line.
def _positive(v): return v > 0
def _non_negative(v): return v >= 0
def _fraction(v): return 0 <= v <= 1
def _below_one(v): return 0 <= v < 1
def _half_turn(v): return 0 <= v <= 180


FLAG_RANGES = {
    "lr": (_positive, "positive"), "weight_decay": (_non_negative, ">= 0"), "momentum": (_below_one, "in [0, 1)"),
    "warmup_epochs": (_non_negative, ">= 0"), "min_lr": (_fraction, "in [0, 1]"),
    "label_smoothing": (_below_one, "in [0, 1)"), "gamma": (_positive, "positive"), "milestones": (_fraction, "in [0, 1]"),
    "kd_weight": (_non_negative, ">= 0"), "temperature": (_positive, "positive"), "mixup": (_non_negative, ">= 0"),
    "cutmix": (_non_negative, ">= 0"), "mix_prob": (_fraction, "in [0, 1]"), "switch_prob": (_fraction, "in [0, 1]"),
    "drop_path": (_below_one, "in [0, 1)"), "rotate": (_half_turn, "in [0, 180] (degrees)"),
}


def check_numbers(args):
    """Every float flag is a finite number within its range (NaN, inf and negative rates are refused)."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, float) for v in values):
            continue
        flag = "--" + name.replace("_", "-")
        for v in values:
            if not math.isfinite(v):
                raise UsageError(f"{flag} must be a finite number, got {v}")
            if name in FLAG_RANGES and not FLAG_RANGES[name][0](v):
                raise UsageError(f"{flag} must be {FLAG_RANGES[name][1]}, got {v}")


def check_args(args):
    """Reject flag values that cannot work, with one line saying what is accepted."""
    check_numbers(args)
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    if args.img_size is not None and args.img_size < 8:
        raise UsageError(f"--img-size must be >= 8, got {args.img_size}")
    if args.val_size is not None and args.val_size < 0:
        raise UsageError(f"--val-size must be >= 0, got {args.val_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.log_interval is not None and args.log_interval < 0:
        raise UsageError(f"--log-interval must be >= 0 (0 = off), got {args.log_interval}")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be a positive integer, got {args.stop_after}")
    if args.resume == "auto" and args.out_dir is None:
        raise UsageError("--resume auto needs --out-dir (the run directory to continue)")
    if getattr(args, "perturb_every", 0) < 0:
        raise UsageError(f"--perturb-every must be >= 0 (0 disables perturbation), got {args.perturb_every}")


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
        names = [models.resolve_name(name) for name in given]
    except ValueError as error:
        raise UsageError(str(error)) from None
    init_files(args, len(names))  # --init and --freeze are checked before the data is loaded
    frozen_nets(args, len(names))
    return names


def init_files(args, n):
    """--init as {network index: (file, pick)}, pick being the @K/@LABEL suffix or None; UsageError
    for a network that is not in the group or named twice (the files are read by build_nets)."""
    files = {}
    for spec in args.init:
        net, equals, path = spec.partition("=")
        if not equals:
            net, path = ("0" if n == 1 else None), spec
        if net is None or not net.isdigit() or int(net) >= n:
            raise UsageError(f"--init '{spec}': give NET=FILE with NET a network index of the group, 0..{n - 1}"
                             + (" (with one network FILE alone is enough)" if n == 1 else ""))
        path, at, pick = path.rpartition("@") if "@" in os.path.basename(path) else (path, "", None)
        if int(net) in files:
            raise UsageError(f"--init names network {net} twice; give one file per network")
        files[int(net)] = (path, pick)
    if args.reset_classifier and not files:
        raise UsageError("--reset-classifier applies to networks initialised with --init; give --init NET=FILE")
    return files


def frozen_nets(args, n):
    """--freeze as a set of network indices; UsageError for one outside the group or a group with no network left to train."""
    frozen = set(getattr(args, "freeze", []))
    bad = [i for i in frozen if not 0 <= i < n]
    if bad:
        raise UsageError(f"--freeze {bad[0]}: networks are numbered 0..{n - 1} in the group's order")
    if len(frozen) == n:
        raise UsageError(f"--freeze names all {n} networks: at least one must train")
    return frozen


def net_labels(names):
    """Unique display labels: net0_resnet32, net1_vit_tiny, net2_tv_resnet18 (a zoo prefix's colon
    is not allowed in TensorBoard tags), ..."""
    return [f"net{i}_{name.replace(':', '_')}" for i, name in enumerate(names)]


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


def cpu_has_native_bf16():
    """True when this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16); False
    when they are missing or cannot be queried. bench.py reports it with its CPU rows: even with
    AVX512-BF16, bf16 autocast trained the CIFAR ResNets no faster than fp32 (docs/speed.md).
    torch's public torch.backends.cpu.get_cpu_capability() names only the vector width, so this asks
    the cpuinfo queries behind it, which are private and were renamed between releases: guarded."""
    cpu = getattr(torch._C, "_cpu", None)
    try:
        flags = cpu._get_cpu_capability()  # recent torch: a dict of cpuinfo's flags
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        pass
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # older torch
        try:
            if getattr(cpu, query)():
                return True
        except (AttributeError, RuntimeError):
            pass
    return False


def setup_runtime(args):
    """Pick the device and precision, seed everything and join the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size)
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
    return Runtime(device, amp_dtype, args.channels_last, rank, world_size, sync_bn, args.compile, cuda_graphs)


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


class HostRandom(random.Random):
    """random.Random for host-side draws (no device synchronisation) whose state goes into
    checkpoints like the other resumable objects (state_dict/load_state_dict)."""

    def state_dict(self):
        """The Mersenne Twister state, as a list of ints."""
        return list(self.getstate()[1])

    def load_state_dict(self, state):
        """Restore what state_dict() returned."""
        self.setstate((3, tuple(state), None))


def all_reduce_sum(tensor, rt):
    """Sum a tensor over all processes in place (no-op in a single process)."""
    if rt.distributed:
        dist.all_reduce(tensor)
    return tensor


def unwrap(net):
    """The plain module inside DDP and torch.compile wrappers, in either order."""
    while True:
        if isinstance(net, DDP):
            net = net.module
        elif "_orig_mod" in net._modules:  # torch.compile's OptimizedModule holds the module it compiled
            net = net._orig_mod
        else:
            return net


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
def setup_data(args, rt):
    """Build the dataset and its train/val/test loaders from the flags."""
    def build(download):
        return build_data(args.dataset, args.data_dir, img_size=args.img_size, val_size=args.val_size,
                          split_seed=args.split_seed, download=download, num_classes=args.num_classes,
                          skip_bad_images=args.skip_bad_images, crop=args.crop, rotate=args.rotate)

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
    # The data set's defaults, written as their values in args.json (so --config repeats the run)
    for flag in ("img_size", "val_size", "num_classes"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(data.info, flag))
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    if args.train_subset is not None:
        data = train_subset(data, args.train_subset)
    loaders = make_loaders(data, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                           loader=args.loader, device=rt.device, workers=resolve_workers(args.workers, rt.device), seed=args.seed,
                           drop_last=True, rank=rt.rank, world_size=rt.world_size)
    if len(loaders[0]) == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than this process's share of the "
                         f"{data.info.train_size} training images")
    return data, loaders


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


def train_subset(data, size):
    """Keep only the first `size` images of the training split (quick experiments, smoke tests)."""
    if not 0 < size <= data.info.train_size:
        raise UsageError(f"--train-subset must be in 1..{data.info.train_size} (the training split's size), got {size}")
    info = dataclasses.replace(data.info, train_size=size)
    if data.arrays is not None:
        images, labels = data.arrays["train"]
        return data_from_arrays(info, {**data.arrays, "train": (images[:size], labels[:size])})
    return dataclasses.replace(data, info=info, train=torch.utils.data.Subset(data.train, range(size)))


def build_nets(names, info, rt, args=None, drop_path=0.0):
    """Create the named networks for the dataset's geometry, on the device (DDP-wrapped under
    torchrun); the transformers among them get stochastic depth `drop_path` (the CNNs have none);
    with `args`, --init gives them their initial weights and --freeze fixes some."""
    init = init_files(args, len(names)) if args is not None else {}
    frozen = frozen_nets(args, len(names)) if args is not None else set()
    nets = []
    for i, name in enumerate(names):
        try:
            extra = {"drop_path_rate": drop_path} if models.resolve_name(name) in models.TRANSFORMERS else {}
            net = models.create_model(name, num_classes=info.num_classes, img_size=info.img_size,
                                      in_chans=info.in_chans, **extra)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if i in init:
            load_initial_weights(net, *init[i], label=f"network {i} ({name})", reset_classifier=args.reset_classifier)
        if i in frozen:
            # eval mode: BatchNorm normalises with (and keeps) its running statistics, dropout is off
            net.requires_grad_(False).eval()
        if rt.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        memory_format = torch.channels_last if rt.channels_last else torch.preserve_format
        net = net.to(rt.device, memory_format=memory_format)
        if rt.distributed and i not in frozen:  # (DDP refuses a module without trainable parameters)
            # One DDP per network: each averages its own gradients over the processes during the
            # group's single backward. Every registered model uses all its parameters in forward
            # (tests/test_models.py), so no unused-parameter search is needed.
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


def load_initial_weights(net, path, pick, *, label, reset_classifier):
    """Load an --init file into `net`; UsageError naming the first tensor that is missing, left over
    or of another shape (the classifier's are skipped with --reset-classifier)."""
    state, own = read_weight_file(path, pick), net.state_dict()
    head = classifier_keys(net)
    skip = head if reset_classifier else set()
    for key, value in own.items():
        if key in skip:
            continue
        if key not in state:
            raise UsageError(f"--init '{path}': {label} has a tensor '{key}' that the file lacks (weights of another architecture?)")
        if state[key].shape != value.shape:
            hint = "; --reset-classifier keeps a fresh classifier for another class count" if key in head else ""
            raise UsageError(f"--init '{path}': tensor '{key}' is {tuple(state[key].shape)} in the file "
                             f"but {tuple(value.shape)} in {label}{hint}")
    extra = next((key for key in state if key not in own), None)
    if extra is not None:
        raise UsageError(f"--init '{path}': the file's tensor '{extra}' has no place in {label} (weights of another architecture?)")
    net.load_state_dict({key: value for key, value in state.items() if key not in skip}, strict=False)


def classifier_keys(net):
    """State-dict keys of the network's classifier: timm's get_classifier(), else its last Linear or
    Conv2d module (SqueezeNet's classifier is a 1x1 convolution)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    last = None
    for name, module in net.named_modules():
        if module is head or (head is None and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))):
            last = name
    return set() if not last else {f"{last}.{key}" for key in net.get_submodule(last).state_dict()}


def read_weight_file(path, pick):
    """The state dict of an --init file: one network of this repository's checkpoint (`pick`: index or
    label), a plain state_dict (or one under 'state_dict'/'model', as timm's and torchvision's
    reference training scripts save it) or a .safetensors file, without DDP's 'module.' and
    torch.compile's '_orig_mod.' key prefixes."""
    if not os.path.isfile(path):
        raise UsageError(f"--init: weight file '{path}' does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            content = load_file(path)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise UsageError(f"--init '{path}': .safetensors files need the safetensors package: pip install safetensors") from None
    except Exception as error:  # torch and safetensors raise several types for foreign or truncated files
        raise UsageError(f"--init '{path}' is not a readable weight file ({type(error).__name__}); expected a "
                         f"torch.save file of tensors (.pt, .pth) or a .safetensors file") from None
    if isinstance(content, dict) and "nets" in content and "models" in content:
        content = pick_network(content, path, pick)
    elif pick is not None:
        raise UsageError(f"--init '{path}@{pick}': @ picks a network of this repository's checkpoints; '{path}' is a plain weight file")
    else:
        content = next((content[key] for key in ("state_dict", "model") if isinstance(content, dict)
                        and isinstance(content.get(key), dict)), content)
    if not isinstance(content, dict) or not content or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise UsageError(f"--init '{path}' holds no state_dict (a dict of tensor names to tensors)")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in content.items()}


def pick_network(ckpt, path, pick):
    """One network's state dict of this repository's checkpoint: the only one, or `pick` (index or label)."""
    labels = net_labels(ckpt["models"])
    n = len(labels)
    if pick is None and n > 1:
        raise UsageError(f"--init '{path}' holds {n} networks ({', '.join(labels)}); pick one with {path}@K (0..{n - 1}) or {path}@LABEL")
    index = 0 if pick is None else int(pick) if pick.isdigit() else labels.index(pick) if pick in labels else None
    if index is None or index >= n:
        raise UsageError(f"--init '{path}@{pick}': no such network; the file holds {', '.join(labels)} (pick by index 0..{n - 1} or label)")
    return ckpt["nets"][index]


def to_input(images, rt):
    """Lay a batch out in the networks' memory format."""
    return images.contiguous(memory_format=torch.channels_last) if rt.channels_last and images.dim() == 4 else images


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


def build_optimizers(args, nets, rt=None):
    """One optimizer per network from the flags, peak lrs scaled to rt's processes; returns (optimizers,
    peak lrs). A network without trainable parameters (--freeze) gets None and a rate of 0."""
    n = len(nets)
    names = per_net(args.optimizer, n, "--optimizer")
    if not args.lr:  # the computed default is written back, so args.json records the rate the run used
        defaults = [default_lr(name, args.batch_size) for name in names]
        args.lr = defaults[:1] if len(set(defaults)) == 1 else defaults
    lrs = per_net(args.lr, n, "--lr")
    if args.lr_scaling == "linear" and rt is not None:  # --batch-size is per process; the rate follows the global one
        lrs = [lr * rt.world_size for lr in lrs]
    decays = per_net(args.weight_decay, n, "--weight-decay")
    decay_all = getattr(args, "decay_norm_and_bias", None)
    capturable = rt is not None and rt.cuda_graphs
    trainable = [any(p.requires_grad for p in unwrap(net).parameters()) for net in nets]
    # A transformer (it names its embeddings in no_weight_decay()) keeps the DeiT exemptions in any
    # group; a CNN is decayed everywhere, as in the CIFAR recipe; the flag overrides both.
    optimizers = [build_optimizer(net, name, lr, wd, momentum=args.momentum, nesterov=args.nesterov,
                                  decay_norm_and_bias=(not hasattr(unwrap(net), "no_weight_decay")
                                                       if decay_all is None else decay_all),
                                  fused=use_fused(name, rt), capturable=capturable) if train else None
                  for net, name, lr, wd, train in zip(nets, names, lrs, decays, trainable)]
    return optimizers, [lr if train else 0.0 for lr, train in zip(lrs, trainable)]


class Schedule:
    """Per-iteration learning rates for a group of optimizers with their own peak rates."""

    def __init__(self, args, optimizers, peak_lrs, steps_per_epoch):
        self.optimizers, self.peak_lrs = optimizers, peak_lrs
        self.kwargs = dict(total_steps=args.epochs * steps_per_epoch,
                           warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                           schedule=args.schedule, milestones=args.milestones, gamma=args.gamma,
                           min_lr=args.min_lr)

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
    # The plain modules: DDP's forward would broadcast buffers, a collective that hangs when the
    # unpadded evaluation shards give the processes different numbers of batches.
    nets = [unwrap(net) for net in nets]
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
