"""--config FILE: a run's args.json as the defaults of a new run, checked against the script's flags,
with what the old run computed from a flag the command line changes computed anew."""
import argparse
import json

from errors import UsageError


def given_flags(args):
    """The flags (their dests) given on the command line, or None when the namespace was not made by
    flags.ArgumentParser (then every flag that is not None counts as given)."""
    return getattr(args, "_given", None)


def parse_args(parser, argv=None):
    """parser.parse_args(argv) with the values of --config FILE (a run's args.json) as defaults, so
    that the flags given on the command line override them; a recorded value that was computed from
    a flag the command line changes is computed anew (CONFIG_DERIVED)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is not None and any(action.dest == "config" for action in parser._actions):
        given = given_flags(parser.parse_args(argv)) or frozenset()
        config = read_config(path, parser, any_script=getattr(parser.parse_args(argv), "config_any_script", False))
        parser.set_defaults(**{key: value for key, value in config.items()
                               if not any(flag in given for flag in CONFIG_DERIVED.get(key, ()))})
    return parser.parse_args(argv)


# args.json entries that belong to the run that wrote them, not to a run repeating it: its directory
# (a repeat must not write over it), how it was resumed or stopped, and values recorded for the log.
CONFIG_SKIPPED = ("config", "config_any_script", "out_dir", "resume", "overwrite", "stop_after", "world_size",
                  "script", "resumes", "code")

# Values a run computes from other flags and records (args.json holds the rate the run used): a repeat
# that changes one of those flags computes them again instead of taking the old run's.
CONFIG_DERIVED = {"lr": ("optimizer", "batch_size"), "eval_batch_size": ("batch_size",),
                  "img_size": ("dataset",), "val_size": ("dataset",), "num_classes": ("dataset",),
                  "rampup_epochs": ("epochs",)}


def read_config(path, parser, any_script=False):
    """The flag values of --config FILE, checked against the parser's flags; UsageError in one line.
    A run of another script is refused unless any_script: its recipe is not this script's."""
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
    return defaults


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
