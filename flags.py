"""The command line every script shares: its flags, each with its range, and the checks of what the
flags name together (the group of networks, --init, --freeze). Parsing with --config and --resume is
configs.py; launching a script and its exit codes, stopping.py.
"""
import argparse
import importlib.util
import math
import os
import re
from typing import NamedTuple

import configs
import models
from datasets import DATASETS
from errors import UsageError, fail

# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it is None or the help text already states it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_NOT_GIVEN = object()

# What a number flag may be declared to hold (add(..., valid=NAME), next to the flag): a test and the
# words that say it; parsing refuses any other value in one line, whether from the command line, a
# --config file or a resumed run. Every float flag must also be finite.
VALID = {
    "positive": (lambda v: v > 0, "positive"),
    "positive integer": (lambda v: v >= 1, "a positive integer"),
    "non-negative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "below one": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "open fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (unknown flag, bad choice, missing value) are one line on
    stderr, `error: PROG: ...`, and exit code 2, like every other bad input; --help shows the usage.
    The namespace it returns also knows which flags the command line gave (configs.given_flags) and
    which script parsed it (configs.script_of); a number outside its flag's declared range (`valid`,
    see adder) is a UsageError.

    script: the name a run of this script records (args.json, checkpoints).
    older_runs: the value of each flag added since runs were first recorded that such a run had in effect
    (the behaviour before the flag), so that a resume or --config of a run whose arguments lack the flag
    continues or repeats that run rather than taking the flag's new default."""
    script = None
    older_runs = {}

    def error(self, message):
        fail(f"{self.prog}: {message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        if namespace is not None:
            return super().parse_known_args(args, namespace)
        parsed, extras = self._parse_over(args, {})
        defaults, changes = configs.replayed(self, parsed)  # --config FILE, --resume: the recorded run's flags
        if defaults:
            parsed, extras = self._parse_over(args, defaults)
        parsed._resume_changes = changes
        self.check_numbers(parsed)
        return parsed, extras

    def _parse_over(self, args, defaults):
        """Parse `args` with `defaults` standing in for the flags' own (the parser is not changed), and mark
        which flags the command line gave and which script parsed them."""
        parsed, extras = super().parse_known_args(args, argparse.Namespace(**defaults))
        # Parsed once more into a namespace whose every flag already holds a marker: argparse then
        # writes only the flags that the command line gives.
        probe = argparse.Namespace(**{a.dest: _NOT_GIVEN for a in self._actions if a.dest != argparse.SUPPRESS})
        super().parse_known_args(args, probe)
        parsed._given = frozenset(k for k, v in vars(probe).items() if v is not _NOT_GIVEN)
        parsed._script = self.script
        return parsed, extras

    def check_numbers(self, args):
        """UsageError in one line for a float flag that is not finite or a number outside its flag's range."""
        for action in self._actions:
            value = getattr(args, action.dest, None)
            values = value if isinstance(value, list) else [value]
            flag = action.option_strings[0] if action.option_strings else action.dest
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise UsageError(f"{flag} must be a finite number, got {v}")
                valid = getattr(action, "valid", None)
                if valid is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                    test, words = VALID[valid] if isinstance(valid, str) else valid
                    if not test(v):
                        raise UsageError(f"{flag} must be {words}, got {v}")


def adder(group):
    """group.add_argument that also takes valid=RANGE, the range of the flag's numbers: a name of VALID or
    (test, words)."""
    def add(*names, valid=None, **kwargs):
        action = group.add_argument(*names, **kwargs)
        action.valid = valid
        return action
    return add


class ListModels(argparse.Action):
    """--list-models: print the registered model names and aliases, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        aliases = ", ".join(f"{alias} = {name}" for alias, name in sorted(models.ALIASES.items()))
        print("models: " + " ".join(models.list_models()) + f"\naliases: {aliases}\n"
              "tv:NAME (torchvision, random weights): " + " ".join(models.zoo.torchvision_models()) + "\n"
              "timm:NAME (timm, random weights; pip install timm): any name of timm.list_models()\n"
              "one:BASE:M, okddip:BASE:M (the branched networks of train_one.py, train_okddip.py) on BASE: "
              + " ".join(models.BRANCHABLE))
        parser.exit()


def get_args_parser(description, *, script, group=False, authors_pair=True, epochs=200, batch_size=128, optimizer="sgd",
                    schedule="cosine", weight_decay=5e-4, warmup_epochs=1.0, label_smoothing=0.0, min_lr=0.0):
    """The flags every script shares, in groups; scripts add their own group and may change the
    recipe defaults given here (min_lr None: unset unless given, as when a script has another final rate)."""
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.script = script
    parser.older_runs = {"clip_grad": None, "clip_mode": "norm"}  # flags newer than the first recorded runs
    add_model_flags(parser.add_argument_group("model"), group, authors_pair)
    add_data_flags(parser.add_argument_group("data"))
    add_optimization_flags(parser.add_argument_group("optimization"), epochs=epochs, batch_size=batch_size,
                           optimizer=optimizer, schedule=schedule, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, min_lr=min_lr)
    add_run_flags(parser.add_argument_group("run"))
    add_speed_flags(parser.add_argument_group("speed"))
    add_distributed_flags(parser.add_argument_group("distributed (under torchrun)"))
    return parser


def add_model_flags(flags, group, authors_pair=True):
    """Which network(s): --model, or a group's --models (and the pair spellings --model1/--model2 and,
    with authors_pair, the competitive-distillation authors' --teacher/--student)."""
    add = adder(flags)
    names = (f"{', '.join(models.list_models())}; tv:NAME a torchvision model, timm:NAME a timm model; "
             "aliases and zoo names: --list-models")
    if group:
        add("--models", nargs="+", metavar="NAME", help=f"the networks of the group (n >= 2; default: resnet32 resnet32; {names})")
        add("--model1", help="first network of a pair (authors' spelling; same as --models A B)")
        add("--model2", help="second network of a pair")
        if authors_pair:
            add("--teacher", help="first network of a pair (authors' spelling: roles are decided every step "
                                  "by the competition, not by this name)")
            add("--student", help="second network of a pair (see --teacher)")
        add("--views", default="same", choices=["same", "independent"],
            help="same: every network trains on the same augmented batch (DML, competitive distillation); "
                 "independent: each network on its own random augmentation of the batch's images (KDCL)")
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
    add("--pretrained", nargs="*", type=int, default=None, metavar="NET",
        help="start tv: and timm: networks from their library's pretrained weights (torchvision's DEFAULT weights, "
             "timm's default tag), downloaded into the library's cache when missing: the networks NET (index in the "
             "group) or, given alone, every tv:/timm: network; an RGB stem is adapted to other channel counts and a "
             "classifier of another class count replaced, each said in one line")
    add("--reset-classifier", action=argparse.BooleanOptionalAction, default=False,
        help="with --init: keep each initialised network's fresh classifier (its last layer, which outputs the "
             "class logits) instead of loading it, for weights trained on another class count")


def add_data_flags(flags):
    """Data set, split and input size."""
    add = adder(flags)
    add("--dataset", default="cifar10", help=", ".join(DATASETS))
    add("--data-dir", default="./data", help="where datasets are looked for and downloaded")
    add("--download", action=argparse.BooleanOptionalAction, default=True,
        help="download missing datasets when the network allows")
    add("--img-size", valid=(lambda v: v >= 8, ">= 8"), type=int, default=None,
        help="input size fed to the networks (default: the dataset's native size; the authors used 224 for CIFAR-100)")
    add("--val-size", valid="non-negative", type=int, default=None,
        help="images held out from the training set to select the best checkpoint "
             "(default: 5000 for CIFAR, MNIST-likes and SVHN, 0 otherwise)")
    add("--split-seed", type=int, default=0, help="seed of the train/validation split (fixed across runs so runs compare)")
    add("--train-subset", type=int, default=None, valid="positive integer",
        help="train on N images of the training split, every class among them (quick experiments; validation and test "
             "sets stay whole): the first N of an in-memory set, whose order mixes the classes; from an image folder, "
             "ordered by class, each class its share, chosen with --split-seed; the start-up line gives the counts")
    add("--folder-split", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
        help="--dataset imagefolder of a plain tree of class folders (no train/ or test/): split it into training, "
             "validation and test by these fractions, within each class, with --split-seed (e.g. 0.8 0.1 0.1)")
    add("--crop", action=argparse.BooleanOptionalAction, default=True,
        help="train on random crops of the zero-padded image (4 px on CIFAR and SVHN, 2 on MNIST-likes, the usual "
             "CIFAR augmentation); --no-crop trains on whole images, as the authors did on CIFAR-100 (in-memory sets "
             "only: image folders always use RandomResizedCrop)")
    add("--rotate", valid=(lambda v: 0 <= v <= 180, "in [0, 180] (degrees)"), type=float, default=0.0, metavar="DEG",
        help="train: rotate each image by an angle uniform in [-DEG, DEG] at the input size, nearest sampling, "
             "black corners (torchvision's RandomRotation; the authors used 15); default 0: off")
    add("--num-classes", type=int, default=None, help="class count of the synthetic 'fake' dataset (other datasets set their own)")
    add("--loader", default="auto", choices=["auto", "gpu", "torch"],
        help="gpu: dataset held on the device with batched augmentation there (in-memory sets); torch: DataLoader with workers")
    add("--workers", valid="non-negative", type=int, default=None,
        help="DataLoader worker processes (torch loader; default: min(8, CPUs per process of this node) on CUDA, 2 on the CPU)")
    add("--skip-bad-images", action=argparse.BooleanOptionalAction, default=True,
        help="image folders: replace an unreadable image file (truncated, not an image) by the next image, with a "
             "warning naming it, as timm does; --no-skip-bad-images stops at the first with one line naming it")


def add_optimization_flags(flags, *, epochs, batch_size, optimizer, schedule, weight_decay, warmup_epochs, label_smoothing,
                           min_lr=0.0):
    """The recipe: epochs, batch, optimizer, learning-rate schedule, regularisation."""
    add = adder(flags)
    add("--epochs", valid="positive integer", type=int, default=epochs, help="training epochs")
    add("--batch-size", valid="positive integer", type=int, default=batch_size, help="training batch size (per process)")
    add("--eval-batch-size", valid="positive integer", type=int, default=None, help="evaluation batch size (default: 2 x batch size)")
    add("--optimizer", nargs="+", default=[optimizer], choices=["sgd", "adamw", "adam"],
        help="optimizer, one for all networks or one per network")
    add("--lr", valid="positive", nargs="+", type=float, default=None,
        help="learning rate, one or one per network (default: sgd 0.1 x batch/128, adam/adamw 1e-3)")
    add("--weight-decay", valid="non-negative", nargs="+", type=float, default=[weight_decay],
        help="weight decay, one or one per network (decoupled for AdamW)")
    add("--momentum", valid="below one", type=float, default=0.9, help="SGD momentum")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum for SGD")
    add("--schedule", default=schedule, choices=["cosine", "step", "constant"],
        help="learning-rate schedule, stepped every iteration")
    add("--warmup-epochs", valid="non-negative", type=float, default=warmup_epochs,
        help="linear warm-up length in epochs (1 for the CNN recipe: at lr 0.1 a network that distils "
             "from a peer in its first steps can otherwise diverge)")
    add("--milestones", valid="fraction", nargs="+", type=float, default=[0.5, 0.75], help="step schedule: decay points as fractions of training")
    add("--gamma", valid="positive", type=float, default=0.1, help="step schedule: decay factor at each milestone")
    add("--min-lr", valid="fraction", type=float, default=min_lr,
        help="cosine schedule: final learning rate as a fraction of the peak" +
             ("" if min_lr is not None else ", instead of --absolute-min-lr"))
    add("--clip-grad", valid="positive", type=float, default=None, metavar="NORM",
        help="clip each network's gradients before its optimizer step (timm's flag): their global L2 norm to at "
             "most NORM with --clip-mode norm, each element to [-NORM, NORM] with value; default off")
    add("--clip-mode", default="norm", choices=["norm", "value"],
        help="--clip-grad's rule: norm (torch.nn.utils.clip_grad_norm_; its norm before clipping is logged as "
             "train_grad_norm) or value (clip_grad_value_)")
    add("--label-smoothing", valid="below one", type=float, default=label_smoothing, help="label smoothing of the cross-entropy")
    add("--model-ema", valid="open fraction", type=float, default=None, metavar="DECAY",
        help="keep an exponential moving average of each network's weights and buffers with this decay, updated "
             "every step and evaluated beside the networks (ema_* rows; DeiT/CeiT: 0.99996); default off")
    add("--drop-path", valid="below one", type=float, default=0.1,
        help="stochastic depth of the transformers (ViT/CeiT), rising linearly to this rate in the last "
             "block (DeiT/CeiT: 0.1); CNNs have none")
    add("--decay-norm-and-bias", action=argparse.BooleanOptionalAction, default=None,
        help="weight decay on norms, biases and embeddings too (default: not for transformers, as in "
             "DeiT/CeiT; for CNNs, as in the CIFAR recipe)")


def add_run_flags(flags):
    """Seeds, run directory, resume and output."""
    add = adder(flags)
    add("--config", default=None, metavar="FILE",
        help="a run's args.json, whose values become this run's defaults (flags given here override them, and "
             "values it computed from a changed flag, such as the default lr, are computed anew; its out_dir, "
             "resume, overwrite and stop_after are not taken): repeat a run, or change one flag")
    add("--config-any-script", action="store_true",
        help="take --config from a run of another script (refused without: its recipe is that script's)")
    add("--seed", valid=(lambda v: 0 <= v < 2**63, "in 0..2**63-1"), type=int, default=0, help="seed of weights, data order, augmentation and perturbation")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=False,
        help="deterministic kernels (slower); exact resume")
    add("--out-dir", default=None, help="run directory (default: runs/<script>-<dataset>-<models>-<time>)")
    add("--resume", default=None, help="checkpoint to continue from, or 'auto' for <out-dir>/last.pt when it exists")
    add("--overwrite", action="store_true",
        help="start afresh in a --out-dir that holds an earlier run, deleting that run's files (without it such a directory is refused)")
    add("--stop-after", valid="positive integer", type=int, default=None,
        help="stop this invocation after N epochs (for time-limited jobs); continue with --resume")
    add("--eval-every", valid="positive integer", type=int, default=1,
        help="evaluate (validation and test sets) every N epochs and always after the last one; "
             "best.pt is chosen among the evaluated epochs")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="tqdm progress bars (default: when stdout is a terminal)")
    add("--log-interval", valid=(lambda v: v >= 0, ">= 0 (0 = off)"), type=int, default=None, metavar="N",
        help="print a line every N training steps: loss, lr, images/s, time left in the epoch and the run "
             "(default: 50 when stdout is not a terminal, as in a batch job; 0 = off)")
    add("--log-every", valid=(lambda v: v >= 0, ">= 0 (0 = off)"), type=int, default=50, metavar="N",
        help="TensorBoard (and wandb) scalars every N training steps, in the run directory's steps/: each "
             "statistic's mean over the N steps (this process's batches) and each network's learning rate at the "
             "step; one read of the device per N steps; 0 = off")
    add("--log-wandb", action=argparse.BooleanOptionalAction, default=False,
        help="also log to Weights & Biases (pip install wandb; rank 0 only; the run's arguments as its config, the "
             "epoch rows, the --log-every scalars and the final accuracies; WANDB_MODE=offline keeps it on disk "
             "under the run directory's wandb/ for `wandb sync`)")
    add("--wandb-project", default="competitive-distillation", help="the Weights & Biases project of --log-wandb")
    add("--eval-subset", type=int, default=None, valid="positive integer", metavar="N",
        help="evaluate on N images of the validation and of the test split only, every class among them (chosen as "
             "--train-subset chooses), for quick runs; every accuracy reported is then marked as a subset's "
             "(default: the whole splits)")


def add_speed_flags(flags):
    """Device, precision, memory format, compilation and CUDA graphs."""
    add = adder(flags)
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
    add = adder(flags)
    add("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
        help="normalise BatchNorm with statistics of the global batch (SyncBatchNorm, GPUs only); "
             "off: each process uses its own batch's statistics, running statistics follow rank 0 (DDP's default)")
    add("--dist-timeout", valid=(lambda v: v > 0, "positive (seconds)"), type=float, default=300, metavar="SECONDS",
        help="how long a process waits for the others in a collective before the run ends in one line "
             "(a stopped, hung or lost process; torch's default is 30 minutes)")
    add("--lr-scaling", default="linear", choices=["linear", "none"],
        help="with K processes, linear multiplies the peak lr (--lr, or its default computed from the "
             "per-process batch) by K, so K processes x batch B follow the recipe of one process with batch K*B "
             "(Goyal et al. 2017; DeiT); none uses the rate as given")


class Group(NamedTuple):
    """The run's networks as the command line names them, checked: canonical model names, the --init
    file of each initialised network {index: (path, pick)} (pick: the @K/@LABEL suffix or None),
    and the --freeze indices."""
    names: list
    init: dict = {}
    frozen: frozenset = frozenset()
    reset_classifier: bool = False
    pretrained: frozenset = frozenset()


def check_args(args):
    """Reject what the flags name together that cannot work, with one line saying what is accepted;
    returns the run's Group (--model or --models, --init and --freeze parsed here, once, before any data
    loads). Each number's own range was checked when it was parsed (ArgumentParser.check_numbers)."""
    if args.resume == "auto" and args.out_dir is None:
        raise UsageError("--resume auto needs --out-dir (the run directory to continue)")
    if getattr(args, "log_wandb", False) and importlib.util.find_spec("wandb") is None:
        raise UsageError("--log-wandb needs the wandb package, which is not installed: pip install wandb")
    names = model_names(args)
    init = init_files(args, len(names))
    return Group(names, init, frozen_nets(args, len(names)), args.reset_classifier, pretrained_nets(args, names, init))


def branched_group(args, method, minimum=2):
    """The run's Group with --model replaced by the branched network METHOD:BASE:M of --branches M (at
    least `minimum`, the method's), models/branched.py."""
    group = check_args(args)
    if args.branches < minimum:
        raise UsageError(f"--branches must be >= {minimum} for {method}, got {args.branches}")
    base = group.names[0]
    if base not in models.BRANCHABLE:
        raise UsageError(f"--model {args.model}: {base} cannot branch; choose from: {', '.join(models.BRANCHABLE)}")
    return group._replace(names=[f"{method}:{base}:{args.branches}"])


def model_names(args):
    """Canonical names of the run's networks, from --model or a group's --models/--model1/... flags."""
    if hasattr(args, "model"):
        given = [args.model]
    else:
        pair = [getattr(args, k) for k in ("model1", "model2", "teacher", "student") if getattr(args, k, None)]
        if args.models and pair:
            raise UsageError("name the group either with --models or with --model1/--model2 (--teacher/--student), not both")
        given = args.models or pair or ["resnet32", "resnet32"]
        if len(given) < 2:
            raise UsageError(f"a group needs at least 2 networks, got {len(given)}: {' '.join(given)}")
    try:
        names = [models.resolve_name(name) for name in given]
    except ValueError as error:
        raise UsageError(str(error)) from None
    for name in names:
        if models.is_branched_name(name) or models.is_exit_name(name):
            method = name.split(":", 1)[0]
            raise UsageError(f"{name} is one network trained as several by train_{method}.py (--model "
                             f"{name.split(':')[1]}); here only its deployed part would train")
    return names


def init_files(args, n):
    """--init as {network index: (file, pick)}, pick being the @K/@LABEL suffix or None; UsageError
    for a network that is not in the group or named twice (the files are read by utils.build_nets)."""
    files = {}
    for spec in args.init:
        net, equals, path = spec.partition("=")
        if not equals:
            net, path = ("0" if n == 1 else None), spec
        if net is None or not re.fullmatch(r"[0-9]+", net) or int(net) >= n:
            raise UsageError(f"--init '{spec}': give NET=FILE with NET a network index of the group, 0..{n - 1}"
                             + (" (with one network FILE alone is enough)" if n == 1 else ""))
        # FILE@K or FILE@LABEL picks a network of a checkpoint; a file whose own name has an @ is taken whole
        if "@" in os.path.basename(path) and not os.path.isfile(path):
            path, _, pick = path.rpartition("@")
        else:
            pick = None
        if int(net) in files:
            raise UsageError(f"--init names network {net} twice; give one file per network")
        files[int(net)] = (path, pick)
    if args.reset_classifier and not files and getattr(args, "pretrained", None) is None:
        raise UsageError("--reset-classifier applies to networks initialised with --init or --pretrained; give --init NET=FILE")
    return files


def pretrained_nets(args, names, init):
    """--pretrained as a set of network indices (every tv:/timm: network when it names none); UsageError for
    an index outside the group, a network of this repository's own (no weight registry), one also given --init."""
    given = getattr(args, "pretrained", None)
    if given is None:
        return frozenset()
    zoo = [i for i, name in enumerate(names) if models.is_zoo_name(name)]
    if not zoo:
        raise UsageError(f"--pretrained loads the weights of tv: and timm: networks; this run has none ({', '.join(names)}): "
                         f"name one (e.g. tv:resnet18) or start from a file with --init")
    chosen = frozenset(given) if given else frozenset(zoo)
    for i in sorted(chosen):
        if not 0 <= i < len(names):
            raise UsageError(f"--pretrained {i}: no such network; the group's are 0..{len(names) - 1}")
        if i not in zoo:
            raise UsageError(f"--pretrained {i}: network {i} ({names[i]}) is not a tv: or timm: network, which are "
                             f"the ones with pretrained weights ({', '.join(str(j) for j in zoo)} here)")
        if i in init:
            raise UsageError(f"network {i} is given both --init and --pretrained; give it one")
    return chosen


def frozen_nets(args, n):
    """--freeze as a set of network indices; UsageError for one outside the group or a group with no network left to train."""
    frozen = frozenset(getattr(args, "freeze", []))
    bad = [i for i in frozen if not 0 <= i < n]
    if bad:
        raise UsageError(f"--freeze {bad[0]}: networks are numbered 0..{n - 1} in the group's order")
    if len(frozen) == n:
        raise UsageError(f"--freeze names all {n} networks: at least one must train")
    return frozen
