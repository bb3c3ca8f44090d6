"""Run competitive distillation, its controls and the other online-distillation methods side by side, for several seeds.

Every configuration of CONFIGS below trains with the same data, budget and recipe (the flags after
`--`, passed to every run), once per seed, into OUT/<config>/seed<k>; logs go to OUT/logs. A run that
finished (results.json) is skipped and any other one continues (--resume auto), so the command can
be repeated, on any machine, until everything is done. Then `python experiments/summarize.py OUT`
makes the table and the figure.

    python experiments/compare.py --out runs/study --seeds 0 1 2 --jobs 2 --configs vanilla dml cd -- \\
        --dataset fashion-mnist --train-subset 512 --epochs 120 --eval-every 120

Edit CONFIGS to compare other groups; NET and OTHER stand for --net and --other-net.
"""
import argparse
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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
}

# The ensemble each group's ensemble is compared with: independently trained networks, as many, of
# the same architectures, on the same batches (ONE's gated ensemble and OKDDip's peer ensemble have 3).
ENSEMBLE_BASELINE = {"independent-perturb": "independent", "dml": "independent", "dml-perturb": "independent",
                     "cd": "independent", "cd-no-perturb": "independent", "cd-3": "independent-3",
                     "cd-hetero": "independent-hetero", "kdcl-naive": "independent", "kdcl-minlogit": "independent",
                     "one": "independent-3", "okddip": "independent-3"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("common", nargs=argparse.REMAINDER, help="after --: flags for every run")
    return parser


def commands(args):
    """(name, run_dir, log, argv) of every run, seed by seed, so that early seeds complete first."""
    common = args.common[1:] if args.common[:1] == ["--"] else args.common
    runs = []
    for seed in args.seeds:
        for name in args.configs:
            script, flags = CONFIGS[name]
            flags = [{"NET": args.net, "OTHER": args.other_net}.get(flag, flag) for flag in flags]
            run_dir = os.path.join(args.out, name, f"seed{seed}")
            argv = [args.python, os.path.join(ROOT, script), *flags, *common, "--seed", str(seed),
                    "--out-dir", run_dir, "--no-progress"]
            runs.append((f"{name} seed {seed}", run_dir, os.path.join(args.out, "logs", f"{name}-seed{seed}.log"), argv))
    return runs


def end_with_parent():
    """In the child, before the script starts: Linux sends it SIGTERM when compare.py dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG), so that no run trains on as an orphan holding its directory's
    lock; SIGTERM makes it save last.pt, and the next compare.py continues it."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_one(name, run_dir, log, argv, threads):
    """Train one run (continuing an earlier attempt); returns (name, exit code, seconds)."""
    if os.path.exists(os.path.join(run_dir, "results.json")):
        return name, 0, 0.0
    argv = [*argv, "--resume", "auto"]  # also a run that died before its first checkpoint
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else os.environ
    start = time.time()
    with open(log, "a") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=end_with_parent)
    return name, code, time.time() - start


def main(args):
    if args.jobs < 1:
        sys.exit(f"error: --jobs must be a positive integer, got {args.jobs}")
    for values, flag in ((args.seeds, "--seeds"), (args.configs, "--configs")):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            sys.exit(f"error: {flag} names {twice} twice; each run is trained once")
    runs = commands(args)
    if args.dry_run:
        for _, _, _, argv in runs:
            print(" ".join(argv))
        return 0
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    # On a CPU, split the cores between the runs (unless OMP_NUM_THREADS was set); a GPU run ignores it.
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // args.jobs)
    start, failed = time.time(), []
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, code, seconds in pool.map(lambda run: run_one(*run, threads), runs):
            print(f"{name}: {'done' if code == 0 else f'failed (exit {code})'}" + (f" in {seconds:.0f} s" if seconds else " (already done)"),
                  flush=True)
            if code:
                failed.append(name)
    print(f"{len(runs) - len(failed)}/{len(runs)} runs done in {time.time() - start:.0f} s; "
          f"table: python experiments/summarize.py {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
