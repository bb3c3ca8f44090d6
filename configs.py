"""A run's arguments as recorded and replayed: what args.json and the checkpoints hold (recorded), and
parsing a command line over a recorded run: --config FILE (an args.json whose flags become this run's
defaults) and --resume (the resumed run's flags are this run's; a flag that would change what it trains
is refused in one line).

A run records its flags as parsed (vars(args): a flag the command line left out holds its default, None
for a value the run computes, such as the default learning rate); what it computed from them is
recorded apart (args.json's "resolved"), so a repeat or a resume computes it again from the flags.
"""
import argparse
import json
import os
import subprocess

import torch

from checkpoints import load_checkpoint, resolve_resume, save_json
from errors import UsageError


def recorded(args):
    """The run's flags as args.json and the checkpoints record them: vars(args) without the parser's
    private entries (configs.given_flags, script_of)."""
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


def given_flags(args):
    """The flags (their dests) given on the command line, or None when the namespace was not made by
    flags.ArgumentParser (then every flag that is not None counts as given)."""
    return getattr(args, "_given", None)


def script_of(args):
    """The name of the script whose parser made `args` (None for a namespace made otherwise)."""
    return getattr(args, "_script", None)


# args.json entries that belong to the run that wrote them, not to a run repeating it: its directory
# (a repeat must not write over it), how it was resumed or stopped, and what it recorded for the log.
CONFIG_SKIPPED = ("config", "config_any_script", "out_dir", "resume", "overwrite", "stop_after", "world_size",
                  "script", "resumes", "code", "given", "resolved")

# What a resume may change: how long and where the run goes on, how it logs, which device computes it
# and how fast; never what it trains on or how (the data, batches, networks, recipe, method). Every other
# flag given with --resume must equal the run's recorded value; the flags not given take it.
RESUME_MAY_CHANGE = ("epochs", "stop_after", "eval_every", "eval_batch_size", "progress", "log_interval", "log_every",
                     "log_wandb", "wandb_project", "workers", "device", "compile", "cuda_graphs", "data_dir", "download",
                     "out_dir", "resume", "overwrite", "config")
# ... of which these belong to one invocation: a resume that does not give them has none.
PER_INVOCATION = ("stop_after", "resume", "overwrite", "config", "world_size", "out_dir")

# Runs recorded before args.json kept its computed values apart wrote them over their flags: for such a
# file (no "resolved" entry) a repeat that changes one of these flags computes the value anew instead of
# taking the old run's. Fixed: later runs record computed values apart, and they are never replayed.
LEGACY_COMPUTED = {"lr": ("optimizer", "batch_size"), "eval_batch_size": ("batch_size",),
                   "img_size": ("dataset",), "val_size": ("dataset",), "num_classes": ("dataset",),
                   "rampup_epochs": ("epochs",)}


def parse_args(parser, argv=None):
    """parser.parse_args(argv): a flags.ArgumentParser replays the recorded run itself (replayed)."""
    return parser.parse_args(argv)


def replayed(parser, args):
    """(defaults, changes) of a command line parsed as `args` over a recorded run: with --config FILE its
    flags are defaults that the command line overrides; with --resume the resumed run's recorded flags are
    this run's, a given flag that changes one of them refused (unless RESUME_MAY_CHANGE lists it), the
    allowed changes returned as {flag: [old, new]} for args.json. Values the run computes are never
    replayed: it computes them again."""
    has = {action.dest for action in parser._actions}
    defaults, changes = {}, {}
    if "config" in has and args.config is not None:
        defaults.update(config_defaults(args, parser))
    if "resume" in has and args.resume is not None:
        recorded_flags, changes = resume_defaults(args, parser)
        defaults.update(recorded_flags)
    return defaults, changes


def config_defaults(args, parser):
    """The flags of --config FILE, as defaults (in a file of the older kind, a value it computed from a
    flag this command line gives is left out: it is computed anew)."""
    config, legacy = read_config(args.config, parser, any_script=getattr(args, "config_any_script", False))
    given = given_flags(args) or frozenset()
    return {key: value for key, value in config.items()
            if not (legacy and any(flag in given for flag in LEGACY_COMPUTED.get(key, ())))}


def resume_defaults(args, parser):
    """({flag: the resumed run's value}, {flag: [old, new]} of the allowed changes) for --resume; UsageError
    for a checkpoint that cannot be resumed, or a given flag that would change what the run trains."""
    path = resolve_resume(args)
    if path is None:
        return {}, {}
    ckpt = load_checkpoint(path, mmap=True)
    if not ckpt["optimizers"] and ckpt["nets"]:
        raise UsageError(f"--resume '{path}' is a best.pt: each network at its best validation epoch, without optimizer "
                         f"state, a selection rather than a training state; resume from "
                         f"'{os.path.join(os.path.dirname(path), 'last.pt')}'")
    given, flags, changes = given_flags(args), {}, {}
    recorded_flags = {**parser.older_runs, **ckpt["args"]}
    respelled = spelled_group(recorded_flags, args, given)  # the group named by another of its spellings
    # a flag newer than the run: the run went without it, with the value the script gives that (older_runs)
    for key, old in recorded_flags.items():
        if key in PER_INVOCATION or not hasattr(args, key) or (respelled and key in GROUP_SPELLINGS):
            continue
        new = getattr(args, key)
        explicit = key in given if given is not None else new is not None
        if not explicit or same_value(key, new, old):
            flags[key] = old
        elif key in RESUME_MAY_CHANGE:
            changes[key] = [old, new]
        else:
            flag, computed = option(parser, key), ckpt.get("resolved", {}).get(key)
            written = (f"with {flag} {old}" if old is not None else
                       f"without {flag}" + (f" (it computed {computed})" if computed is not None else ""))
            raise UsageError(f"--resume '{path}' was written {written}; this run has {new} "
                             f"(a resume continues its run: it may change how long and where it runs, not what it "
                             f"trains, docs/usage.md; start a new run with --config to change it)")
    return flags, changes


# The spellings of a group's networks: --models A B, or the pair --model1 A --model2 B (--teacher A --student B).
GROUP_SPELLINGS = ("models", "model1", "model2", "teacher", "student")


def group_of(values):
    """The networks a group's spellings name (None when none is given)."""
    pair = [values.get(key) for key in ("model1", "model2", "teacher", "student") if values.get(key)]
    return values.get("models") or pair or None


def spelled_group(recorded_flags, args, given):
    """True when this command line names the resumed run's group by another spelling (--model1/--model2 for
    --models, ...): the spelling then stands, and the recorded one is not taken. UsageError when it names
    other networks."""
    if not any(key in (given or ()) for key in GROUP_SPELLINGS):
        return False
    old, new = group_of(recorded_flags), group_of(vars(args))
    if old is not None and new is not None and list(old) != list(new):
        raise UsageError(f"--resume was written with the networks {' '.join(old)}; this run names {' '.join(new)} "
                         f"(a resume continues its run's networks)")
    return True


def option(parser, dest):
    """The command-line name of the flag whose value is args.<dest> (--teacher for kdcl_teacher)."""
    action = next((a for a in parser._actions if a.dest == dest and a.option_strings), None)
    return action.option_strings[0] if action else f"--{dest.replace('_', '-')}"


def same_value(key, new, old):
    """Whether a flag's value equals its recorded one (--freeze as a set of networks)."""
    if key == "freeze":
        return set(new) == set(old)
    return new == old


def read_config(path, parser, any_script=False):
    """(the flag values of --config FILE, checked against the parser's flags; whether the file is of the
    older kind, whose computed values stand among its flags); UsageError in one line. A run of another
    script is refused unless any_script: its recipe is not this script's."""
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as error:
        raise UsageError(f"--config '{path}': {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:
        raise UsageError(f"--config '{path}' is not a JSON file of flag values ({str(error)[:80] or 'nested too deeply'})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config '{path}' must hold a JSON object of flag values, as a run's args.json does")
    script = getattr(parser, "script", None)
    if script and config.get("script", script) != script and not any_script:
        raise UsageError(f"--config '{path}' is a run of the {config['script']} script, whose recipe is not {script}'s; "
                         f"--config-any-script takes it anyway")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    if config.get("script", script) == script:  # a run older than some of this script's flags went without them
        config = {**getattr(parser, "older_runs", {}), **config}
    defaults = {}
    for key, value in config.items():
        if key in CONFIG_SKIPPED:
            continue
        if key not in actions and any_script:
            continue  # a flag of the other script only
        if key not in actions:
            raise UsageError(f"--config '{path}': '{key}' is not a flag of {parser.prog} (an args.json of another script?)")
        if not config_value_ok(actions[key], value):
            raise UsageError(f"--config '{path}': {key} = {json.dumps(value)} is not a value of {actions[key].option_strings[0]}")
        defaults[key] = [float(v) for v in value] if actions[key].type is float and isinstance(value, list) else \
            float(value) if actions[key].type is float and value is not None else value
    return defaults, "resolved" not in config


def config_value_ok(action, value):
    """True when a JSON value is one that the flag could have given (type, list or not, choices)."""
    if value is None:
        return action.default is None
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or (not value and action.default != []):  # nargs "+": at least one, or its default
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


# ----------------------------------------------------------------------------------------------
# What a run records: args.json and every checkpoint's arguments
# ----------------------------------------------------------------------------------------------
def record(args, resolved):
    """The run's arguments as its checkpoints hold them: {"args": its flags (recorded), "given": the flags
    its command line gave, "resolved": what it computed from them (engine.resolve)}."""
    return {"args": recorded(args), "given": sorted(given_flags(args) or ()), "resolved": dict(resolved)}


def save_args(args, resolved, run_dir, script, resumed=None):
    """args.json: the run's flags (recorded), which of them its command line gave, what it computed from
    them (resolved), its script (so that --config knows whose recipe it holds) and the code that ran it
    (code_version); a resumed run keeps the code it started with and the history of its resumes
    ("resumes": when, from which checkpoint, what changed, which code continued it), read from the
    run directory's args.json, or from the checkpoint's directory when it continues in a new one."""
    record_ = record(args, resolved)
    entry = {**record_["args"], "script": script, "given": record_["given"], "resolved": record_["resolved"],
             "code": code_version()}
    path = os.path.join(run_dir, "args.json")
    if resumed is not None:
        # A run continued in another directory (--resume PATH --out-dir NEW) keeps its source's record.
        source = path if os.path.exists(path) else os.path.join(os.path.dirname(resumed["checkpoint"]), "args.json")
        try:
            with open(source) as f:
                earlier = json.load(f)
            history, started = earlier.get("resumes", []), earlier.get("code")
        except (OSError, ValueError, AttributeError):
            history, started = [], None
        changes = getattr(args, "_resume_changes", {})
        entry["resumes"] = [*history, {**resumed, "changed": changes, "code": entry["code"]}]
        entry["code"] = started  # None: the run began before args.json recorded its code
    save_json(entry, path)


def code_version():
    """What computed the run, so that a claim that two runs used the same code can be checked: the git
    commit of this repository (None outside a git checkout), whether tracked files differed from it,
    the torch version and the number of threads torch computes with on the CPU."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"commit": commit, "modified": dirty, "torch": torch.__version__, "threads": torch.get_num_threads()}
