"""Summarize a study (experiments/compare.py): Markdown tables and a dot plot of last-epoch accuracy.

Reads STUDY/<config>/seed<k>/{args.json,results.json,metrics.csv} (the directory names the run: a
configuration of compare.CONFIGS and its seed). For every member of every configuration, and for
each group's ensemble, it prints the last-epoch test accuracy (--split val: validation accuracy;
mean ± sample std over seeds, and per seed), the last-epoch training accuracy (metrics.csv: the
running accuracy over that epoch's augmented batches in train mode, a competitive network's perturbed
batches included), how many of its runs diverged (study_runs.divergence: some network's training
cross-entropy above chance after epoch 5), and differences paired by seed over the seeds both sides
have, as mean [95 % Student-t interval]:
  - − alone: the member minus the same network trained alone, with the same initial weights and
    batches: member i of the `independent` group of the same architectures (INDEPENDENT), whose
    networks do not distil; for a single network, a branched one, or a group without such a control,
    the same architecture trained alone (vanilla, vanilla-other);
  - − alone, perturbed: a member of a configuration that is not a control minus the same, perturbed:
    member i of independent-perturb for a pair of NET, else vanilla-perturb (NET members only);
  - − independent ensemble: a group's ensemble minus the ensemble of its compare.ENSEMBLE_BASELINE
    configuration (as many independently trained networks of the same architectures).
Nothing is dropped: a run that diverged stays in every mean and comparison, and is counted and marked.
Runs that have not finished, seeds one side of a comparison lacks and truncated metrics.csv files
are named in printed lines. For each competitive configuration it also prints the share of the
steps its most frequent leader led. `--versus A:B` compares two configurations directly, paired by
seed: A's deployed networks minus B's, and A's ensemble minus B's, with p-values adjusted by Holm's
method over every comparison of the call. Every run must share the data and the budget
(study_runs.BUDGET). A --grid study (compare.py) is summarized combination by combination, then in
one table of every combination.

    python experiments/summarize.py runs/study --png docs/study.png --compact
    python experiments/summarize.py experiments/study --readme README.md   # the README's table
    python experiments/summarize.py experiments/study --versus cd:dml cd:independent-perturb
    python experiments/summarize.py experiments/pilot-methods/sgd --split val   # a grid, on validation
"""
import argparse
import math
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import ENSEMBLE_BASELINE, base_config  # noqa: E402
from stats import holm, mean_std, p_value, t_interval  # noqa: E402
from study_runs import StudyError, config_order, grid_points, load_study  # noqa: E402  (reading the run directories)

# The configurations that train networks which do not distil (compare.CONFIGS); among them the single
# networks each member may be compared with (found by architecture, in this order) and the groups whose
# member i is network i trained alone, from the same initial weights on the same batches as member i of
# any group of the same architectures (a run seeds everything from --seed and builds its networks in order).
CONTROLS = ("vanilla", "vanilla-perturb", "vanilla-other", "independent", "independent-perturb", "independent-3",
            "independent-hetero")
ALONE = ("vanilla", "vanilla-other")
INDEPENDENT = ("independent", "independent-3", "independent-hetero")
PERTURBED_ALONE, PERTURBED_INDEPENDENT = "vanilla-perturb", "independent-perturb"
# The labels of the members of one network trained as several (ONE, OKDDip, PCL, BYOT), the deployed one first.
BRANCHED = ("branch", "leader", "peer", "deepest", "exit")


def by_config(runs):
    """{config: {seed: run}} in configuration order."""
    configs = {}
    for run in sorted(runs, key=lambda run: (config_order(run["config"]), run["seed"])):
        configs.setdefault(run["config"], {})[run["seed"]] = run
    return configs


def summarize(study, split="test"):
    """(rows, notes): one row per (configuration, member or ensemble) with its per-seed `split` and
    training accuracies, the seeds in which it diverged and its paired comparisons (pair); notes name
    what could not be paired."""
    configs = by_config(study["runs"])
    missing = next((run for run in study["runs"] if None in run[split].values()), None)
    if missing is not None:
        raise StudyError(f"{missing['config']}/seed{missing['seed']} has no {SPLITS[split]} accuracy (trained with "
                         f"--val-size 0?); --split {split} needs every run's")
    rows, notes = [], []
    if PERTURBED_ALONE not in configs and any(name not in CONTROLS for name in configs):
        notes.append(f"note: no {PERTURBED_ALONE} run, so no − alone, perturbed")
    for config, runs in configs.items():
        first = next(iter(runs.values()))
        for i, (label, model) in enumerate(zip(first["labels"], first["models"])):
            row = new_row(config, label, model, runs, split)
            if config not in ALONE and config not in INDEPENDENT:
                row["alone"] = compare_alone(row, i, first, configs, ALONE, INDEPENDENT, split, notes)
                if row["alone"] is None:
                    line = f"note: {config}: no {model} trained alone ({' or '.join(ALONE)}), so no − alone"
                    notes += [line] if line not in notes else []
            if config not in CONTROLS:
                row["perturbed"] = compare_alone(row, i, first, configs, (PERTURBED_ALONE,), (PERTURBED_INDEPENDENT,),
                                                 split, notes, architecture=perturbed_model(configs))
            rows.append(row)
        if "ensemble" in first["test"]:
            rows.append(ensemble_row(config, runs, configs, split, notes))
    return rows, notes


def new_row(config, label, model, runs, split="test"):
    """A table row: the per-seed `split` and training accuracies of member or ensemble `label`, and the
    seeds in which it diverged (a member: it diverged; the ensemble: any member did)."""
    return {"config": config, "label": label, "model": model, "split": split,
            "values": {seed: run[split][label] for seed, run in runs.items()},
            "train": {seed: run["train"][label] for seed, run in runs.items() if run["train"].get(label) is not None},
            "diverged": {seed: any(entry["net"] == label or label == "ensemble" for entry in run["diverged"])
                         for seed, run in runs.items()},
            "alone": None, "perturbed": None, "ensemble": None}


def perturbed_model(configs):
    """The architecture vanilla-perturb trained (None without it)."""
    runs = configs.get(PERTURBED_ALONE)
    return next(iter(runs.values()))["models"][0] if runs else None


def compare_alone(row, i, first, configs, singles, groups, split, notes, architecture=None):
    """Member i's comparison with itself trained alone: member i of the first of `groups` whose networks are
    this configuration's (same architectures in the same order; not for a branched network's members), else
    the first of `singles` that trained its architecture (when `architecture` is given, only that one); None
    when neither is in the study."""
    branched = row["label"].startswith(BRANCHED)
    for name in groups:
        runs = configs.get(name)
        if runs and not branched and name != row["config"] and next(iter(runs.values()))["models"] == first["models"]:
            return pair(row, name, member_values(runs, split, i), notes)
    for name in singles:
        runs = configs.get(name)
        control = next(iter(runs.values())) if runs else None
        if control and len(control["labels"]) == 1 and control["models"][0] == row["model"] and architecture in (None, row["model"]):
            return pair(row, name, member_values(runs, split), notes)
    return None


def member_values(runs, split="test", i=0):
    """{seed: `split` accuracy} of member i of a configuration's runs."""
    return {seed: run[split][run["labels"][i]] for seed, run in runs.items()}


def ensemble_row(config, runs, configs, split, notes):
    """The ensemble's row, paired with its ENSEMBLE_BASELINE configuration's ensemble."""
    row = new_row(config, "ensemble", "+".join(next(iter(runs.values()))["models"]), runs, split)
    baseline = ENSEMBLE_BASELINE.get(base_config(config))
    if baseline is None:
        return row
    models = set(next(iter(runs.values()))["models"])
    if baseline not in configs:
        notes.append(f"note: {config}: no finished {baseline} run, so no − independent ensemble")
    elif any("ensemble" not in run["test"] or set(run["models"]) != models for run in configs[baseline].values()):
        notes.append(f"note: {config}: {baseline} is not an ensemble of {' and '.join(sorted(models))}, "
                     "so no − independent ensemble")
    else:
        row["ensemble"] = pair(row, baseline, {seed: run[split]["ensemble"] for seed, run in configs[baseline].items()},
                               notes)
    return row


def pair(row, baseline, baseline_values, notes):
    """{"baseline": name, "diffs": {seed: row's value - baseline's}} over the seeds both have; a note
    (once per pair of configurations) names the seeds only one side has."""
    seeds = sorted(set(row["values"]) & set(baseline_values))
    only_here, only_there = sorted(set(row["values"]) - set(seeds)), sorted(set(baseline_values) - set(seeds))
    if only_here or only_there:
        line = (f"note: {row['config']} − {baseline} paired over seeds {seeds} (n={len(seeds)})" +
                (f"; {baseline} lacks seeds {only_here}" if only_here else "") +
                (f"; {row['config']} lacks seeds {only_there}" if only_there else ""))
        notes += [line] if line not in notes else []
    return difference(row["values"], baseline_values, baseline)


def difference(values, baseline_values, baseline):
    """A comparison (as pair makes it) of two {seed: value} dicts over the seeds both have."""
    seeds = sorted(set(values) & set(baseline_values))
    return {"baseline": baseline, "diffs": {seed: values[seed] - baseline_values[seed] for seed in seeds}}


def fmt(values):
    """mean ± sample std (2 decimals); the mean alone for one value; – for none."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def signed(value):
    """+1.23 / -1.23, never -0.00."""
    text = f"{value:+.2f}"
    return "+0.00" if text == "-0.00" else text


def fmt_diff(comparison, full=True, n_expected=None):
    """mean [95 % interval] of a comparison's differences, then (baseline, n) in the full table or
    (n=k) in the compact one when k is not the configuration's seed count; – without one."""
    if comparison is None or not comparison["diffs"]:
        return "–"
    diffs = [comparison["diffs"][seed] for seed in sorted(comparison["diffs"])]
    mean, half = t_interval(diffs)
    text = signed(mean) + ("" if math.isnan(half) else f" [{signed(mean - half)}, {signed(mean + half)}]")
    if full:
        return text + f" ({comparison['baseline']}, n={len(diffs)})"
    return text + ("" if len(diffs) == n_expected else f" (n={len(diffs)})")


def budget_line(study):
    """The data and budget every run shares, and the seeds."""
    first = study["runs"][0]["args"]
    seeds = sorted({run["seed"] for run in study["runs"]})
    numbers = lambda key: "/".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in first.get(key) or [])
    clip = f", gradients clipped to norm {first['clip_grad']:g}" if first.get("clip_grad") and first.get(
        "clip_mode", "norm") == "norm" else f", gradients clipped to ±{first['clip_grad']:g}" if first.get("clip_grad") else ""
    return (f"{first.get('dataset')}, train subset {first.get('train_subset') or 'all'}, {first.get('epochs')} epochs, "
            f"batch {first.get('batch_size')}, {'/'.join(first.get('optimizer') or [])} lr {numbers('lr')} "
            f"wd {numbers('weight_decay')} {first.get('schedule')}, warm-up {first.get('warmup_epochs')} epochs{clip}; "
            + (f"accuracies of {first['eval_subset']} validation and test images each (--eval-subset); " if first.get("eval_subset") else "")
            + f"seeds {seeds}")


def diverged(rows):
    """'k/n': in how many of the n seeds the rows' runs diverged (any of the rows)."""
    seeds = set().union(*(row["diverged"] for row in rows))
    return f"{sum(any(row['diverged'].get(seed) for row in rows) for seed in seeds)}/{len(seeds)}"


def markdown(rows, study, split="test"):
    """The full table: one row per configuration and member or ensemble."""
    lines = [budget_line(study) + f"; last-epoch {SPLITS[split]} accuracy (%), mean ± sample std over seeds; diverged: "
             "the runs in which this member (the ensemble: any member) diverged; differences paired by seed: mean "
             "[95 % Student-t interval] (baseline, n)",
             "",
             f"| configuration | member | diverged | train acc | {split} acc | per seed | − alone | − alone, perturbed | "
             "− independent ensemble |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        per_seed = " / ".join(f"{row['values'][seed]:.2f}" + ("×" if row["diverged"].get(seed) else "")
                              for seed in sorted(row["values"]))
        lines.append(f"| {row['config']} | {row['label']} | {diverged([row])} | {fmt(sorted_values(row['train']))} | "
                     f"{fmt(sorted_values(row['values']))} (n={len(row['values'])}) | {per_seed} | "
                     f"{fmt_diff(row['alone'])} | {fmt_diff(row['perturbed'])} | {fmt_diff(row['ensemble'])} |")
    return "\n".join(lines)


SPLITS = {"test": "test", "val": "validation"}


def sorted_values(by_seed):
    """The values of a {seed: value} dict in seed order (so that sums are deterministic)."""
    return [by_seed[seed] for seed in sorted(by_seed)]


def compact(rows):
    """One line per configuration (for a README): its members' models, training and test accuracies
    and differences to the network alone (and alone with perturbation, for NET members), then its
    ensemble's test accuracy and difference to the independent ensemble; n is the number of seeds,
    a comparison over fewer says so."""
    lines = [f"| configuration | models | n | diverged | train acc | {rows[0]['split']} acc | − alone [95% CI] | "
             "− alone, perturbed [95% CI] | ensemble | − independent ensemble [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    configs = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    for config, group in configs.items():
        members = [row for row in group if row["label"] != "ensemble"]
        ensemble = next((row for row in group if row["label"] == "ensemble"), None)
        n = len(members[0]["values"])
        per_member = lambda cell: "; ".join(cell(row) for row in members) if any(
            cell(row) != "–" for row in members) else "–"
        cells = [config, " + ".join(row["model"] for row in members), str(n), diverged(group),
                 per_member(lambda row: fmt(sorted_values(row["train"]))),
                 per_member(lambda row: fmt(sorted_values(row["values"]))),
                 per_member(lambda row: fmt_diff(row["alone"], full=False, n_expected=n)),
                 per_member(lambda row: fmt_diff(row["perturbed"], full=False, n_expected=n)),
                 fmt(sorted_values(ensemble["values"])) if ensemble else "–",
                 fmt_diff(ensemble and ensemble["ensemble"], full=False, n_expected=n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(rows):
    """The shortest table, one line per configuration (the README's): the test accuracy of its
    deployed network (a group's networks averaged per seed; ONE's branch 0, OKDDip's leader), its
    paired difference to that architecture trained alone, and its ensemble against the independent
    ensemble of as many networks; 95 % t-intervals over seeds."""
    lines = [f"| configuration | models | seeds | diverged | {rows[0]['split']} acc | − alone [95% CI] | ensemble | "
             "− independent ensemble [95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for config, group in by_label(rows).items():
        members = [row for row in group if row["label"] != "ensemble"]
        ensemble = next((row for row in group if row["label"] == "ensemble"), None)
        shown = deployed_parts(members)
        acc = "; ".join(fmt(sorted_values(mean_by_seed(part, "values"))) for part in shown)
        alone = "; ".join(fmt_diff(merged_diffs(part), full=False, n_expected=len(members[0]["values"]))
                          if all(row["alone"] for row in part) else "–" for part in shown)
        lines.append(f"| {config} | {group_models([row['model'] for row in members])} | {len(members[0]['values'])} | "
                     f"{diverged(group)} | {acc} | "
                     f"{alone} | {fmt(sorted_values(ensemble['values'])) if ensemble else '–'} | "
                     f"{fmt_diff(ensemble and ensemble['ensemble'], full=False, n_expected=len(members[0]['values']))} |")
    return "\n".join(lines)


def deployed_parts(members):
    """A configuration's deployed networks, in parts shown side by side: ONE's branch 0, OKDDip's
    leader, PCL's temporal-mean peer 0 or BYOT's deepest exit alone; every member of a group of one architecture together (averaged per seed); each
    member of a mixed group apart."""
    deployed = members[:1] if members[0]["label"].startswith(BRANCHED) else members
    return [deployed] if len({row["model"] for row in deployed}) == 1 else [[row] for row in deployed]


def versus(rows, comparisons):
    """One line per (A, B) of `comparisons`: A's deployed networks minus B's (deployed_parts, per
    architecture), and A's ensemble minus B's when both ensemble as many networks of the same
    architectures (the same compare.ENSEMBLE_BASELINE), paired by seed over the seeds both have, with
    95 % t-intervals, n, the paired t-test's p-value adjusted by Holm's method over every comparison of
    the call, and how many runs diverged on each side; a one-line StudyError for an unknown
    configuration or unlike networks."""
    configs = by_label(rows)
    lines, tests = [], []  # tests: every comparison's differences, in the order of the cells
    for a, b in comparisons:
        for name in (a, b):
            if name not in configs:
                raise StudyError(f"--versus {a}:{b}: no finished run of '{name}'; the study has: {', '.join(configs)}")
        sides = [[row for row in configs[name] if row["label"] != "ensemble"] for name in (a, b)]
        parts = [deployed_parts(members) for members in sides]
        models = [[part[0]["model"] for part in side] for side in parts]
        if models[0] != models[1]:
            raise StudyError(f"--versus {a}:{b}: {a} deploys {' and '.join(models[0])}, {b} "
                             f"{' and '.join(models[1])}; compare configurations of the same networks")
        deployed = [difference(mean_by_seed(x, "values"), mean_by_seed(y, "values"), b) for x, y in zip(*parts)]
        ensembles = [next((row["values"] for row in configs[name] if row["label"] == "ensemble"), None) for name in (a, b)]
        # ensembles of as many networks of the same architectures: the same independent baseline
        alike = ENSEMBLE_BASELINE.get(base_config(a), base_config(a)) == ENSEMBLE_BASELINE.get(base_config(b), base_config(b))
        ensemble = difference(*ensembles, b) if all(ensembles) and alike else None
        tests += [comparison["diffs"] for comparison in deployed + ([ensemble] if ensemble else [])]
        lines.append((a, b, deployed, ensemble, "– (unlike ensembles)" if all(ensembles) and not alike else "–",
                      f"{diverged(configs[a])}, {diverged(configs[b])}"))
    adjusted = iter(holm([p_value(sorted_values(diffs)) for diffs in tests]))
    table = ["| A − B | deployed networks [95% CI] (n) | p (Holm) | ensemble [95% CI] (n) | p (Holm) | diverged A, B |",
             "|---|---|---|---|---|---|"]
    for a, b, deployed, ensemble, no_ensemble, diverged_runs in lines:
        deployed_p = "; ".join(fmt_p(next(adjusted)) for _ in deployed)
        ensemble_p = fmt_p(next(adjusted)) if ensemble else "–"
        table.append(f"| {a} − {b} | {'; '.join(fmt_diff(c, full=False) for c in deployed)} | {deployed_p} | "
                     f"{fmt_diff(ensemble, full=False) if ensemble else no_ensemble} | {ensemble_p} | {diverged_runs} |")
    return "\n".join(table)


def fmt_p(p):
    """A p-value for a table: 3 decimals, '< 0.001' below, '–' when there is none (one seed)."""
    return "–" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def group_models(models):
    """A group's architectures, short: '2 × resnet20' for copies of one, 'resnet20 + mobilenet_v1' otherwise."""
    if len(models) > 1 and len(set(models)) == 1:
        return f"{len(models)} × {models[0]}"
    return " + ".join(models)


def by_label(rows):
    """{configuration: its rows}, in table order."""
    configs = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    return configs


def mean_by_seed(rows, key):
    """{seed: mean over `rows` of row[key][seed]} over the seeds every row has."""
    seeds = set.intersection(*(set(row[key]) for row in rows))
    return {seed: sum(row[key][seed] for row in rows) / len(rows) for seed in seeds}


def merged_diffs(rows):
    """The members' paired differences to the network alone, averaged per seed (one comparison)."""
    return {"baseline": rows[0]["alone"]["baseline"],
            "diffs": mean_by_seed([{"diffs": row["alone"]["diffs"]} for row in rows], "diffs")}


def compact_table(study, table=None):
    """The compact table (or `table`, e.g. headline) of the study in directory `study`, as a string."""
    return (table or compact)(summarize(load_study(study))[0])


def leadership(runs):
    """One line per competitive configuration: per seed, the share of steps its most frequent leader led."""
    lines = []
    for config, group in by_config([run for run in runs if run["leader"] is not None]).items():
        lines.append(f"{config}: " + " / ".join(f"{run['leader']:.2f}" for run in group.values()) +
                     f" (seeds {', '.join(str(seed) for seed in group)})")
    return "\n".join(lines)


def timing(runs):
    """The training time (metrics.csv's epoch times summed; evaluation and start-up excluded): per
    configuration the mean over its timed seeds, in minutes, then the sum over every timed run, in hours."""
    timed = [run for run in runs if run["seconds"] is not None]
    if not timed:
        return ""
    parts = [f"{config} {sum(run['seconds'] for run in group.values()) / len(group) / 60:.1f}"
             for config, group in by_config(timed).items()]
    return (", ".join(parts) + f"; in all {sum(run['seconds'] for run in timed) / 3600:.2f} h over {len(timed)} runs"
            + (f" ({len(runs) - len(timed)} untimed)" if len(timed) < len(runs) else ""))


def plot(rows, path, title, split="test"):
    """A dot plot as a PNG, written atomically: one line per row, a dot per seed (a cross where that run
    diverged), the mean as a bar and ±1 sample std as a line."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise StudyError("the plot needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(9, 1.6 + 0.28 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)  # Agg renders without a display, whatever backend the session chose
    axes = figure.subplots()
    for k, row in enumerate(rows):
        y, values = len(rows) - 1 - k, sorted_values(row["values"])
        colour = "tab:red" if row["label"] == "ensemble" else "tab:blue"
        mean, std = mean_std(values)
        if not math.isnan(std):
            axes.plot([mean - std, mean + std], [y, y], color=colour, linewidth=2)
        axes.plot([mean], [y], marker="|", markersize=14, markeredgewidth=2, color=colour)
        seeds = sorted(row["values"])
        calm = [row["values"][seed] for seed in seeds if not row["diverged"].get(seed)]
        wild = [row["values"][seed] for seed in seeds if row["diverged"].get(seed)]
        axes.plot(calm, [y] * len(calm), "o", markerfacecolor="none", color=colour)
        axes.plot(wild, [y] * len(wild), "x", markersize=8, markeredgewidth=2, color="black")
    axes.set_yticks(range(len(rows)), [f"{row['config']}: {row['label']}" for row in reversed(rows)], fontsize=8)
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.grid(axis="x", color="0.9")
    axes.set_xlabel(f"last-epoch {SPLITS[split]} accuracy (%): o a seed, × a seed whose run diverged, | mean, — ±1 sample std",
                    fontsize=9)
    axes.set_title(textwrap.fill(title, 95), fontsize=9)
    figure.tight_layout()
    tmp = path + ".tmp"
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def comparison(text):
    """'A:B' -> ("A", "B") for --versus."""
    a, colon, b = text.partition(":")
    if not (a and colon and b) or ":" in b:
        raise argparse.ArgumentTypeError(f"'{text}' is not A:B (two configuration names, e.g. cd:dml)")
    return a, b


def get_args_parser():
    """The command line: STUDY [--split val] [--png FILE] [--compact] [--headline] [--versus A:B ...]
    [--readme FILE [--readme-table NAME]]."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="the directory experiments/compare.py wrote (a study, or a --grid of studies)")
    parser.add_argument("--split", default="test", choices=list(SPLITS),
                        help="the accuracy every table shows: the test set's, or the validation split's (to choose "
                             "a recipe without looking at the test set)")
    parser.add_argument("--png", default=None, help="dot plot to write (default: STUDY/study.png)")
    parser.add_argument("--compact", action="store_true", help="also print one line per configuration")
    parser.add_argument("--headline", action="store_true",
                        help="also print the shortest table: each configuration's deployed network and ensemble (the README's)")
    parser.add_argument("--versus", nargs="+", default=[], metavar="A:B", type=comparison,
                        help="also print configuration A minus configuration B, paired by seed: their deployed "
                             "networks and their ensembles (e.g. cd:dml cd:independent-perturb), with Holm-adjusted p-values")
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help="also write the shortest table into FILE between the lines <!-- NAME table: begin --> and "
                             "<!-- NAME table: end --> (how the README's tables are made)")
    parser.add_argument("--readme-table", default="study", metavar="NAME", help="NAME of --readme's markers")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="K",
                        help="only the runs of these seeds (e.g. the numbers of a study at an earlier stage)")
    return parser


def readme_markers(name="study"):
    """The two lines between which --readme writes the table NAME."""
    return f"<!-- {name} table: begin -->", f"<!-- {name} table: end -->"


README_MARKERS = readme_markers()


def write_readme_table(path, table, name="study"):
    """Replace the lines between the markers of table `name` in the file `path` with `table`, atomically."""
    markers = readme_markers(name)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise StudyError(f"cannot read '{path}': {error.strerror or error}") from None
    begin, end = (text.find(marker) for marker in markers)
    if begin < 0 or end < begin:
        raise StudyError(f"'{path}' has no table to replace: it needs the line {markers[0]}, later the line {markers[1]}")
    begin += len(markers[0])
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text[:begin] + "\n" + table + "\n" + text[end:])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def readme_table(text, name="study"):
    """The table between the markers of table `name` in `text` (None without them)."""
    markers = readme_markers(name)
    begin, end = (text.find(marker) for marker in markers)
    return None if begin < 0 or end < begin else text[begin + len(markers[0]):end].strip("\n")


def grid_overview(studies, split="test"):
    """One line per combination and configuration of a --grid: seeds, diverged runs, the deployed
    networks' accuracy (a group's averaged per seed) and the ensemble's, mean ± sample std."""
    lines = [f"| setting | configuration | models | seeds | diverged | {split} acc | ensemble |", "|---|---|---|---|---|---|---|"]
    for path, rows in studies:
        for config, group in by_label(rows).items():
            members = [row for row in group if row["label"] != "ensemble"]
            ensemble = next((row for row in group if row["label"] == "ensemble"), None)
            acc = "; ".join(fmt(sorted_values(mean_by_seed(part, "values"))) for part in deployed_parts(members))
            lines.append(f"| {os.path.basename(path)} | {config} | {group_models([row['model'] for row in members])} | "
                         f"{len(members[0]['values'])} | {diverged(group)} | {acc} | "
                         f"{fmt(sorted_values(ensemble['values'])) if ensemble else '–'} |")
    return "\n".join(lines)


def check_png(path):
    """StudyError in one line unless `path` may take the plot: a name ending .png, and no other file's (a run's
    results.json, say) in its place."""
    if not path.lower().endswith(".png"):
        raise StudyError(f"--png '{path}': the plot is a PNG file; give a name that ends .png")
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise StudyError(f"--png '{path}' exists and is not a PNG image: not written over; choose another --png")


def only_seeds(study, seeds):
    """`study` with only the finished runs of `seeds` (None: all of them)."""
    if seeds is None:
        return study
    runs = [run for run in study["runs"] if run["seed"] in seeds]
    if not runs:
        raise StudyError(f"no finished run of seeds {' '.join(map(str, seeds))} under '{study['path']}'")
    return {**study, "runs": runs}


def report(path, args, png):
    """Summarize one study: print its tables and lines, write its plot; returns its rows. StudyError
    (printed by main as one line) before anything is printed or written when it cannot be summarized."""
    study = only_seeds(load_study(path), args.seeds)
    rows, notes = summarize(study, args.split)
    check_png(png)
    try:
        plot(rows, png, budget_line(study), args.split)
    except OSError as error:
        raise StudyError(f"cannot write the plot '{png}': {error.strerror or error}") from None
    pairs = versus(rows, args.versus) if args.versus else None
    if args.readme:
        write_readme_table(args.readme, headline(rows), args.readme_table)
    print(markdown(rows, study, args.split))
    for wanted, table in ((args.compact, compact), (args.headline, headline)):
        if wanted:
            print("\n" + table(rows))
    if pairs:
        print("\nA − B, paired by seed, mean [95 % Student-t interval] (n), p-value of the paired t-test adjusted by "
              "Holm's method over the comparisons of this call, runs that diverged on each side:\n" + pairs)
    for title, text in (("share of the steps led by the most frequent leader, mean over epochs, per seed:\n",
                         leadership(study["runs"])),
                        ("training time per run (min), mean over seeds: ", timing(study["runs"])),
                        ("incomplete, not in the tables: ", ", ".join(study["incomplete"])),
                        ("", "\n".join(study["warnings"] + notes))):
        if text:
            print("\n" + title + text)
    print(f"\nplot: {png}" + (f"\ntable written into {args.readme}" if args.readme else ""))
    return rows


def main(argv=None):
    """Print the tables, the leadership and what is missing, write the plot (of every study of a grid,
    then the grid's overview); 0, or 2 after one error line."""
    args = get_args_parser().parse_args(argv)
    points = grid_points(args.study)
    try:
        if points is None:
            report(args.study, args, args.png or os.path.join(args.study, "study.png"))
            return 0
        if args.readme or args.png:
            raise StudyError(f"'{args.study}' is a --grid of {len(points)} studies: --readme and --png take one; "
                             f"name one of them ({os.path.basename(points[0])}, ...)")
        studies = []
        for path in points:
            print(f"## {os.path.basename(path)}\n")
            studies.append((path, report(path, args, os.path.join(path, "study.png"))))
            print()
        print(f"## every setting of {args.study}\n\n" + grid_overview(studies, args.split))
    except (StudyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
