"""A study's run directories (experiments/compare.py), STUDY/<config>/seed<k>/{args.json,results.json,
metrics.csv}, read back and checked for experiments/summarize.py.

Every finished run becomes one dict (load_run); runs that have not finished and truncated metrics.csv
files are named in one line each; stray directories and runs of different data or budget (BUDGET) are
refused with a one-line StudyError.
"""
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import CONFIGS, base_config  # noqa: E402
from metrics import read_metrics  # noqa: E402

# args.json fields that must agree across a study's runs (the same data, budget and recipe)
BUDGET = ("dataset", "train_subset", "val_size", "split_seed", "img_size", "crop", "rotate", "epochs", "batch_size",
          "optimizer", "lr", "weight_decay", "momentum", "nesterov", "schedule", "warmup_epochs", "milestones", "gamma",
          "min_lr", "label_smoothing", "amp", "clip_grad", "clip_mode", "eval_subset")

SEED_DIR = re.compile(r"seed(0|-?[1-9][0-9]*)")  # as compare.py names them: f"seed{seed}"

# A run diverged when, after its first DIVERGENCE_GRACE epochs, some member's epoch-mean training
# cross-entropy (metrics.csv's train_ce, or train_loss where a script logs no separate CE: train.py,
# train_ceit.py) rises above ln(number of classes), which a network guessing uniformly would score: it
# then predicts worse than chance on the batches it trains on. The early epochs are spared, where every
# network starts there; epoch means are what every committed study logged (a per-step maximum would
# be more sensitive, but the first study never recorded one).
DIVERGENCE_GRACE = 5


class StudyError(Exception):
    """A study that cannot be summarized; main prints it as one line."""


def read_json(path):
    """The JSON object in `path`, or a one-line StudyError naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise StudyError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise StudyError(f"{path}: not a JSON object but {type(value).__name__} {json.dumps(value)[:40]}")
    return value


def config_order(name):
    """Sort key: compare.CONFIGS order (a --grid variant after the configuration it varies, by name), then
    other configurations by name."""
    base = base_config(name)
    return (list(CONFIGS).index(base), name) if base in CONFIGS else (len(CONFIGS), name)


def run_dirs(study):
    """(config, seed, run directory) of every seed<k> directory under a configuration directory of
    `study` (its logs directory, files and hidden entries aside), in configuration and seed order.
    Any other directory under a configuration (seed1_old) is refused rather than skipped."""
    if not os.path.isdir(study):
        raise StudyError(f"'{study}' is not a directory")
    found = []
    for config in os.listdir(study):
        config_dir = os.path.join(study, config)
        if config == "logs" or config.startswith(".") or not os.path.isdir(config_dir):
            continue
        for name in os.listdir(config_dir):
            run_dir = os.path.join(config_dir, name)
            if name.startswith(".") or not os.path.isdir(run_dir):
                continue
            match = SEED_DIR.fullmatch(name)
            if match is None:
                raise StudyError(f"{run_dir}: not a run directory (seed<k>, k the seed); move it out of the study")
            found.append((config, int(match.group(1)), run_dir))
    return sorted(found, key=lambda found: (config_order(found[0]), found[1]))


def grid_points(path):
    """The studies of a compare.py --grid directory (one per combination of the swept flags: directories
    whose configuration directories hold seed<k> directories), in name order; None for a plain study."""
    if not os.path.isdir(path):
        return None
    children = [os.path.join(path, name) for name in sorted(os.listdir(path))
                if name != "logs" and not name.startswith(".") and os.path.isdir(os.path.join(path, name))]

    def holds_seeds(directory):
        return any(SEED_DIR.fullmatch(name) for name in os.listdir(directory))

    def holds_configs(directory):
        return any(os.path.isdir(os.path.join(directory, name)) and holds_seeds(os.path.join(directory, name))
                   for name in os.listdir(directory))

    if children and all(not holds_seeds(child) and holds_configs(child) for child in children):
        return children
    return None


def load_study(study):
    """Every run under `study`: {"runs": finished runs (load_run), "incomplete": the others (one
    description each), "warnings": lines about the finished ones}; refuses mixed budgets."""
    runs, incomplete, warnings = [], [], []
    for config, seed, run_dir in run_dirs(study):
        if not os.path.exists(os.path.join(run_dir, "results.json")):
            present = [name for name in ("args.json", "metrics.csv", "last.pt", "best.pt") if os.path.exists(
                os.path.join(run_dir, name))]
            if "args.json" in present:
                check_seed(run_dir, seed, read_json(os.path.join(run_dir, "args.json")))
            incomplete.append(f"{config}/seed{seed} ({', '.join(present) or 'empty'}; no results.json)")
            continue
        run = load_run(config, seed, run_dir, warnings)
        if isinstance(run["args"].get("epochs"), int) and run["epochs"] < run["args"]["epochs"]:  # --stop-after
            incomplete.append(f"{config}/seed{seed} (results.json of epoch {run['epochs']} of {run['args']['epochs']})")
            continue
        runs.append(run)
    if not runs:
        raise StudyError(f"no finished run (<config>/seed<k>/results.json) under '{study}'" +
                         (f"; incomplete: {', '.join(incomplete)}" if incomplete else ""))
    check_same_budget(runs)
    for config in {run["config"] for run in runs}:
        group = [run for run in runs if run["config"] == config]
        if any((run["script"], run["models"]) != (group[0]["script"], group[0]["models"]) for run in group):
            raise StudyError(f"configuration '{config}' holds runs of different scripts or networks")
    return {"path": study, "runs": runs, "incomplete": incomplete, "warnings": warnings}


def load_run(config, seed, run_dir, warnings):
    """A finished run: config, seed, script, epochs, args, labels and models (its members, in
    results.json order), test ({label: last-epoch test accuracy}, "ensemble" included when it has
    one), train ({label: last-epoch training accuracy or None}), leader (top_leader_share) and seconds
    (the training time: its epochs' epoch_time_s summed; None unless every epoch has one)."""
    results_path = os.path.join(run_dir, "results.json")
    results, args = read_json(results_path), effective_args(read_json(os.path.join(run_dir, "args.json")))
    networks = results.get("networks")
    if not isinstance(networks, list) or not networks:
        raise StudyError(f"{results_path}: no 'networks' list")
    for i, network in enumerate(networks):
        if not (isinstance(network, dict) and isinstance(network.get("net"), str) and isinstance(network.get("model"), str)
                and isinstance(network.get("final_test_acc"), (int, float))):
            raise StudyError(f"{results_path}: networks[{i}] lacks a net, a model or a numeric final_test_acc")
        if not math.isfinite(network["final_test_acc"]):
            raise StudyError(f"{results_path}: {network['net']}'s final_test_acc is {network['final_test_acc']}, not a "
                             f"number: the run is broken; train it again")
    written = results.get("run_dir")
    if isinstance(written, str) and not os.path.normpath(written).endswith(os.path.join(config, f"seed{seed}")):
        raise StudyError(f"{results_path}: written by the run in '{written}', not by {config}/seed{seed} (a copied run "
                         f"would count twice); move it where it was trained, or remove it")
    if any(network["net"] == "ensemble" for network in networks[:-1]) or networks[0]["net"] == "ensemble":
        raise StudyError(f"{results_path}: the ensemble must be the last of several networks")
    check_seed(run_dir, seed, args)
    epochs = results.get("epochs", args.get("epochs"))
    if not isinstance(epochs, int):
        raise StudyError(f"{results_path}: no integer epochs (neither there nor in args.json)")
    members = [network for network in networks if network["net"] != "ensemble"]
    labels = [network["net"] for network in members]
    train, leader, seconds, diverged = last_epoch_train(run_dir, f"{config}/seed{seed}", labels, epochs,
                                                        args.get("num_classes") or 10, warnings)
    return {"config": config, "seed": seed, "script": results.get("script", "train" if len(members) == 1 else "?"),
            "epochs": epochs, "args": args, "labels": labels, "models": [network["model"] for network in members],
            "test": {network["net"]: network["final_test_acc"] for network in networks}, "train": train,
            "val": {network["net"]: network.get("final_val_acc") for network in networks},
            "leader": leader, "seconds": seconds, "diverged": diverged}


def effective_args(args):
    """A run's args.json as the values it trained with: its flags, with what it computed from them
    ("resolved": the default learning rate, the data set's image size, ...) in place of the flags it left
    to compute (args.json of earlier runs wrote those values over the flags)."""
    resolved = args.get("resolved")
    return {**args, **resolved} if isinstance(resolved, dict) else args


def check_seed(run_dir, seed, args):
    """A one-line StudyError when args.json's seed is not the one the directory's name says."""
    if args.get("seed") != seed or isinstance(args.get("seed"), bool):
        raise StudyError(f"{os.path.join(run_dir, 'args.json')}: seed {args.get('seed')!r}, but the directory is "
                         f"seed{seed}; a run belongs in the directory of its seed")


def last_epoch_train(run_dir, name, labels, epochs, classes, warnings):
    """({label: training accuracy in epoch `epochs`, or None}, top_leader_share, training seconds, divergence's list)
    from metrics.csv; a missing file, or one that stops before `epochs` (truncated), gives none, with a warning."""
    try:
        series = read_metrics(run_dir)
    except ValueError as error:
        raise StudyError(str(error)) from None
    if series is None:
        warnings.append(f"warning: {name}: no metrics.csv, so no training accuracy")
        series = {}
    else:
        last = max((epoch for columns in series.values() for values in columns.values() for epoch, _ in values), default=0)
        if last < epochs:
            warnings.append(f"warning: {name}: metrics.csv stops at epoch {last} of {epochs} (truncated), "
                            "so no training accuracy or leader share")
            series = {}
    train = {label: dict(series.get(label, {}).get("train_acc", [])).get(epochs) for label in labels}
    times = {epoch: value for epoch, value in series.get(labels[0], {}).get("epoch_time_s", []) if epoch <= epochs}
    return (train, top_leader_share(series, labels, epochs), sum(times.values()) if len(times) == epochs else None,
            divergence(series, labels, epochs, classes))


def divergence(series, labels, epochs, classes):
    """The members whose training cross-entropy rose above ln(classes) after DIVERGENCE_GRACE epochs (the
    run diverged), each at its worst: [{"net": label, "epoch": k, "ce": value}, ...], the worst first;
    empty when none did (or nothing was logged)."""
    found = []
    for label in labels:
        columns = series.get(label, {})
        above = [(ce, epoch) for epoch, ce in columns.get("train_ce", columns.get("train_loss", []))
                 if DIVERGENCE_GRACE < epoch <= epochs and ce > math.log(classes)]
        if above:
            ce, epoch = max(above)
            found.append({"net": label, "epoch": epoch, "ce": ce})
    return sorted(found, key=lambda entry: -entry["ce"])


def top_leader_share(series, labels, epochs):
    """A competitive run's most frequent leader: the largest mean over epochs of a network's share of
    the steps it led (train_leader_share); None for a run that logs no leader."""
    shares = [[value for epoch, value in series.get(label, {}).get("train_leader_share", []) if epoch <= epochs]
              for label in labels]
    return max(sum(s) / len(s) for s in shares) if shares and all(shares) else None


def check_same_budget(runs):
    """A one-line StudyError naming the first BUDGET field two runs differ in."""
    first = runs[0]
    for run in runs[1:]:
        for key in BUDGET:
            if run["args"].get(key) != first["args"].get(key):
                raise StudyError(f"runs differ in --{key.replace('_', '-')}: {first['config']}/seed{first['seed']} has "
                                 f"{first['args'].get(key)!r}, {run['config']}/seed{run['seed']} has {run['args'].get(key)!r}; "
                                 "a study compares runs of one dataset and budget")
