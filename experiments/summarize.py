"""Summarize a study (experiments/compare.py): Markdown tables and a dot plot of last-epoch test accuracy.

Reads STUDY/<config>/seed<k>/{args.json,results.json,metrics.csv} (the directory names the run: a
configuration of compare.CONFIGS and its seed). For every member of every configuration, and for
each group's ensemble, it prints the last-epoch test accuracy (mean ± sample std over seeds, and per
seed), the last-epoch training accuracy (metrics.csv: the running accuracy over that epoch's
augmented batches in train mode, a competitive network's perturbed batches included), and
differences paired by seed over the seeds both sides have, as mean [95 % Student-t interval]:
  - − alone: the member minus the same architecture trained alone (whichever of vanilla and
    vanilla-other trained that architecture), for every configuration but those two;
  - − alone, perturbed: a NET member of a configuration that is not a control, minus vanilla-perturb
    (one network perturbed at the rate each network of a competitive pair is);
  - − independent ensemble: a group's ensemble minus the ensemble of its compare.ENSEMBLE_BASELINE
    configuration (as many independently trained networks of the same architectures).
Runs that have not finished, seeds one side of a comparison lacks and truncated metrics.csv files
are named in printed lines. For each competitive configuration it also prints the share of the
steps its most frequent leader led. `--versus A:B` compares two configurations directly, paired by
seed: A's deployed networks minus B's, and A's ensemble minus B's. Every run must share the data and
the budget (study_runs.BUDGET).

    python experiments/summarize.py runs/study --png docs/study.png --compact
    python experiments/summarize.py experiments/study --readme README.md   # the README's table
    python experiments/summarize.py experiments/study --versus cd:dml cd:independent-perturb
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import ENSEMBLE_BASELINE, base_config  # noqa: E402
from study_runs import StudyError, config_order, load_study  # noqa: E402  (reading the run directories)

# The configurations that train networks which do not distil (compare.CONFIGS), and among them the
# single networks each member is compared with, found by architecture in this order.
CONTROLS = ("vanilla", "vanilla-perturb", "vanilla-other", "independent", "independent-perturb", "independent-3",
            "independent-hetero")
ALONE = ("vanilla", "vanilla-other")
PERTURBED_ALONE = "vanilla-perturb"

# Student-t 0.975 quantiles (two-sided 95 % intervals) for 1..30 degrees of freedom: NIST/SEMATECH
# e-Handbook of Statistical Methods, section 1.3.6.7.2, "Critical Values of the Student's t
# Distribution" (https://www.itl.nist.gov/div898/handbook/eda/section3/eda3672.htm); beyond 30 the
# normal quantile 1.96 (2.042 at 30 degrees of freedom, 1.960 in the limit).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_std(values):
    """(mean, sample standard deviation; nan for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def t_interval(values):
    """(mean, half-width of its two-sided 95 % Student-t interval: t_{0.975, n-1} * sd / sqrt(n);
    nan for one value)."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, float("nan")
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96  # T_975[df - 1]
    return mean, t * std / math.sqrt(n)


def by_config(runs):
    """{config: {seed: run}} in configuration order."""
    configs = {}
    for run in sorted(runs, key=lambda run: (config_order(run["config"]), run["seed"])):
        configs.setdefault(run["config"], {})[run["seed"]] = run
    return configs


def summarize(study):
    """(rows, notes): one row per (configuration, member or ensemble) with its per-seed test and
    training accuracies and its paired comparisons (pair); notes name what could not be paired."""
    configs = by_config(study["runs"])
    single = {name: runs for name, runs in configs.items() if all(len(run["labels"]) == 1 for run in runs.values())}
    alone = {}  # architecture -> the configuration that trained it alone
    for name in ALONE:
        if name in single:
            alone.setdefault(next(iter(single[name].values()))["models"][0], name)
    perturbed = single.get(PERTURBED_ALONE)
    perturbed_model = next(iter(perturbed.values()))["models"][0] if perturbed else None
    rows, notes = [], []
    if perturbed is None and any(name not in CONTROLS for name in configs):
        notes.append(f"note: no {PERTURBED_ALONE} run, so no − alone, perturbed")
    for config, runs in configs.items():
        first = next(iter(runs.values()))
        for label, model in zip(first["labels"], first["models"]):
            row = new_row(config, label, model, runs)
            if config not in ALONE:
                if model in alone:
                    row["alone"] = pair(row, alone[model], member_values(configs[alone[model]]), notes)
                else:
                    line = f"note: {config}: no {model} trained alone ({' or '.join(ALONE)}), so no − alone"
                    notes += [line] if line not in notes else []
            if config not in CONTROLS and model == perturbed_model:
                row["perturbed"] = pair(row, PERTURBED_ALONE, member_values(perturbed), notes)
            rows.append(row)
        if "ensemble" in first["test"]:
            rows.append(ensemble_row(config, runs, configs, notes))
    return rows, notes


def new_row(config, label, model, runs):
    """A table row: the per-seed test and training accuracies of member or ensemble `label`."""
    return {"config": config, "label": label, "model": model,
            "values": {seed: run["test"][label] for seed, run in runs.items()},
            "train": {seed: run["train"][label] for seed, run in runs.items() if run["train"].get(label) is not None},
            "alone": None, "perturbed": None, "ensemble": None}


def member_values(runs):
    """{seed: test accuracy} of a single-network configuration."""
    return {seed: run["test"][run["labels"][0]] for seed, run in runs.items()}


def ensemble_row(config, runs, configs, notes):
    """The ensemble's row, paired with its ENSEMBLE_BASELINE configuration's ensemble."""
    row = new_row(config, "ensemble", "+".join(next(iter(runs.values()))["models"]), runs)
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
        row["ensemble"] = pair(row, baseline, {seed: run["test"]["ensemble"] for seed, run in configs[baseline].items()},
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
    return (f"{first.get('dataset')}, train subset {first.get('train_subset') or 'all'}, {first.get('epochs')} epochs, "
            f"batch {first.get('batch_size')}, {'/'.join(first.get('optimizer') or [])} lr {numbers('lr')} "
            f"{first.get('schedule')}, warm-up {first.get('warmup_epochs')} epochs; seeds {seeds}")


def markdown(rows, study):
    """The full table: one row per configuration and member or ensemble."""
    lines = [budget_line(study) + "; last-epoch test accuracy (%), mean ± sample std over seeds; differences "
             "paired by seed: mean [95 % Student-t interval] (baseline, n)",
             "",
             "| configuration | member | train acc | test acc | per seed | − alone | − alone, perturbed | "
             "− independent ensemble |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        per_seed = " / ".join(f"{row['values'][seed]:.2f}" for seed in sorted(row["values"]))
        lines.append(f"| {row['config']} | {row['label']} | {fmt(sorted_values(row['train']))} | "
                     f"{fmt(sorted_values(row['values']))} (n={len(row['values'])}) | {per_seed} | "
                     f"{fmt_diff(row['alone'])} | {fmt_diff(row['perturbed'])} | {fmt_diff(row['ensemble'])} |")
    return "\n".join(lines)


def sorted_values(by_seed):
    """The values of a {seed: value} dict in seed order (so that sums are deterministic)."""
    return [by_seed[seed] for seed in sorted(by_seed)]


def compact(rows):
    """One line per configuration (for a README): its members' models, training and test accuracies
    and differences to the network alone (and alone with perturbation, for NET members), then its
    ensemble's test accuracy and difference to the independent ensemble; n is the number of seeds,
    a comparison over fewer says so."""
    lines = ["| configuration | models | n | train acc | test acc | − alone [95% CI] | − alone, perturbed [95% CI] | "
             "ensemble | − independent ensemble [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    configs = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    for config, group in configs.items():
        members = [row for row in group if row["label"] != "ensemble"]
        ensemble = next((row for row in group if row["label"] == "ensemble"), None)
        n = len(members[0]["values"])
        per_member = lambda cell: "; ".join(cell(row) for row in members) if any(
            cell(row) != "–" for row in members) else "–"
        cells = [config, " + ".join(row["model"] for row in members), str(n),
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
    lines = ["| configuration | models | seeds | test acc | − alone [95% CI] | ensemble | − independent ensemble [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for config, group in by_label(rows).items():
        members = [row for row in group if row["label"] != "ensemble"]
        ensemble = next((row for row in group if row["label"] == "ensemble"), None)
        shown = deployed_parts(members)
        acc = "; ".join(fmt(sorted_values(mean_by_seed(part, "values"))) for part in shown)
        alone = "; ".join(fmt_diff(merged_diffs(part), full=False, n_expected=len(members[0]["values"]))
                          if all(row["alone"] for row in part) else "–" for part in shown)
        lines.append(f"| {config} | {group_models([row['model'] for row in members])} | {len(members[0]['values'])} | {acc} | "
                     f"{alone} | {fmt(sorted_values(ensemble['values'])) if ensemble else '–'} | "
                     f"{fmt_diff(ensemble and ensemble['ensemble'], full=False, n_expected=len(members[0]['values']))} |")
    return "\n".join(lines)


def deployed_parts(members):
    """A configuration's deployed networks, in parts shown side by side: ONE's branch 0 or OKDDip's
    leader alone; every member of a group of one architecture together (averaged per seed); each
    member of a mixed group apart."""
    deployed = members[:1] if members[0]["label"].startswith(("branch", "leader")) else members
    return [deployed] if len({row["model"] for row in deployed}) == 1 else [[row] for row in deployed]


def versus(rows, comparisons):
    """One line per (A, B) of `comparisons`: A's deployed networks minus B's (deployed_parts, per
    architecture), and A's ensemble minus B's when both ensemble as many networks of the same
    architectures (the same compare.ENSEMBLE_BASELINE), paired by seed over the seeds both have, with
    95 % t-intervals and n; a one-line StudyError for an unknown configuration or unlike networks."""
    configs = by_label(rows)
    lines = ["| A − B | deployed networks [95% CI] (n) | ensemble [95% CI] (n) |", "|---|---|---|"]
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
        cells = [fmt_diff(difference(mean_by_seed(x, "values"), mean_by_seed(y, "values"), b), full=False)
                 for x, y in zip(*parts)]
        ensembles = [next((row["values"] for row in configs[name] if row["label"] == "ensemble"), None) for name in (a, b)]
        # ensembles of as many networks of the same architectures: the same independent baseline
        alike = ENSEMBLE_BASELINE.get(base_config(a), base_config(a)) == ENSEMBLE_BASELINE.get(base_config(b), base_config(b))
        ensemble = fmt_diff(difference(*ensembles, b), full=False) if all(ensembles) and alike else (
            "– (unlike ensembles)" if all(ensembles) else "–")
        lines.append(f"| {a} − {b} | {'; '.join(cells)} | {ensemble} |")
    return "\n".join(lines)


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


def plot(rows, path, title):
    """A dot plot as a PNG, written atomically: one line per row, a dot per seed, the mean as a bar
    and ±1 sample std as a line."""
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
        axes.plot(values, [y] * len(values), "o", markerfacecolor="none", color=colour)
    axes.set_yticks(range(len(rows)), [f"{row['config']}: {row['label']}" for row in reversed(rows)], fontsize=8)
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.grid(axis="x", color="0.9")
    axes.set_xlabel("last-epoch test accuracy (%): o one seed, | mean, — ±1 sample std")
    axes.set_title(title.replace("; seeds", "\nseeds"), fontsize=9)
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
    """The command line: STUDY [--png FILE] [--compact] [--headline] [--versus A:B ...] [--readme FILE]."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="the directory experiments/compare.py wrote")
    parser.add_argument("--png", default=None, help="dot plot to write (default: STUDY/study.png)")
    parser.add_argument("--compact", action="store_true", help="also print one line per configuration")
    parser.add_argument("--headline", action="store_true",
                        help="also print the shortest table: each configuration's deployed network and ensemble (the README's)")
    parser.add_argument("--versus", nargs="+", default=[], metavar="A:B", type=comparison,
                        help="also print configuration A minus configuration B, paired by seed: their deployed "
                             "networks and their ensembles (e.g. cd:dml cd:independent-perturb)")
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help=f"also write the shortest table into FILE between the lines {README_MARKERS[0]} and "
                             f"{README_MARKERS[1]} (how the README's table is made)")
    return parser


README_MARKERS = ("<!-- study table: begin -->", "<!-- study table: end -->")


def write_readme_table(path, table):
    """Replace the lines between README_MARKERS in the file `path` with `table`, atomically."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise StudyError(f"cannot read '{path}': {error.strerror or error}") from None
    begin, end = (text.find(marker) for marker in README_MARKERS)
    if begin < 0 or end < begin:
        raise StudyError(f"'{path}' has no table to replace: it needs the line {README_MARKERS[0]}, "
                         f"later the line {README_MARKERS[1]}")
    begin += len(README_MARKERS[0])
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text[:begin] + "\n" + table + "\n" + text[end:])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def readme_table(text):
    """The table between README_MARKERS in `text` (None without them)."""
    begin, end = (text.find(marker) for marker in README_MARKERS)
    return None if begin < 0 or end < begin else text[begin + len(README_MARKERS[0]):end].strip("\n")


def main(argv=None):
    """Print the tables, the leadership and what is missing, write the plot; 0, or 2 after one error line."""
    args = get_args_parser().parse_args(argv)
    png = args.png or os.path.join(args.study, "study.png")
    try:
        study = load_study(args.study)
        rows, notes = summarize(study)
        try:
            plot(rows, png, budget_line(study))
        except OSError as error:
            raise StudyError(f"cannot write the plot '{png}': {error.strerror or error}") from None
        pairs = versus(rows, args.versus) if args.versus else None
        if args.readme:
            write_readme_table(args.readme, headline(rows))
    except (StudyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(rows, study))
    if args.compact:
        print("\n" + compact(rows))
    if args.headline:
        print("\n" + headline(rows))
    if pairs:
        print("\nA − B, paired by seed, mean [95 % Student-t interval] (B, n):\n" + pairs)
    leaders = leadership(study["runs"])
    if leaders:
        print("\nshare of the steps led by the most frequent leader, mean over epochs, per seed:\n" + leaders)
    times = timing(study["runs"])
    if times:
        print("\ntraining time per run (min), mean over seeds: " + times)
    if study["incomplete"]:
        print("\nincomplete, not in the tables: " + ", ".join(study["incomplete"]))
    if study["warnings"] or notes:
        print("\n" + "\n".join(study["warnings"] + notes))
    print(f"\nplot: {png}" + (f"\ntable written into {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
