"""Do two runs of one recipe train alike? The GPU check's test that the fast path (--compile --cuda-graphs)
trains as the default path does: every member's final test accuracy (results.json) within ACCURACY_POINTS
points, and every member's first-epoch mean training loss (metrics.csv) within LOSS_RELATIVE of the other's.

    python benchmarks/agreement.py RUN_A RUN_B

The same seed on other kernels (bf16 under torch.compile, one captured graph) drifts apart in the last
digits from the first step, so the runs are not equal: the tolerances are wide enough for that drift over
the quick start's two epochs (the quick start's two ResNet-20s, same recipe, different seeds, ended 0.7
points apart on the CPU) and narrow enough to catch a fast path that trains wrongly (a wrong gradient, a
stale learning rate or statistic ends many points lower). Exit 0 when they agree, 1 when not (one line
per disagreement), 2 when a run cannot be read.
"""
import argparse
import csv
import json
import os
import sys

ACCURACY_POINTS = 1.5
LOSS_RELATIVE = 0.05


def read_run(run_dir):
    """({member: final test accuracy}, {member: first epoch's train_loss}) of a finished run; ValueError naming
    what is missing."""
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            accuracies = {n["net"]: n["final_test_acc"] for n in json.load(f)["networks"]}
        with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
            losses = {row["net"]: float(row["train_loss"]) for row in csv.DictReader(f)
                      if row["epoch"] == "1" and row.get("train_loss")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"'{run_dir}' is not a finished run ({type(error).__name__}: {error})") from None
    return accuracies, losses


def disagreements(a, b, accuracy_points=ACCURACY_POINTS, loss_relative=LOSS_RELATIVE):
    """One line per member whose accuracy or first-epoch loss differs beyond the tolerances between runs a and
    b (each read_run's pair), or that one run lacks."""
    (acc_a, loss_a), (acc_b, loss_b) = a, b
    lines = []
    for member in sorted(set(acc_a) | set(acc_b)):
        if member not in acc_a or member not in acc_b:
            lines.append(f"{member}: in one run only")
        elif abs(acc_a[member] - acc_b[member]) > accuracy_points:
            lines.append(f"{member}: test accuracy {acc_a[member]:.2f}% against {acc_b[member]:.2f}% "
                         f"(more than {accuracy_points} points apart)")
    for member in sorted(set(loss_a) & set(loss_b)):
        if abs(loss_a[member] - loss_b[member]) > loss_relative * abs(loss_a[member]):
            lines.append(f"{member}: first-epoch training loss {loss_a[member]:.4f} against {loss_b[member]:.4f} "
                         f"(more than {loss_relative:.0%} apart)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="a run directory (the default path's)")
    parser.add_argument("run_b", help="the other run directory (the fast path's)")
    args = parser.parse_args(argv)
    try:
        runs = read_run(args.run_a), read_run(args.run_b)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    lines = disagreements(*runs)
    for line in lines:
        print(line)
    accuracies = ", ".join(f"{member} {runs[0][0][member]:.2f}/{runs[1][0].get(member, float('nan')):.2f}"
                           for member in sorted(runs[0][0]))
    print(f"{'disagree' if lines else 'agree'}: final test accuracy (%) {accuracies}; tolerances "
          f"{ACCURACY_POINTS} points, first-epoch loss {LOSS_RELATIVE:.0%}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
