"""Summarize a study (experiments/compare.py): a Markdown table and a dot plot of last-epoch test accuracy.

Reads STUDY/<config>/seed<k>/{args.json,results.json}; for every network of every configuration,
and for each group's ensemble, prints mean +- sample std over seeds and the paired per-seed
differences:
  - vs vanilla: the same architecture trained alone with the same seed (for an ensemble, the
    best of its members' architectures trained alone with that seed);
  - vs DML: the same network of the deep-mutual-learning run of the same models and seed.
Beside each network's test accuracy stands its last-epoch training accuracy (metrics.csv: the
running accuracy over that epoch's augmented batches, in train mode, a competitive network's
perturbed batches included), which shows how far the networks fit their training set. For each
competitive run it also prints how often the most frequent leader led (mean over epochs of
train_leader_share). Every run must share the data and the budget (dataset, subset, epochs,
batch, optimizer, schedule).

    python experiments/summarize.py runs/study --png docs/study.png
"""
import argparse
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import read_metrics  # noqa: E402

# args.json fields that must agree across a study's runs (the same data and budget)
BUDGET = ("dataset", "train_subset", "val_size", "img_size", "epochs", "batch_size", "optimizer", "lr",
          "weight_decay", "schedule", "warmup_epochs", "amp")


# Table order: the baselines first
SCRIPT_ORDER = {"train": 0, "mutual": 1, "competitive": 2}


class StudyError(Exception):
    pass


def load_runs(study):
    """Every finished run under `study`: dicts with config, seed, script, models, args, accs (the
    networks' last-epoch test accuracies, then the ensemble's when there is one), train (the
    networks' last-epoch training accuracies; None where metrics.csv lacks them) and leader (the
    most frequent leader's share of the steps in a competitive run, else None)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(study, "*", "seed*", "results.json"))):
        run_dir = os.path.dirname(path)
        with open(path) as f:
            results = json.load(f)
        with open(os.path.join(run_dir, "args.json")) as f:
            args = json.load(f)
        networks = results["networks"]
        models = [n["model"] for n in networks if n["net"] != "ensemble"]
        labels, series = [n["net"] for n in networks if n["net"] != "ensemble"], read_metrics(run_dir) or {}
        runs.append({"config": os.path.basename(os.path.dirname(run_dir)), "seed": args["seed"],
                     "script": results.get("script", "train" if len(models) == 1 else "?"), "models": models,
                     "args": args, "accs": [n["final_test_acc"] for n in networks],
                     "train": last_train_accs(series, labels), "leader": top_leader_share(series, labels)})
    if not runs:
        raise StudyError(f"no finished run (<config>/seed<k>/results.json) under '{study}'")
    check_same_budget(runs)
    return runs


def last_train_accs(series, labels):
    """Each network's training accuracy in its last epoch (None where metrics.csv has none)."""
    return [series[label]["train_acc"][-1][1] if "train_acc" in series.get(label, {}) else None for label in labels]


def top_leader_share(series, labels):
    """A competitive run's most frequent leader: the largest mean over epochs of a network's share of
    the steps it led (train_leader_share); None for a run that logs no leader."""
    shares = [[value for _, value in series.get(label, {}).get("train_leader_share", [])] for label in labels]
    return max(sum(s) / len(s) for s in shares) if shares and all(shares) else None


def check_same_budget(runs):
    first = runs[0]
    for run in runs[1:]:
        for key in BUDGET:
            if run["args"].get(key) != first["args"].get(key):
                raise StudyError(f"runs differ in --{key.replace('_', '-')}: {first['config']}/seed{first['seed']} has "
                                 f"{first['args'].get(key)!r}, {run['config']}/seed{run['seed']} has {run['args'].get(key)!r}; "
                                 "a study compares runs of one dataset and budget")


def mean_std(values):
    """(mean, sample standard deviation; nan for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def summarize(runs):
    """One row per (configuration, network or ensemble): its per-seed accuracies and paired differences."""
    configs = {}
    for run in sorted(runs, key=lambda run: (SCRIPT_ORDER.get(run["script"], len(SCRIPT_ORDER)), run["config"])):
        configs.setdefault(run["config"], []).append(run)
    vanilla = {(run["models"][0], run["seed"]): run["accs"][0] for run in runs if run["script"] == "train"}
    dml = {(tuple(run["models"]), run["seed"]): run["accs"] for run in runs if run["script"] == "mutual"}
    rows = []
    for config, group in configs.items():
        group = sorted(group, key=lambda run: run["seed"])
        models = group[0]["models"]
        if any(run["models"] != models for run in group):
            raise StudyError(f"configuration '{config}' holds runs of different networks")
        labels = [f"net{i} {m}" for i, m in enumerate(models)] + (["ensemble"] if len(models) > 1 else [])
        for i, label in enumerate(labels):
            values = {run["seed"]: run["accs"][i] for run in group}
            base = {}
            for seed in values:
                alone = [vanilla.get((m, seed)) for m in (models if label == "ensemble" else [models[i]])]
                if all(a is not None for a in alone):
                    base[seed] = max(alone)
            mutual = {seed: dml[(tuple(models), seed)][i] for seed in values if (tuple(models), seed) in dml}
            train = {run["seed"]: run["train"][i] for run in group
                     if label != "ensemble" and run["train"][i] is not None}
            rows.append({"config": config, "script": group[0]["script"], "label": label, "values": values, "train": train,
                         "vs_vanilla": paired(values, base) if group[0]["script"] != "train" else None,
                         "vs_dml": paired(values, mutual) if group[0]["script"] != "mutual" else None})
    return rows


def paired(values, baseline):
    """Per-seed differences values - baseline over the seeds both have, or None when there are none."""
    seeds = sorted(set(values) & set(baseline))
    return [values[s] - baseline[s] for s in seeds] or None


def fmt(values, sign=False):
    if not values:
        return "–"
    mean, std = mean_std(values)
    text = f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return text + ("" if math.isnan(std) else f" ± {std:.2f}")


def markdown(rows, runs):
    first = runs[0]["args"]
    seeds = sorted({run["seed"] for run in runs})
    lines = [f"{first['dataset']}, train subset {first.get('train_subset') or 'all'}, {first['epochs']} epochs, "
             f"batch {first['batch_size']}, {'/'.join(first['optimizer'])} {first['schedule']}; seeds {seeds}; "
             "last-epoch test accuracy (%), mean ± std over seeds; paired differences per seed, then mean ± std",
             "",
             "| configuration | network | train acc | test acc | per seed | − vanilla | − DML |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        per_seed = " / ".join(f"{row['values'][s]:.2f}" for s in sorted(row["values"]))
        lines.append(f"| {row['config']} | {row['label']} | {fmt(list(row['train'].values()))} | "
                     f"{fmt(list(row['values'].values()))} (n={len(row['values'])}) | "
                     f"{per_seed} | {fmt(row['vs_vanilla'], sign=True)} | {fmt(row['vs_dml'], sign=True)} |")
    return "\n".join(lines)


def compact(rows):
    """The same numbers, one line per configuration (for a README): each network's training and test
    accuracy and its paired difference to the network alone, then the ensemble's test accuracy, also
    paired with DML's ensemble."""
    lines = ["| configuration | train acc | test acc | − alone | ensemble | − best alone | − DML ensemble |",
             "|---|---|---|---|---|---|---|"]
    configs = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    for config, group in configs.items():
        nets = [row for row in group if row["label"] != "ensemble"]
        ensemble = next((row for row in group if row["label"] == "ensemble"), None)
        models = " + ".join(row["label"].split()[1] for row in nets)
        cells = [f"{config} ({models})", "; ".join(fmt(list(row["train"].values())) for row in nets),
                 "; ".join(fmt(list(row["values"].values())) for row in nets),
                 "; ".join(fmt(row["vs_vanilla"], sign=True) for row in nets) if nets[0]["vs_vanilla"] else "–"]
        if ensemble is None:
            cells += ["–", "–", "–"]
        else:
            cells += [fmt(list(ensemble["values"].values())), fmt(ensemble["vs_vanilla"], sign=True),
                      fmt(ensemble["vs_dml"], sign=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leadership(runs):
    """One line per competitive configuration: per seed, the share of steps its most frequent leader led."""
    lines = []
    for config in sorted({run["config"] for run in runs if run["leader"] is not None}):
        group = sorted((run for run in runs if run["config"] == config and run["leader"] is not None),
                       key=lambda run: run["seed"])
        lines.append(f"{config}: " + " / ".join(f"{run['leader']:.2f}" for run in group) +
                     f" (seeds {', '.join(str(run['seed']) for run in group)})")
    return "\n".join(lines)


def plot(rows, path, title):
    """A dot plot (one line per row: a dot per seed, the mean as a bar, +-1 std as a line) as a PNG."""
    from PIL import Image, ImageDraw, ImageFont  # Pillow comes with torchvision
    font = ImageFont.load_default()
    values = [v for row in rows for v in row["values"].values()]
    low, high = math.floor(min(values) - 0.5), math.ceil(max(values) + 0.5)
    left, width, line, top = 260, 520, 22, 40
    image = Image.new("RGB", (left + width + 30, top + line * len(rows) + 50), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    x = lambda v: left + (v - low) / (high - low) * width
    for tick in range(low, high + 1):
        draw.line([(x(tick), top), (x(tick), top + line * len(rows))], fill=(225, 225, 225))
        draw.text((x(tick) - 8, top + line * len(rows) + 6), str(tick), fill="black", font=font)
    draw.text((left + width // 2 - 60, top + line * len(rows) + 24), "test accuracy (%)", fill="black", font=font)
    draw.text((10, top + line * len(rows) + 24), "o one seed   | mean   - +-1 std", fill="black", font=font)
    for k, row in enumerate(rows):
        y = top + line * k + line // 2
        colour = (200, 60, 40) if row["label"] == "ensemble" else (40, 90, 180)
        draw.text((10, y - 6), f"{row['config']}: {row['label']}", fill="black", font=font)
        mean, std = mean_std(list(row["values"].values()))
        if not math.isnan(std):
            draw.line([(x(mean - std), y), (x(mean + std), y)], fill=colour, width=2)
        draw.line([(x(mean), y - 7), (x(mean), y + 7)], fill=colour, width=3)
        for v in row["values"].values():
            draw.ellipse([x(v) - 3, y - 3, x(v) + 3, y + 3], outline=colour)
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="the directory experiments/compare.py wrote")
    parser.add_argument("--png", default=None, help="dot plot to write (default: STUDY/study.png)")
    parser.add_argument("--compact", action="store_true", help="also print one line per configuration")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        runs = load_runs(args.study)
        rows = summarize(runs)
    except (StudyError, OSError, KeyError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = markdown(rows, runs)
    print(table)
    if args.compact:
        print("\n" + compact(rows))
    leaders = leadership(runs)
    if leaders:
        print("\nshare of the steps led by the most frequent leader, mean over epochs, per seed:\n" + leaders)
    png = args.png or os.path.join(args.study, "study.png")
    plot(rows, png, table.splitlines()[0].split("; last-epoch")[0] + "; last-epoch test accuracy")
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
