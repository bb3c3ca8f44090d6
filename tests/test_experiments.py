"""experiments/compare.py (the study's runs) and experiments/summarize.py (its tables and plot)."""
import json
import math
import os
import shutil
import sys

import pytest
from PIL import Image

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402
import metrics  # noqa: E402
import stats  # noqa: E402
import summarize  # noqa: E402

BUDGET = {"dataset": "fashion-mnist", "train_subset": 1000, "val_size": 0, "img_size": 28, "epochs": 40,
          "batch_size": 128, "optimizer": ["sgd"], "lr": [0.1], "weight_decay": [0.0005], "schedule": "cosine",
          "warmup_epochs": 1.0, "amp": "auto", "label_smoothing": 0.0}
# Student-t quantiles in closed form: t_{0.975, 1} = tan(0.475 pi); t_{0.975, 2} = (2p - 1) sqrt(2 / (4p(1 - p))), p = 0.975
T2 = math.tan(0.475 * math.pi)                    # 12.706: two seeds
T3 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))    # 4.303: three seeds


def write_run(study, config, seed, script, models, accs, train=None, leader=None, labels=None, **changes):
    """A finished run directory as the training scripts leave it (only what summarize.py reads);
    `train` and `leader`: the networks' last-epoch training accuracies and leader shares, written to
    metrics.csv after a first epoch (training accuracy 10, leader share 0.5 each)."""
    run_dir = os.path.join(study, config, f"seed{seed}")
    os.makedirs(run_dir)
    args = {**BUDGET, "seed": seed, **changes}
    labels = (labels or [f"net{i}_{m}" for i, m in enumerate(models)]) + (["ensemble"] if len(models) > 1 else [])
    networks = [{"net": label, "model": (models + ["+".join(models)])[i], "final_test_acc": acc, "final_val_acc": None}
                for i, (label, acc) in enumerate(zip(labels, accs))]
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"script": script, "dataset": "fashion-mnist", "epochs": args["epochs"], "networks": networks}, f)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(args, f)
    if train is not None:
        none = [""] * len(models)
        rows = [(1, [10.0] * len(models), [0.5] * len(models) if leader else none), (args["epochs"], train, leader or none)]
        with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
            f.write("epoch,net,model,train_acc,train_leader_share,test_acc\n")
            for epoch, epoch_train, epoch_leader in rows:
                f.writelines(f"{epoch},{label},{model},{acc},{share},\n"
                             for label, model, acc, share in zip(labels, models, epoch_train, epoch_leader))
                if len(models) > 1:
                    f.write(f"{epoch},ensemble,{'+'.join(models)},,,{accs[-1]}\n")
    return run_dir


def write_incomplete(study, config, seed, *files):
    """A run directory that has not finished: args.json (of that seed) and empty stand-ins for `files`."""
    run_dir = os.path.join(study, config, f"seed{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({**BUDGET, "seed": seed}, f)
    for name in files:
        open(os.path.join(run_dir, name), "w").close()
    return run_dir


R, M = "resnet20", "mobilenet_v1"


@pytest.fixture
def study(tmp_path):
    """Three seeds of the controls, DML and CD; independent-hetero lacks seed 1 and cd-hetero's seed 2 has
    not finished; dml and independent-hetero have no metrics.csv."""
    root = str(tmp_path / "study")
    for seed in range(3):
        write_run(root, "vanilla", seed, "train", [R], [(80.0, 81.0, 79.0)[seed]], train=[99.0 + seed / 2])
        write_run(root, "vanilla-perturb", seed, "train", [R], [(80.5, 81.5, 80.0)[seed]], train=[98.0 + seed / 2])
        write_run(root, "vanilla-other", seed, "train", [M], [(72.0, 73.0, 71.0)[seed]], train=[90.0 + seed])
        write_run(root, "independent", seed, "mutual", [R, R],
                  [(80.5, 79.5, 82.0), (81.0, 80.0, 81.5), (78.0, 79.0, 80.0)][seed], train=[99.0, 99.0])
        write_run(root, "dml", seed, "mutual", [R, R], [(81.0, 82.0, 83.0), (81.5, 80.5, 82.0), (80.0, 81.0, 81.5)][seed])
        write_run(root, "cd", seed, "competitive", [R, R], [(82.0, 84.0, 85.0), (83.0, 82.0, 84.0), (81.0, 80.0, 82.5)][seed],
                  train=[97.0 + seed, 100.0], leader=[1.0 - seed / 2, seed / 2])
    for seed, accs in ((0, (80.0, 72.5, 81.0)), (2, (79.5, 70.0, 80.0))):
        write_run(root, "independent-hetero", seed, "mutual", [R, M], list(accs))
    for seed, accs in ((0, (81.0, 74.0, 82.0)), (1, (82.0, 74.5, 83.0))):
        write_run(root, "cd-hetero", seed, "competitive", [R, M], list(accs), train=[96.0 + seed, 90.0 + seed],
                  leader=[0.9, 0.1])
    write_incomplete(root, "cd-hetero", 2, "last.pt")
    os.makedirs(os.path.join(root, "logs"))  # compare.py's logs: not a configuration
    return root


def rows_of(study):
    rows, notes = summarize.summarize(summarize.load_study(study))
    return {(row["config"], row["label"]): row for row in rows}, notes


def interval(mean, sd, n, t):
    """mean ± t * sd / sqrt(n), by hand."""
    return pytest.approx((mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)))


def ci(comparison):
    """The (low, high) 95 % interval of a comparison as summarize computes it."""
    mean, half = summarize.t_interval([comparison["diffs"][seed] for seed in sorted(comparison["diffs"])])
    return mean - half, mean + half


def test_t_quantiles_p_values_and_holm_by_hand():
    assert stats.t_quantile(1) == pytest.approx(T2) and stats.t_quantile(2) == pytest.approx(T3)
    # NIST/SEMATECH e-Handbook, table 1.3.6.7.2 (0.975 column), beyond n = 30 too: 2.228 (10), 2.042 (30), 1.984 (100)
    assert [round(stats.t_quantile(df), 3) for df in (10, 30, 100)] == [2.228, 2.042, 1.984]
    assert stats.t_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, T3 / math.sqrt(3)))
    assert math.isnan(stats.t_interval([5.0])[1])
    # [1, 2, 3]: t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom, whose two-sided tail is 1 - t / sqrt(t^2 + 2)
    t = 2 * math.sqrt(3)
    assert stats.p_value([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert stats.p_value([1.0, 1.0]) == 0.0 and stats.p_value([0.0, 0.0]) == 1.0 and math.isnan(stats.p_value([1.0]))
    # Holm: 0.01 x 3, then max(0.03, 0.03 x 2), then max(0.06, 0.04 x 1); nan is no test
    assert stats.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(stats.holm([0.5, float("nan")])[1]) and stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_members_are_paired_by_seed_with_themselves_trained_alone(study):
    """Member i of a group meets member i of `independent` (the same initial weights and batches, no
    distillation); a single network and a perturbed comparison without independent-perturb meet vanilla."""
    rows, _ = rows_of(study)
    cd0, cd1 = rows[("cd", "net0_resnet20")], rows[("cd", "net1_resnet20")]
    assert cd0["values"] == {0: 82.0, 1: 83.0, 2: 81.0}
    assert summarize.mean_std(list(cd0["values"].values())) == pytest.approx((82.0, 1.0))  # sample std
    # − independent's net0 (80.5, 81, 78): 1.5, 2, 3: mean 13/6, sd sqrt(7/12); net1 (79.5, 80, 79): 4.5, 2, 1
    assert cd0["alone"]["baseline"] == "independent" and cd0["alone"]["diffs"] == pytest.approx({0: 1.5, 1: 2.0, 2: 3.0})
    assert ci(cd0["alone"]) == interval(13 / 6, math.sqrt(7 / 12), 3, T3)
    assert cd1["alone"]["diffs"] == pytest.approx({0: 4.5, 1: 2.0, 2: 1.0})
    # − vanilla-perturb: 82-80.5, 83-81.5, 81-80 = 1.5, 1.5, 1: mean 4/3, sd sqrt(((1/6)^2*2 + (1/3)^2)/2)
    assert cd0["perturbed"]["baseline"] == "vanilla-perturb"
    assert cd0["perturbed"]["diffs"] == pytest.approx({0: 1.5, 1: 1.5, 2: 1.0})
    assert ci(cd0["perturbed"]) == interval(4 / 3, math.sqrt(((1 / 6) ** 2 * 2 + (1 / 3) ** 2) / 2), 3, T3)
    # the heterogeneous pair meets independent-hetero, member by member, over the one seed both have (0)
    hetero0, hetero1 = rows[("cd-hetero", "net0_resnet20")], rows[("cd-hetero", "net1_mobilenet_v1")]
    assert hetero0["alone"] == {"baseline": "independent-hetero", "diffs": pytest.approx({0: 1.0})}   # 81 - 80
    assert hetero1["alone"] == {"baseline": "independent-hetero", "diffs": pytest.approx({0: 1.5})}   # 74 - 72.5
    assert hetero0["perturbed"]["diffs"] == pytest.approx({0: 0.5, 1: 0.5}) and hetero1["perturbed"] is None  # NET only
    # without independent-hetero, each architecture meets its network alone
    shutil.rmtree(os.path.join(study, "independent-hetero"))
    rows, _ = rows_of(study)
    assert rows[("cd-hetero", "net1_mobilenet_v1")]["alone"] == {"baseline": "vanilla-other", "diffs": pytest.approx({0: 2.0, 1: 1.5})}
    assert rows[("cd-hetero", "net0_resnet20")]["alone"]["baseline"] == "vanilla"


def test_a_pair_meets_independent_perturb_member_by_member(study):
    for seed, accs in enumerate([(81.0, 80.0, 82.0), (81.5, 81.0, 82.5), (79.0, 80.0, 81.0)]):
        write_run(study, "independent-perturb", seed, "mutual", [R, R], list(accs))
    rows, _ = rows_of(study)
    # cd (82, 84), (83, 82), (81, 80) − (81, 80), (81.5, 81), (79, 80)
    assert rows[("cd", "net1_resnet20")]["perturbed"] == {"baseline": "independent-perturb",
                                                          "diffs": pytest.approx({0: 4.0, 1: 1.0, 2: 0.0})}
    assert rows[("independent-perturb", "net1_resnet20")]["alone"] == {"baseline": "independent",
                                                                       "diffs": pytest.approx({0: 0.5, 1: 1.0, 2: 1.0})}
    assert rows[("cd-hetero", "net0_resnet20")]["perturbed"]["baseline"] == "vanilla-perturb"  # not a pair of NET


def test_controls_are_compared_with_vanilla_only(study):
    rows, _ = rows_of(study)
    # vanilla-perturb − vanilla: 0.5, 0.5, 1: mean 2/3, sd sqrt(((1/6)^2*2 + (1/3)^2)/2)
    perturb = rows[("vanilla-perturb", "net0_resnet20")]
    assert perturb["alone"]["baseline"] == "vanilla" and perturb["alone"]["diffs"] == pytest.approx({0: 0.5, 1: 0.5, 2: 1.0})
    assert ci(perturb["alone"]) == interval(2 / 3, math.sqrt(((1 / 6) ** 2 * 2 + (1 / 3) ** 2) / 2), 3, T3)
    assert perturb["perturbed"] is None
    # the independent groups' networks are the networks alone: nothing to compare them with
    for config, label in (("independent", "net1_resnet20"), ("independent-hetero", "net1_mobilenet_v1")):
        assert rows[(config, label)]["alone"] is None and rows[(config, label)]["perturbed"] is None
    for config in ("vanilla", "vanilla-other"):
        row = next(row for (name, _), row in rows.items() if name == config)
        assert row["alone"] is None and row["perturbed"] is None and row["ensemble"] is None


def test_ensembles_are_paired_with_their_independent_ensemble(study):
    rows, notes = rows_of(study)
    # cd − independent: 85-82, 84-81.5, 82.5-80 = 3, 2.5, 2.5: mean 8/3, sd sqrt(((1/3)^2 + (1/6)^2*2)/2)
    cd = rows[("cd", "ensemble")]
    assert cd["ensemble"]["baseline"] == "independent" and cd["ensemble"]["diffs"] == pytest.approx({0: 3.0, 1: 2.5, 2: 2.5})
    assert ci(cd["ensemble"]) == interval(8 / 3, math.sqrt(((1 / 3) ** 2 + (1 / 6) ** 2 * 2) / 2), 3, T3)
    # dml − independent: 1, 0.5, 1.5: mean 1, sd 0.5
    assert ci(rows[("dml", "ensemble")]["ensemble"]) == interval(1.0, 0.5, 3, T3)
    # cd-hetero (seeds 0, 1) − independent-hetero (seeds 0, 2): seed 0 only, 82 - 81; no interval
    hetero = rows[("cd-hetero", "ensemble")]["ensemble"]
    assert hetero["baseline"] == "independent-hetero" and hetero["diffs"] == pytest.approx({0: 1.0})
    assert "note: cd-hetero − independent-hetero paired over seeds [0] (n=1); independent-hetero lacks seeds [1]; " \
           "cd-hetero lacks seeds [2]" in notes
    assert rows[("independent", "ensemble")]["ensemble"] is None  # a control: no baseline of its own
    assert rows[("cd", "ensemble")]["alone"] is None and rows[("cd", "ensemble")]["train"] == {}


def test_branched_methods_ensembles_and_architecture_found_by_model(tmp_path):
    """ONE's branches and OKDDip's leader and peers are members; their ensembles meet independent-3.
    vanilla trained MobileNet and vanilla-other ResNet: the models decide, not the names."""
    root = str(tmp_path / "study")
    write_run(root, "vanilla", 0, "train", [M], [70.0])
    write_run(root, "vanilla-other", 0, "train", [R], [80.0])
    write_run(root, "independent-3", 0, "mutual", [R] * 3, [79.0, 80.0, 81.0, 83.0])
    write_run(root, "one", 0, "one", [R] * 3, [82.0, 81.0, 80.0, 84.5], labels=[f"branch{i}_{R}" for i in range(3)])
    write_run(root, "okddip", 0, "okddip", [R] * 4, [81.0, 80.0, 80.0, 80.0, 82.0],
              labels=[f"leader_{R}"] + [f"peer{i}_{R}" for i in range(3)])
    rows, notes = rows_of(root)
    assert rows[("one", f"branch0_{R}")]["alone"] == {"baseline": "vanilla-other", "diffs": {0: 2.0}}  # 82 - 80
    assert rows[("okddip", f"leader_{R}")]["alone"] == {"baseline": "vanilla-other", "diffs": {0: 1.0}}
    assert rows[("one", "ensemble")]["ensemble"] == {"baseline": "independent-3", "diffs": {0: 1.5}}  # 84.5 - 83
    assert rows[("okddip", "ensemble")]["ensemble"] == {"baseline": "independent-3", "diffs": {0: -1.0}}
    assert rows[("one", f"branch0_{R}")]["perturbed"] is None and "note: no vanilla-perturb run, so no − alone, perturbed" in notes
    # an architecture nobody trained alone, an ensemble baseline not in the study: said, not guessed
    write_run(root, "cd", 0, "competitive", ["vgg8", "vgg8"], [75.0, 75.0, 76.0])
    rows, notes = rows_of(root)
    assert rows[("cd", "net0_vgg8")]["alone"] is None and rows[("cd", "ensemble")]["ensemble"] is None
    assert "note: cd: no vgg8 trained alone (vanilla or vanilla-other), so no − alone" in notes
    assert "note: cd: no finished independent run, so no − independent ensemble" in notes


def test_training_accuracy_is_the_last_epochs(study):
    rows, _ = rows_of(study)
    assert rows[("vanilla", "net0_resnet20")]["train"] == {0: 99.0, 1: 99.5, 2: 100.0}
    assert rows[("cd", "net0_resnet20")]["train"] == {0: 97.0, 1: 98.0, 2: 99.0}
    assert rows[("cd", "net1_resnet20")]["train"] == {0: 100.0, 1: 100.0, 2: 100.0}
    assert rows[("dml", "net0_resnet20")]["train"] == {}  # no metrics.csv


def test_incomplete_missing_and_truncated_runs_are_reported(study, capsys):
    write_incomplete(study, "dml", 3)
    os.remove(os.path.join(study, "dml", "seed3", "args.json"))  # created, nothing written yet
    # a run stopped early (--stop-after) has results.json of an earlier epoch
    stopped = write_run(study, "cd", 3, "competitive", [R, R], [50.0, 50.0, 50.0])
    results = json.load(open(os.path.join(stopped, "results.json")))
    json.dump({**results, "epochs": 12}, open(os.path.join(stopped, "results.json"), "w"))
    # cd seed 1's metrics.csv lost its last epoch
    path = os.path.join(study, "cd", "seed1", "metrics.csv")
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").writelines(line for line in lines if not line.startswith("40,"))
    assert summarize.main([study]) == 0
    out = capsys.readouterr().out
    assert ("incomplete, not in the tables: dml/seed3 (empty; no results.json), cd/seed3 (results.json of epoch 12 of 40), "
            "cd-hetero/seed2 (args.json, last.pt; no results.json)") in out
    assert "warning: cd/seed1: metrics.csv stops at epoch 1 of 40 (truncated), so no training accuracy or leader share" in out
    assert "warning: dml/seed0: no metrics.csv, so no training accuracy" in out
    for line in ("note: cd-hetero − independent-hetero paired over seeds [0] (n=1); independent-hetero lacks seeds [1]; "
                 "cd-hetero lacks seeds [2]",
                 "note: cd-hetero − vanilla-perturb paired over seeds [0, 1] (n=2); cd-hetero lacks seeds [2]"):
        assert line in out.splitlines()
    # the truncated run keeps its test accuracy, but no training accuracy from an earlier epoch (10.0)
    assert "| cd | net0_resnet20 | 0/3 | 98.00 ± 1.41 | 82.00 ± 1.00 (n=3) |" in out  # seeds 0 and 2: 97, 99
    assert "cd: 0.75 / 0.75 (seeds 0, 2)" in out


def test_leadership_is_the_most_frequent_leaders_mean_share(study):
    runs = summarize.load_study(study)["runs"]
    # epoch shares (0.5, 1 - seed/2) for net0 and (0.5, seed/2) for net1: means 0.75, 0.5, 0.75 (net1 in seed 2);
    # cd-hetero: (0.5, 0.9) and (0.5, 0.1): 0.7
    assert [run["leader"] for run in runs if run["config"] == "cd"] == [0.75, 0.5, 0.75]
    assert all(run["leader"] is None for run in runs if run["script"] != "competitive")  # no leader column
    assert summarize.leadership(runs) == "cd: 0.75 / 0.50 / 0.75 (seeds 0, 1, 2)\ncd-hetero: 0.70 / 0.70 (seeds 0, 1)"


def test_the_table_and_the_plot(study, capsys):
    assert summarize.main([study]) == 0
    out = capsys.readouterr().out
    # − independent's net0: 1.5, 2, 3: 13/6 ± 4.303 * sqrt(7/12) / sqrt(3) = 2.17 ± 1.90
    assert ("| cd | net0_resnet20 | 0/3 | 98.00 ± 1.00 | 82.00 ± 1.00 (n=3) | 82.00 / 83.00 / 81.00 | "
            "+2.17 [+0.27, +4.06] (independent, n=3) | +1.33 [+0.62, +2.05] (vanilla-perturb, n=3) | – |") in out
    # 85, 84, 82.5: mean 83.83, sd sqrt(((7/6)^2 + (1/6)^2 + (4/3)^2)/2) = 1.26; − independent 8/3 ± 4.303*sqrt(1/12)/sqrt(3)
    assert ("| cd | ensemble | 0/3 | – | 83.83 ± 1.26 (n=3) | 85.00 / 84.00 / 82.50 | – | – | "
            "+2.67 [+1.95, +3.38] (independent, n=3) |") in out
    assert "| cd-hetero | net1_mobilenet_v1 | 0/2 | 90.50 ± 0.71 | 74.25 ± 0.35 (n=2) | 74.00 / 74.50 | " \
           "+1.50 (independent-hetero, n=1) | – | – |" in out
    assert "| cd-hetero | ensemble | 0/2 | – | 82.50 ± 0.71 (n=2) | 82.00 / 83.00 | – | – | +1.00 (independent-hetero, n=1) |" in out
    order = [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert list(dict.fromkeys(order)) == ["vanilla", "vanilla-perturb", "vanilla-other", "independent", "independent-hetero",
                                          "dml", "cd", "cd-hetero"]  # compare.CONFIGS order
    assert not os.path.exists(os.path.join(study, "study.png.tmp"))
    with Image.open(os.path.join(study, "study.png")) as image:
        image.verify()
        assert image.format == "PNG" and image.width > 500 and image.height > 16 * 20


def test_configurations_outside_compare_come_last_by_name(study):
    write_run(study, "zz-extra", 0, "train", [R], [81.0])
    write_run(study, "aa-extra", 0, "mutual", [R, R], [81.0, 81.0, 82.0])
    rows, _ = rows_of(study)
    configs = list(dict.fromkeys(config for config, _ in rows))
    assert configs[-3:] == ["cd-hetero", "aa-extra", "zz-extra"]
    assert rows[("zz-extra", "net0_resnet20")]["alone"]["diffs"] == {0: 1.0}  # not a control: 81 - 80


def test_the_compact_table_has_one_line_per_configuration(study, capsys):
    lines = summarize.compact_table(study).splitlines()
    # every number by hand from the fixture; intervals mean ± t * sd / sqrt(n), t = 4.303 (n=3) or 12.706 (n=2):
    # vanilla-perturb − vanilla: 0.5, 0.5, 1 -> 2/3 ± 4.303 * 0.2887 / 1.732 = 0.667 ± 0.717
    # the independent groups are their networks alone: no − alone
    # dml − independent, member by member: (0.5, 0.5, 2) -> 1 ± 4.303 * 0.866 / 1.732 = 1 ± 2.15;
    #   (2.5, 0.5, 2) -> 1.667 ± 4.303 * 1.041 / 1.732 = 1.667 ± 2.59
    #   − vanilla-perturb: (0.5, 0, 0) -> 0.167 ± 0.717; (1.5, -1, 1) -> 0.5 ± 4.303 * 1.3229 / 1.732 = 0.5 ± 3.286
    #   ensemble − independent: (1, 0.5, 1.5) -> 1 ± 4.303 * 0.5 / 1.732 = 1 ± 1.242
    # cd − independent: (1.5, 2, 3) -> 2.167 ± 4.303 * 0.764 / 1.732 = 2.167 ± 1.897; (4.5, 2, 1) -> 2.5 ± 4.303 * 1.803 / 1.732
    #   = 2.5 ± 4.48; − vanilla-perturb: (1.5, 1.5, 1) -> 1.333 ± 0.717; (3.5, 0.5, 0) -> 1.333 ± 4.303 * 1.8930 / 1.732
    #   = 1.333 ± 4.703; ensemble − independent: (3, 2.5, 2.5) -> 2.667 ± 0.717
    # cd-hetero − independent-hetero (seed 0 only): 81 - 80, 74 - 72.5; − vanilla-perturb: (0.5, 0.5);
    #   ensemble − independent-hetero: seed 0 only, 82 - 81
    assert lines == [
        "| configuration | models | n | diverged | train acc | test acc | − alone [95% CI] | − alone, perturbed [95% CI] | "
        "ensemble | − independent ensemble [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| vanilla | resnet20 | 3 | 0/3 | 99.50 ± 0.50 | 80.00 ± 1.00 | – | – | – | – |",
        "| vanilla-perturb | resnet20 | 3 | 0/3 | 98.50 ± 0.50 | 80.67 ± 0.76 | +0.67 [-0.05, +1.38] | – | – | – |",
        "| vanilla-other | mobilenet_v1 | 3 | 0/3 | 91.00 ± 1.00 | 72.00 ± 1.00 | – | – | – | – |",
        "| independent | resnet20 + resnet20 | 3 | 0/3 | 99.00 ± 0.00; 99.00 ± 0.00 | 79.83 ± 1.61; 79.50 ± 0.50 | – | – | "
        "81.17 ± 1.04 | – |",
        "| independent-hetero | resnet20 + mobilenet_v1 | 2 | 0/2 | – | 79.75 ± 0.35; 71.25 ± 1.77 | – | – | 80.50 ± 0.71 | – |",
        "| dml | resnet20 + resnet20 | 3 | 0/3 | – | 80.83 ± 0.76; 81.17 ± 0.76 | +1.00 [-1.15, +3.15]; +1.67 [-0.92, +4.25] | "
        "+0.17 [-0.55, +0.88]; +0.50 [-2.79, +3.79] | 82.17 ± 0.76 | +1.00 [-0.24, +2.24] |",
        "| cd | resnet20 + resnet20 | 3 | 0/3 | 98.00 ± 1.00; 100.00 ± 0.00 | 82.00 ± 1.00; 82.00 ± 2.00 | "
        "+2.17 [+0.27, +4.06]; +2.50 [-1.98, +6.98] | +1.33 [+0.62, +2.05]; +1.33 [-3.37, +6.04] | 83.83 ± 1.26 | "
        "+2.67 [+1.95, +3.38] |",
        "| cd-hetero | resnet20 + mobilenet_v1 | 2 | 0/2 | 96.50 ± 0.71; 90.50 ± 0.71 | 81.50 ± 0.71; 74.25 ± 0.35 | "
        "+1.00 (n=1); +1.50 (n=1) | +0.50 [+0.50, +0.50]; – | 82.50 ± 0.71 | +1.00 (n=1) |",
    ]
    assert summarize.main([study, "--compact"]) == 0  # the CLI prints the same table
    assert "\n".join(lines) in capsys.readouterr().out
    assert summarize.compact_table(study) == "\n".join(lines)  # deterministic


def test_seeds_summarizes_only_the_runs_of_those_seeds(study, capsys):
    """--seeds 0 1: vanilla's network 80.5 ± 0.71 over its seeds 0 and 1 (80, 81), not 80 over all three."""
    assert summarize.main([study, "--seeds", "0", "1", "--compact"]) == 0
    out = capsys.readouterr().out
    assert "| vanilla | resnet20 | 2 | 0/2 | 99.25 ± 0.35 | 80.50 ± 0.71 | – | – | – | – |" in out
    assert "seeds [0, 1];" in out and "seeds [0, 1, 2]" not in out
    assert summarize.main([study, "--seeds", "7"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no finished run of seeds 7 under '{study}'"


def refused(study, capsys):
    """The one error line of a refused study."""
    assert summarize.main([study]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    return captured.err.strip()


@pytest.mark.parametrize("change, flag", [({"dataset": "mnist"}, "--dataset"), ({"epochs": 20}, "--epochs"),
                                          ({"train_subset": 2000}, "--train-subset"),
                                          ({"label_smoothing": 0.1}, "--label-smoothing")])
def test_mixed_datasets_or_budgets_are_refused_in_one_line(study, capsys, change, flag):
    write_run(study, "cd-3", 0, "competitive", [R] * 3, [80.0] * 4, **change)
    assert refused(study, capsys).startswith(f"error: runs differ in {flag}")


def test_a_directory_that_is_not_a_seed_is_refused(study, capsys):
    shutil.copytree(os.path.join(study, "cd", "seed1"), os.path.join(study, "cd", "seed1_old"))  # an older seed 1
    err = refused(study, capsys)
    assert err.startswith("error: ") and os.path.join("cd", "seed1_old") in err and "not a run directory" in err


@pytest.mark.parametrize("finished", [True, False])
def test_a_run_whose_seed_is_not_its_directorys_is_refused(study, capsys, finished):
    run_dir = write_run(study, "cd", 5, "competitive", [R, R], [80.0] * 3) if finished else write_incomplete(study, "cd", 5)
    json.dump({**BUDGET, "seed": 4}, open(os.path.join(run_dir, "args.json"), "w"))
    err = refused(study, capsys)
    assert os.path.join("cd", "seed5", "args.json") in err and "seed 4" in err


@pytest.mark.parametrize("name, text, message", [("results.json", "[]", "not a JSON object"),
                                                 ("results.json", "{\"networks\": [", "not valid JSON"),
                                                 ("results.json", "{\"networks\": []}", "no 'networks' list"),
                                                 ("results.json", "{\"networks\": [{\"net\": \"net0_resnet20\"}]}",
                                                  "networks[0] lacks"),
                                                 ("args.json", "[]", "not a JSON object"),
                                                 ("args.json", "\x00\x01", "not valid JSON")])
def test_bad_json_is_refused_in_one_line_naming_the_file(study, capsys, name, text, message):
    open(os.path.join(study, "dml", "seed1", name), "w").write(text)
    err = refused(study, capsys)
    assert os.path.join("dml", "seed1", name) in err and message in err


def test_a_metrics_csv_with_a_byte_order_mark_is_read(study):
    path = os.path.join(study, "cd", "seed0", "metrics.csv")
    text = open(path).read()
    open(path, "w", encoding="utf-8-sig").write(text)  # as a spreadsheet saves it
    assert open(path, "rb").read(3) == b"\xef\xbb\xbf"
    series = metrics.read_metrics(os.path.dirname(path))
    assert series["net0_resnet20"]["train_acc"] == [(1, 10.0), (40, 97.0)]
    rows, _ = rows_of(study)
    assert rows[("cd", "net0_resnet20")]["train"] == {0: 97.0, 1: 98.0, 2: 99.0}


@pytest.mark.parametrize("content, message", [
    ("epoch,net,model,train_acc\n1,net0_resnet20,resnet20,10\n2x,net0_resnet20,resnet20,20\n", "line 3: epoch '2x' is not a number"),
    ("epoch,net,model,train_acc\n1,net0_resnet20,resnet20,ten\n", "line 2: train_acc 'ten' is not a number"),
    (bytes(range(128, 256)) * 8, "not UTF-8 text"),
    ("a,b\n1,2\n", "line 1: the header has no epoch and net columns"),
    ("epoch,net,model\n1,net0_resnet20," + "x" * 200_000 + "\n", "line 2: field larger than field limit"),
])
def test_a_bad_metrics_csv_is_refused_in_one_line(study, capsys, content, message):
    run_dir = os.path.join(study, "cd", "seed2")
    with open(os.path.join(run_dir, "metrics.csv"), "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as error:
        metrics.read_metrics(run_dir)
    assert str(error.value).startswith(os.path.join(run_dir, "metrics.csv")) and message in str(error.value)
    assert len(str(error.value).splitlines()) == 1
    err = refused(study, capsys)
    assert err.startswith("error: ") and os.path.join("seed2", "metrics.csv") in err and message in err


def test_without_matplotlib_the_error_says_how_to_install_it(study, capsys, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert "pip install matplotlib" in refused(study, capsys)
    assert not os.path.exists(os.path.join(study, "study.png"))


def test_an_empty_directory_is_one_line(tmp_path, capsys):
    assert "no finished run" in refused(str(tmp_path), capsys)
    assert "is not a directory" in refused(str(tmp_path / "missing"), capsys)


def test_compare_runs_each_configuration_once_then_skips_it(tmp_path, capsys):
    out = str(tmp_path / "study")
    argv = ["--out", out, "--seeds", "0", "--configs", "vanilla", "--", "--dataset", "fake", "--img-size", "16",
            "--train-subset", "64", "--val-size", "0", "--batch-size", "32", "--epochs", "1", "--workers", "0",
            "--device", "cpu"]
    assert compare.main(compare.get_args_parser().parse_args(argv)) == 0
    assert os.path.exists(os.path.join(out, "vanilla", "seed0", "results.json"))
    assert "--model resnet20" in open(os.path.join(out, "logs", "vanilla-seed0.log")).read()
    assert compare.main(compare.get_args_parser().parse_args(argv)) == 0
    assert "vanilla seed 0: done (already done)" in capsys.readouterr().out
    # and summarize reads what the training script wrote
    assert summarize.main([out, "--compact"]) == 0
    assert "| vanilla | resnet20 | 1 |" in capsys.readouterr().out


def test_bn_perturbed_reports_every_condition(tmp_path, capsys):
    """experiments/bn_perturbed.py on a tiny trained run: one row per condition, and 'clean' is the reference."""
    import bn_perturbed
    import stopping
    import train
    stopping.launch(train.main, train.get_args_parser(), [
        "--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "0", "--batch-size", "32",
        "--device", "cpu", "--workers", "0", "--no-progress", "--model", "resnet20", "--epochs", "1",
        "--out-dir", str(tmp_path / "run")])
    capsys.readouterr()
    assert bn_perturbed.main(bn_perturbed.get_args_parser().parse_args(
        [str(tmp_path / "run" / "last.pt"), "--batches", "1", "--batch-size", "16"])) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "test acc" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == ["as saved", "clean", *bn_perturbed.PERTURBATIONS]
    assert rows[1].endswith("| +0.00 |")


def test_the_headline_table_by_hand(study):
    """The README's table: a group's networks averaged per seed, paired with the network alone; the
    ensemble paired with the independent ensemble; 95 % t-intervals (t(0.975, 2) = 4.303)."""
    lines = summarize.compact_table(study, summarize.headline).splitlines()
    dml = next(line for line in lines if line.startswith("| dml |"))
    # networks per seed: (81 + 82) / 2 = 81.5, (81.5 + 80.5) / 2 = 81.0, (80 + 81) / 2 = 80.5: 81.00 ± 0.50
    # − alone, member by member with independent's (80.5, 79.5), (81, 80), (78, 79): per seed (0.5 + 2.5) / 2 = 1.5,
    # (0.5 + 0.5) / 2 = 0.5, (2 + 2) / 2 = 2: mean 4/3, sd sqrt(7/12), half 4.303 * 0.764 / sqrt(3) = 1.90
    # ensemble (83, 82, 81.5): 82.17 ± 0.76; − independent (82, 81.5, 80): 1.0, 0.5, 1.5: half 4.303 * 0.5 / sqrt(3) = 1.24
    assert dml == "| dml | 2 × resnet20 | 3 | 0/3 | 81.00 ± 0.50 | +1.33 [-0.56, +3.23] | 82.17 ± 0.76 | +1.00 [-0.24, +2.24] |"
    assert lines[2].startswith("| vanilla | resnet20 | 3 | 0/3 | 80.00 ± 1.00 | – |")


def test_versus_pairs_two_methods_by_hand(study, capsys):
    """--versus A:B: A's deployed networks (averaged per seed) minus B's, and A's ensemble minus B's,
    over the seeds both have; a mixed pair compares each architecture apart."""
    png = os.path.join(study, "x.png")
    write_run(study, "cd-3", 0, "competitive", [R] * 3, [80.0, 81.0, 82.0, 83.0])
    assert summarize.main([study, "--png", png, "--versus", "cd:dml", "cd-hetero:independent-hetero", "cd-3:cd",
                           "cd:vanilla"]) == 0
    out = capsys.readouterr().out
    # cd per seed (82+84)/2 = 83, (83+82)/2 = 82.5, (81+80)/2 = 80.5; dml 81.5, 81.0, 80.5: 1.5, 1.5, 0.0:
    # mean 1.00, sd 0.866, half 4.303 * 0.866 / sqrt(3) = 2.15. Ensembles (85, 84, 82.5) - (83, 82, 81.5):
    # 2, 2, 1: mean 1.67, sd 0.577, half 4.303 * 0.577 / sqrt(3) = 1.43
    # p-values (two-sided, 2 degrees of freedom: 1 - t / sqrt(t^2 + 2)): cd − dml t = 1 / (0.866 / sqrt 3) = 2,
    # p = 0.1835; ensembles t = 5, p = 0.0377; cd − vanilla (below) t = 4, p = 0.0572. Holm over these three
    # (the n=1 comparisons have none): 0.0377 x 3 = 0.113, max(0.113, 0.0572 x 2) = 0.114, max(0.114, 0.1835) = 0.184
    assert "| cd − dml | +1.00 [-1.15, +3.15] (n=3) | 0.184 | +1.67 [+0.23, +3.10] (n=3) | 0.113 | 0/3, 0/3 |" in out
    # only seed 0 is finished on both sides: 81 - 80, 74 - 72.5, and the ensembles 82 - 81
    assert "| cd-hetero − independent-hetero | +1.00 (n=1); +1.50 (n=1) | –; – | +1.00 (n=1) | – | 0/2, 0/2 |" in out
    # three networks against two: (80 + 81 + 82) / 3 - 83 = -2.00; ensembles of 3 and 2 are not compared
    assert "| cd-3 − cd | -2.00 (n=1) | – | – (unlike ensembles) | – | 0/1, 0/3 |" in out
    # against one network: (83, 82.5, 80.5) - (80, 81, 79) = 3, 1.5, 1.5: mean 2.00, sd 0.866, half 2.15
    assert "| cd − vanilla | +2.00 [-0.15, +4.15] (n=3) | 0.114 | – | – | 0/3, 0/3 |" in out


@pytest.mark.parametrize("pair, message", [
    ("cd:nope", "--versus cd:nope: no finished run of 'nope'; the study has: vanilla, "),
    ("cd:vanilla-other", "--versus cd:vanilla-other: cd deploys resnet20, vanilla-other mobilenet_v1; compare "),
    ("cd:cd-hetero", "--versus cd:cd-hetero: cd deploys resnet20, cd-hetero resnet20 and mobilenet_v1; "),
])
def test_versus_refuses_unknown_or_unlike_configurations_in_one_line(study, capsys, pair, message):
    assert summarize.main([study, "--versus", pair]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: " + message), err


def test_versus_needs_two_names(study, capsys):
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([study, "--versus", "cd"])
    assert exit_info.value.code == 2 and "'cd' is not A:B" in capsys.readouterr().err


def write_times(run_dir, labels, seconds_per_epoch, epochs=40):
    """A metrics.csv whose networks' rows carry epoch_time_s for `epochs` epochs."""
    with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
        f.write("epoch,net,model,train_acc,epoch_time_s\n")
        f.writelines(f"{epoch},{label},resnet20,99.0,{seconds_per_epoch}\n"
                     for epoch in range(1, epochs + 1) for label in labels)


def test_training_time_is_the_epoch_times_summed(tmp_path, capsys):
    """vanilla: 40 epochs of 3 s and of 6 s (2 and 4 min, mean 3.0); dml: 40 of 15 s (10 min), and one
    run whose metrics.csv stops at epoch 39, which is untimed (and truncated)."""
    root = str(tmp_path / "study")
    for seed, seconds in ((0, 3.0), (1, 6.0)):
        write_times(write_run(root, "vanilla", seed, "train", [R], [80.0]), ["net0_resnet20"], seconds)
    write_times(write_run(root, "dml", 0, "mutual", [R, R], [80.0, 80.0, 81.0]), ["net0_resnet20", "net1_resnet20"], 15.0)
    write_times(write_run(root, "dml", 1, "mutual", [R, R], [80.0, 80.0, 81.0]), ["net0_resnet20", "net1_resnet20"],
                15.0, epochs=39)
    assert summarize.main([root, "--png", os.path.join(root, "x.png")]) == 0
    # in all (120 + 240 + 600) s = 0.27 h
    assert ("training time per run (min), mean over seeds: vanilla 3.0, dml 10.0; in all 0.27 h over 3 runs "
            "(1 untimed)") in capsys.readouterr().out


def test_an_unwritable_png_is_one_line(study, tmp_path, capsys):
    assert summarize.main([study, "--png", str(tmp_path / "no" / "such" / "dir" / "study.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write the plot") and "No such file or directory" in err[0]


def test_the_readme_table_is_written_between_its_markers(study, tmp_path, capsys):
    readme = tmp_path / "README.md"
    begin, end = summarize.README_MARKERS
    readme.write_text(f"# Title\n\n{begin}\nan old table\n{end}\n\nafter\n")
    assert summarize.main([study, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n{begin}\n| configuration |") and text.endswith(f"|\n{end}\n\nafter\n")
    assert summarize.readme_table(text) == summarize.compact_table(study, summarize.headline)
    assert summarize.main([study, "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent


def test_a_readme_without_markers_is_one_line_and_unchanged(study, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    assert summarize.main([study, "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no table to replace" in err[0] and summarize.README_MARKERS[0] in err[0]
    assert readme.read_text() == "no table here\n" and not (tmp_path / "README.md.tmp").exists()


def dry_run(tmp_path, capsys, *argv):
    """compare.py --dry-run's commands, each as (script, its flags after the script's path)."""
    capsys.readouterr()
    assert compare.main(compare.get_args_parser().parse_args(["--out", str(tmp_path), "--dry-run", *argv])) == 0
    lines = capsys.readouterr().out.splitlines()
    return [(os.path.basename(line.split()[1]), line.split()[2:]) for line in lines]


def test_a_grid_makes_one_study_per_combination_and_configurations_of_their_own(tmp_path, capsys):
    runs = dry_run(tmp_path, capsys, "--seeds", "0", "--configs", "vanilla", "kdcl-naive", "--grid", "lr=0.1,0.05",
                   "clip-grad=none,2", "kdcl-naive:temperature=1,4", "--", "--epochs", "3")
    assert len(runs) == 4 * (1 + 2)  # 4 combinations; vanilla once, kdcl-naive at each temperature
    dirs = [flags[flags.index("--out-dir") + 1] for _, flags in runs]
    assert dirs[:3] == [str(tmp_path / "lr=0.1_clip-grad=none" / name / "seed0")
                        for name in ("vanilla", "kdcl-naive+temperature=1", "kdcl-naive+temperature=4")]
    script, flags = runs[5]  # lr 0.1, clipped at 2, kdcl-naive at T = 4
    assert script == "train_kdcl.py" and dirs[5] == str(tmp_path / "lr=0.1_clip-grad=2" / "kdcl-naive+temperature=4" / "seed0")
    assert flags[flags.index("--lr") + 1] == "0.1" and flags[flags.index("--clip-grad") + 1] == "2"
    assert flags[flags.index("--temperature") + 1] == "4" and flags.count("--temperature") == 1
    assert "--clip-grad" not in runs[0][1] and "--temperature" not in runs[0][1]  # none: the flag left out


@pytest.mark.parametrize("grid, message", [
    (["lr"], "is not [CONFIGS:]FLAG=V1,V2"), (["lr=0.1,0.1"], "give each value once"),
    (["epochs=2,3"], "which the flags after -- also give"), (["cd:temperature=1,2"], "'cd' is not among the configurations run"),
    (["lr=0.1,0.2", "vanilla:lr=0.3"], "sweeps --lr twice")])
def test_a_grid_that_cannot_run_is_one_line(tmp_path, capsys, grid, message):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(compare.get_args_parser().parse_args(["--out", str(tmp_path), "--configs", "vanilla", "--grid",
                                                          *grid, "--", "--epochs", "3"]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not os.listdir(tmp_path)


def test_a_run_made_to_diverge_is_marked_and_a_stable_one_is_not(tmp_path, capsys):
    """Real runs: SGD at lr 10 drives the training cross-entropy far above ln 10 after epoch 5, and
    finite (so the run finishes); at lr 0.05 it falls below. The diverged run stays in the tables."""
    import stopping
    import train
    for name, lr in (("calm", "0.05"), ("wild", "10")):
        stopping.launch(train.main, train.get_args_parser(), [
            "--dataset", "fake", "--img-size", "16", "--train-subset", "128", "--val-size", "32", "--batch-size", "32",
            "--epochs", "8", "--eval-every", "8", "--warmup-epochs", "0", "--lr", lr, "--device", "cpu", "--workers", "0",
            "--no-progress", "--model", "resnet20", "--out-dir", str(tmp_path / name / "vanilla" / "seed0")])
    calm, wild = (summarize.load_study(str(tmp_path / name))["runs"][0] for name in ("calm", "wild"))
    assert calm["diverged"] == []
    ce = {epoch: value for epoch, value in metrics.read_metrics(str(tmp_path / "wild" / "vanilla" / "seed0"))[
        "net0_resnet20"]["train_loss"]}
    worst = max((value, epoch) for epoch, value in ce.items() if epoch > 5)
    assert worst[0] > math.log(10)
    assert wild["diverged"] == [{"net": "net0_resnet20", "epoch": worst[1], "ce": worst[0]}]
    capsys.readouterr()
    assert summarize.main([str(tmp_path / "wild")]) == 0
    out = capsys.readouterr().out
    assert f"| vanilla | net0_resnet20 | 1/1 |" in out and f"{wild['test']['net0_resnet20']:.2f}×" in out


def test_the_divergence_rule_spares_the_first_epochs_and_reads_train_ce(tmp_path):
    run_dir = write_run(str(tmp_path / "study"), "cd", 0, "competitive", [R, R], [80.0, 80.0, 81.0])
    with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
        f.write("epoch,net,model,train_loss,train_ce\n")
        for epoch in range(1, 41):
            f.write(f"{epoch},net0_resnet20,{R},9.0,{3.0 if epoch <= 5 else 0.5}\n")  # loss (with KD) high, CE calm
            f.write(f"{epoch},net1_resnet20,{R},1.0,{2.31 if epoch == 17 else 0.5}\n")  # ln 10 = 2.3026
    (run,) = summarize.load_study(str(tmp_path / "study"))["runs"]
    assert run["diverged"] == [{"net": "net1_resnet20", "epoch": 17, "ce": 2.31}]


def test_split_val_reads_the_validation_accuracies(study, capsys):
    assert summarize.main([study, "--split", "val"]) == 2  # the fixture's runs have none
    assert "has no validation accuracy" in capsys.readouterr().err
    for config, seeds in (("vanilla", 3), ("vanilla-perturb", 3), ("vanilla-other", 3), ("independent", 3), ("dml", 3),
                          ("cd", 3), ("independent-hetero", (0, 2)), ("cd-hetero", 2)):
        for seed in (range(seeds) if isinstance(seeds, int) else seeds):
            path = os.path.join(study, config, f"seed{seed}", "results.json")
            results = json.load(open(path))
            for i, network in enumerate(results["networks"]):
                network["final_val_acc"] = 50.0 + seed + i
            json.dump(results, open(path, "w"))
    rows = {(row["config"], row["label"]): row for row in summarize.summarize(summarize.load_study(study), "val")[0]}
    assert rows[("cd", "net1_resnet20")]["values"] == {0: 51.0, 1: 52.0, 2: 53.0}
    assert rows[("cd", "ensemble")]["values"] == {0: 52.0, 1: 53.0, 2: 54.0}
    assert summarize.headline(list(rows.values())).splitlines()[0].startswith("| configuration | models | seeds | diverged | val acc |")


def test_a_grid_is_summarized_setting_by_setting_then_together(tmp_path, capsys):
    root = tmp_path / "grid"
    for point, accs in (("lr=0.05", (80.0, 81.0)), ("lr=0.1", (82.0, 83.0))):
        for seed, acc in enumerate(accs):
            write_run(str(root / point), "vanilla", seed, "train", [R], [acc], lr=[float(point[3:])])
            write_run(str(root / point), "dml", seed, "mutual", [R, R], [acc + 1, acc + 2, acc + 3], lr=[float(point[3:])])
    os.makedirs(root / "logs")
    assert summarize.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert out.index("## lr=0.05") < out.index("## lr=0.1") < out.index(f"## every setting of {root}")
    assert "| lr=0.05 | vanilla | resnet20 | 2 | 0/2 | 80.50 ± 0.71 | – |" in out
    assert "| lr=0.1 | dml | 2 × resnet20 | 2 | 0/2 | 84.00 ± 0.71 | 85.50 ± 0.71 |" in out  # (83 + 84) / 2, (84 + 85) / 2
    assert (root / "lr=0.1" / "study.png").exists()
    assert summarize.main([str(root), "--readme", str(tmp_path / "README.md")]) == 2
    assert "is a --grid of 2 studies" in capsys.readouterr().err


def test_the_readme_holds_named_tables(study, tmp_path):
    readme = tmp_path / "README.md"
    first, second = summarize.readme_markers("study"), summarize.readme_markers("authors")
    readme.write_text(f"{first[0]}\n{first[1]}\ntext\n{second[0]}\nold\n{second[1]}\n")
    assert summarize.main([study, "--readme", str(readme), "--readme-table", "authors"]) == 0
    text = readme.read_text()
    assert summarize.readme_table(text, "study") == "" and summarize.readme_table(text, "authors").startswith("| configuration")


def test_same_numbers_hashes_the_state_and_the_metrics_without_their_times(tmp_path):
    import same_numbers
    import torch
    state = {"nets": [{"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}], "optimizers": [{"state": {}}]}
    torch.save(state, tmp_path / "a.pt")
    torch.save(state, tmp_path / "b.pt")
    state["nets"][0]["w"][1, 2] = 5.000001
    torch.save(state, tmp_path / "c.pt")
    assert same_numbers.state_hash(tmp_path / "a.pt") == same_numbers.state_hash(tmp_path / "b.pt")
    assert same_numbers.state_hash(tmp_path / "a.pt") != same_numbers.state_hash(tmp_path / "c.pt")
    (tmp_path / "m1.csv").write_text("epoch,net,train_loss,epoch_time_s,images_per_s\n1,net0,2.5,3.1,100\n")
    (tmp_path / "m2.csv").write_text("epoch,net,train_loss,epoch_time_s,images_per_s\n1,net0,2.5,9.9,42\n")
    (tmp_path / "m3.csv").write_text("epoch,net,train_loss,epoch_time_s,images_per_s\n1,net0,2.6,3.1,100\n")
    hashes = [same_numbers.metrics_hash(tmp_path / f"m{i}.csv") for i in (1, 2, 3)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_runs_recorded_with_their_computed_values_apart_share_a_budget_with_older_ones(study):
    """args.json of newer runs keeps what a run computed under "resolved" (their flags hold null there): a
    study mixing them with older runs compares the values they trained with."""
    run_dir = write_run(study, "cd-3", 0, "competitive", [R] * 3, [80.0] * 4, img_size=None, lr=None,
                        resolved={"img_size": 28, "lr": [0.1]})
    runs = summarize.load_study(study)["runs"]
    newer = next(run for run in runs if run["config"] == "cd-3")
    assert newer["args"]["img_size"] == 28 and newer["args"]["lr"] == [0.1] and os.path.isdir(run_dir)
