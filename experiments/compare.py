"""Run competitive distillation, its controls and the other online-distillation methods side by side, for several seeds.

Every configuration of CONFIGS below trains with the same data, budget and recipe (the flags after
`--`, passed to every run), once per seed, into OUT/<config>/seed<k>; logs go to OUT/logs. A run that
finished (results.json) is skipped and any other one continues (--resume auto), so the command can
be repeated, on any machine, until everything is done. Then `python experiments/summarize.py OUT`
makes the table and the figure.

    python experiments/compare.py --out runs/study --seeds 0 1 2 --jobs 2 --configs vanilla dml cd -- \\
        --dataset fashion-mnist --train-subset 512 --epochs 120 --eval-every 120

--grid sweeps flags. `--grid lr=0.05,0.1 clip-grad=none,2` trains every configuration at each
combination (none: the flag left out), each combination a study of its own, OUT/lr=0.05_clip-grad=none/
<config>/seed<k>; `--grid kdcl-naive,cd:temperature=1,4` varies a flag of some configurations only, which
become configurations of their own, OUT/kdcl-naive+temperature=1/seed<k>.

Edit CONFIGS to compare other groups; NET and OTHER stand for --net and --other-net.
"""
import argparse
import itertools
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (script, its own flags); NET and OTHER stand for --net and --other-net. With the scripts'
# defaults a competitive pair perturbs one of its two networks every 10 steps, so each network sees
# one perturbed step in 20: the rate of the single-network and independent controls.
CONFIGS = {
    # controls: one network, n networks that do not distil (same batches; ensembles of as many networks)
    "vanilla": ("train.py", ["--model", "NET"]),
    "vanilla-perturb": ("train.py", ["--model", "NET", "--perturb-every", "20"]),
    "vanilla-other": ("train.py", ["--model", "OTHER"]),
    "independent": ("train_mutual_learning.py", ["--models", "NET", "NET", "--kd-weight", "0"]),
    "independent-perturb": ("train_mutual_learning.py", ["--models", "NET", "NET", "--kd-weight", "0",
                                                         "--perturb-every", "10"]),
    "independent-3": ("train_mutual_learning.py", ["--models", "NET", "NET", "NET", "--kd-weight", "0"]),
    "independent-hetero": ("train_mutual_learning.py", ["--models", "NET", "OTHER", "--kd-weight", "0"]),
    # deep mutual learning, without and with the competitive perturbation
    "dml": ("train_mutual_learning.py", ["--models", "NET", "NET"]),
    "dml-perturb": ("train_mutual_learning.py", ["--models", "NET", "NET", "--perturb-every", "10"]),
    # competitive distillation
    "cd": ("train_competitive_distillation.py", ["--models", "NET", "NET"]),
    "cd-no-perturb": ("train_competitive_distillation.py", ["--models", "NET", "NET", "--perturb-every", "0"]),
    "cd-3": ("train_competitive_distillation.py", ["--models", "NET", "NET", "NET"]),
    "cd-hetero": ("train_competitive_distillation.py", ["--models", "NET", "OTHER"]),
    # the other online-distillation methods, each with its own published constants
    "kdcl-naive": ("train_kdcl.py", ["--models", "NET", "NET", "--teacher", "naive"]),
    "kdcl-minlogit": ("train_kdcl.py", ["--models", "NET", "NET", "--teacher", "minlogit"]),
    "one": ("train_one.py", ["--model", "NET"]),
    "okddip": ("train_okddip.py", ["--model", "NET"]),
    "pcl": ("train_pcl.py", ["--model", "NET"]),
    "byot": ("train_byot.py", ["--model", "NET"]),   # self-distillation: one network and its early exits
}

# The ensemble each group's ensemble is compared with: independently trained networks, as many, of
# the same architectures, on the same batches (ONE's gated ensemble, OKDDip's and PCL's peer ensembles have 3;
# BYOT's ensemble of one network's exits has no such baseline).
ENSEMBLE_BASELINE = {"independent-perturb": "independent", "dml": "independent", "dml-perturb": "independent",
                     "cd": "independent", "cd-no-perturb": "independent", "cd-3": "independent-3",
                     "cd-hetero": "independent-hetero", "kdcl-naive": "independent", "kdcl-minlogit": "independent",
                     "one": "independent-3", "okddip": "independent-3", "pcl": "independent-3"}


def base_config(name):
    """The configuration of CONFIGS that a --grid variant (kdcl-naive+temperature=1) varies."""
    return name.split("+", 1)[0]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line on stderr and exit code 2, like every script's."""

    def error(self, message):
        usage_error(f"compare.py: {message} (see --help)")


def usage_error(message):
    """`error: message` on one line on stderr, exit code 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="study directory: OUT/<config>/seed<k> per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"configurations to run, from: {', '.join(CONFIGS)}")
    parser.add_argument("--net", default="resnet20", help="the network of every group (NET in CONFIGS)")
    parser.add_argument("--other-net", default="mobilenet_v1", help="the second family of the heterogeneous pair (OTHER)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; on a CPU each gets cores/jobs threads (two one-thread runs of a small "
                             "network beat one two-thread run on two cores)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the scripts")
    parser.add_argument("--grid", nargs="+", default=[], metavar="[CONFIGS:]FLAG=V1,V2",
                        help="sweep a flag (its name without dashes; a value 'none' leaves it out): over every "
                             "configuration, each combination into OUT/FLAG=V_.../, or, prefixed with configurations "
                             "(kdcl-naive,cd:temperature=1,4), over those only, as configurations CONFIG+FLAG=V")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("common", nargs=argparse.REMAINDER, help="after --: flags for every run")
    return parser


GRID_SPEC = re.compile(r"(?:(?P<configs>[a-z0-9,-]+):)?(?P<flag>[a-z][a-z0-9-]*)=(?P<values>[^=]+)")


class GridError(ValueError):
    """A --grid that cannot be run; main prints it as one line."""


def parse_grid(specs, configs, common):
    """--grid as (axes over every configuration, {configuration: its own axes}); an axis is (flag, values),
    a value None leaving the flag out. GridError for a malformed spec, an unknown or unchosen configuration,
    a flag swept twice or also given after --."""
    shared, own, seen = [], {}, set()
    for spec in specs:
        match = GRID_SPEC.fullmatch(spec)
        if match is None:
            raise GridError(f"--grid '{spec}' is not [CONFIGS:]FLAG=V1,V2 (e.g. lr=0.05,0.1 or kdcl-naive:temperature=1,4)")
        flag, values = match["flag"], [None if v == "none" else v for v in match["values"].split(",")]
        if "" in values or len(set(values)) < len(values):
            raise GridError(f"--grid '{spec}': give each value once, none for the flag left out")
        if f"--{flag}" in common or any(arg.startswith(f"--{flag}=") for arg in common):
            raise GridError(f"--grid '{spec}' sweeps --{flag}, which the flags after -- also give; give it in one place")
        targets = match["configs"].split(",") if match["configs"] else [None]
        for target in targets:
            if target is not None and target not in configs:
                raise GridError(f"--grid '{spec}': '{target}' is not among the configurations run ({', '.join(configs)})")
            if (target, flag) in seen or (None, flag) in seen or (target is None and any(f == flag for _, f in seen)):
                raise GridError(f"--grid sweeps --{flag} twice for {target or 'every configuration'}")
            seen.add((target, flag))
            (shared if target is None else own.setdefault(target, [])).append((flag, values))
    return shared, own


def settings(axes):
    """Every combination of the axes' values: [[(flag, value), ...], ...] ([[]] without axes)."""
    return [list(zip([flag for flag, _ in axes], values)) for values in itertools.product(*(v for _, v in axes))]


def setting_name(setting):
    """A combination as a directory name: lr=0.05_clip-grad=none."""
    return "_".join(f"{flag}={'none' if value is None else value}" for flag, value in setting)


def setting_flags(setting):
    """A combination as command-line flags (a None value gives none)."""
    return [arg for flag, value in setting if value is not None for arg in (f"--{flag}", value)]


def commands(args):
    """(name, run_dir, log, argv) of every run, seed by seed, so that early seeds complete first."""
    common = args.common[1:] if args.common[:1] == ["--"] else args.common
    shared, own = parse_grid(args.grid, args.configs, common)
    out = os.path.abspath(args.out)  # the runs start in ROOT: a relative --out is the caller's
    runs = []
    for seed in args.seeds:
        for point in settings(shared):
            study = os.path.join(out, setting_name(point)) if point else out
            for config in args.configs:
                script, flags = CONFIGS[config]
                flags = [{"NET": args.net, "OTHER": args.other_net}.get(flag, flag) for flag in flags]
                for variant in settings(own.get(config, [])):
                    name = "+".join([config, *(setting_name([item]) for item in variant)])
                    run_dir = os.path.join(study, name, f"seed{seed}")
                    label = "_".join(filter(None, [setting_name(point), name]))
                    argv = [args.python, os.path.join(ROOT, script), *flags, *common, *setting_flags(point + variant),
                            "--seed", str(seed), "--out-dir", run_dir, "--no-progress"]
                    runs.append((f"{label} seed {seed}", run_dir, os.path.join(out, "logs", f"{label}-seed{seed}.log"), argv))
    return runs


def end_with_parent():
    """In the child, before the script starts: Linux sends it SIGTERM when compare.py dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG), so that no run trains on as an orphan holding its directory's
    lock; SIGTERM makes it save last.pt, and the next compare.py continues it."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_one(run_dir, log, argv, threads):
    """Start one run (continuing an earlier attempt) from this, the main thread: Linux sends the parent-death
    signal when the thread that started a child ends, and again each time the child's parent changes, so a
    child of a worker thread of a dying process is signalled twice; of the main thread, once. Returns the
    process and its log file."""
    argv = [*argv, "--resume", "auto"]  # also a run that died before its first checkpoint
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else os.environ
    f = open(log, "a")
    f.write(" ".join(argv) + "\n")
    f.flush()
    return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=end_with_parent), f


def run_all(runs, jobs, threads):
    """Train the runs, `jobs` at a time, each started from this thread; yields (name, exit code, seconds) as they
    end (a finished run, results.json, with 0 seconds)."""
    waiting, running = list(runs), []
    while waiting or running:
        while waiting and len(running) < jobs:
            name, run_dir, log, argv = waiting.pop(0)
            if os.path.exists(os.path.join(run_dir, "results.json")):
                yield name, 0, 0.0
                continue
            running.append((name, time.time(), *start_one(run_dir, log, argv, threads)))
        for entry in [entry for entry in running if entry[2].poll() is not None]:
            running.remove(entry)
            entry[3].close()
            yield entry[0], entry[2].returncode, time.time() - entry[1]
        if running:
            time.sleep(0.2)


def main(args):
    if args.jobs < 1:
        usage_error(f"--jobs must be a positive integer, got {args.jobs}")
    for values, flag in ((args.seeds, "--seeds"), (args.configs, "--configs")):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            usage_error(f"{flag} names {twice} twice; each run is trained once")
    try:
        runs = commands(args)
    except GridError as error:
        usage_error(str(error))
    if args.dry_run:
        for _, _, _, argv in runs:
            print(" ".join(argv))
        return 0
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    # On a CPU, split the cores between the runs (unless OMP_NUM_THREADS was set); a GPU run ignores it.
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // args.jobs)
    start, failed = time.time(), []
    for name, code, seconds in run_all(runs, args.jobs, threads):
        print(f"{name}: {'done' if code == 0 else f'failed (exit {code})'}" + (f" in {seconds:.0f} s" if seconds else " (already done)"),
              flush=True)
        if code:
            failed.append(name)
    print(f"{len(runs) - len(failed)}/{len(runs)} runs done in {time.time() - start:.0f} s; "
          f"table: python experiments/summarize.py {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
