"""Do two checkouts compute the same numbers? Train every training script for two deterministic epochs
on synthetic data with the code of CHECKOUT and print one line per run: a hash of the weights and
optimizer state in last.pt and one of metrics.csv without its time columns.

A study runs from a fixed commit while the code moves on; the lines of that commit and of today's
code, equal line by line, show that today's code gives the study's numbers (bit for bit, on this
machine: one thread, --deterministic).

    python experiments/same_numbers.py --checkout /path/to/worktree-of-the-study > study.txt
    python experiments/same_numbers.py > main.txt && diff study.txt main.txt
"""
import argparse
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "16",
        "--epochs", "2", "--deterministic", "--device", "cpu", "--workers", "0", "--no-progress"]

# (script, its flags): the scripts' paradigms, with and without the perturbation where they have it
RUNS = [
    ("train.py", ["--model", "resnet20"]),
    ("train.py", ["--model", "resnet20", "--perturb-every", "3"]),
    ("train_mutual_learning.py", ["--models", "resnet20", "resnet20"]),
    ("train_mutual_learning.py", ["--models", "resnet20", "resnet20", "--perturb-every", "3"]),
    ("train_mutual_learning.py", ["--models", "resnet20", "resnet20", "--sequential"]),
    ("train_competitive_distillation.py", ["--models", "resnet20", "resnet20"]),
    ("train_competitive_distillation.py", ["--models", "resnet20", "resnet20", "resnet20", "--perturb-every", "0"]),
    ("train_kdcl.py", ["--models", "resnet20", "resnet20"]),
    ("train_one.py", ["--model", "resnet20"]),
    ("train_okddip.py", ["--model", "resnet20"]),
    ("train_ceit.py", ["--model", "vit_tiny", "--warmup-epochs", "0.5"]),
    ("train_pcl.py", ["--model", "resnet20"]),
    ("train_byot.py", ["--model", "resnet20"]),
]

TIME_COLUMNS = ("epoch_time_s", "images_per_s")


def state_hash(path):
    """sha256 of every tensor and number of a checkpoint's networks and optimizers, in key order."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()

    def add(value):
        if isinstance(value, torch.Tensor):
            digest.update(str((value.dtype, tuple(value.shape))).encode())
            digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    add(ckpt["nets"])
    add(ckpt["optimizers"])
    return digest.hexdigest()[:16]


def metrics_hash(path):
    """sha256 of metrics.csv without the columns that time the run."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    for row in rows:
        out.write(",".join(f"{key}={value}" for key, value in row.items() if key not in TIME_COLUMNS) + "\n")
    return hashlib.sha256(out.getvalue().encode()).hexdigest()[:16]


def run(checkout, script, flags, out_dir):
    """Train one run with the checkout's script into out_dir; its line."""
    name = f"{script} {' '.join(flags)}"
    if not os.path.exists(os.path.join(checkout, script)):
        return f"{name}: absent"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=checkout)
    done = subprocess.run([sys.executable, script, *flags, *TINY, "--out-dir", out_dir], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        return f"{name}: failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or [''])[-1]}"
    return (f"{name}: weights {state_hash(os.path.join(out_dir, 'last.pt'))} "
            f"metrics {metrics_hash(os.path.join(out_dir, 'metrics.csv'))}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", default=ROOT, help="the repository whose scripts run (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        for i, (script, flags) in enumerate(RUNS):
            print(run(os.path.abspath(args.checkout), script, flags, os.path.join(workdir, f"run{i}")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
