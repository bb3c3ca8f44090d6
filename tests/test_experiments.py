"""experiments/compare.py (the study's runs) and experiments/summarize.py (its table and plot)."""
import json
import math
import os
import sys

import pytest
from PIL import Image

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402
import summarize  # noqa: E402

BUDGET = {"dataset": "fashion-mnist", "train_subset": 1000, "val_size": 0, "img_size": 28, "epochs": 40,
          "batch_size": 128, "optimizer": ["sgd"], "lr": [0.1], "weight_decay": [0.0005], "schedule": "cosine",
          "warmup_epochs": 1.0, "amp": "auto"}


def write_run(study, config, seed, script, models, accs, train=None, leader=None, **changes):
    """A finished run directory as the training scripts leave it (only what summarize.py reads);
    `train` and `leader`: the networks' last-epoch training accuracies and leader shares, written to
    metrics.csv after a first epoch (leader share 0.5 each)."""
    run_dir = os.path.join(study, config, f"seed{seed}")
    os.makedirs(run_dir)
    labels = [f"net{i}_{m}" for i, m in enumerate(models)] + (["ensemble"] if len(models) > 1 else [])
    networks = [{"net": label, "model": (models + ["+".join(models)])[i], "final_test_acc": acc}
                for i, (label, acc) in enumerate(zip(labels, accs))]
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"script": script, "dataset": "fashion-mnist", "networks": networks}, f)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({**BUDGET, "seed": seed, **changes}, f)
    if train is not None:
        none = [""] * len(models)
        rows = [(1, [10.0] * len(models), [0.5] * len(models) if leader else none), (2, train, leader or none)]
        with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
            f.write("epoch,net,model,train_acc,train_leader_share,test_acc\n")
            for epoch, epoch_train, epoch_leader in rows:
                f.writelines(f"{epoch},{label},{model},{acc},{share},\n"
                             for label, model, acc, share in zip(labels, models, epoch_train, epoch_leader))
            if len(models) > 1:
                f.write(f"2,ensemble,{'+'.join(models)},,,{accs[-1]}\n")


@pytest.fixture
def study(tmp_path):
    root = str(tmp_path / "study")
    for seed, (alone, dml, cd) in enumerate([(80.0, (81.0, 82.0, 83.0), (82.0, 84.0, 85.0)),
                                             (81.0, (81.5, 80.5, 82.0), (83.0, 82.0, 84.0)),
                                             (79.0, (80.0, 81.0, 81.5), (81.0, 80.0, 82.5))]):
        write_run(root, "vanilla", seed, "train", ["resnet20"], [alone], train=[99.0 + seed / 2])
        write_run(root, "dml", seed, "mutual", ["resnet20", "resnet20"], list(dml))  # no metrics.csv
        write_run(root, "cd", seed, "competitive", ["resnet20", "resnet20"], list(cd), train=[97.0 + seed, 100.0],
                  leader=[1.0 - seed / 2, seed / 2])
    return root


def test_mean_std_and_paired_differences_match_hand_computation(study):
    rows = {(row["config"], row["label"]): row for row in summarize.summarize(summarize.load_runs(study))}
    cd0 = rows[("cd", "net0 resnet20")]
    assert cd0["values"] == {0: 82.0, 1: 83.0, 2: 81.0}
    assert summarize.mean_std(list(cd0["values"].values())) == pytest.approx((82.0, 1.0))  # sample std
    # paired with vanilla of the same seed: 82-80, 83-81, 81-79
    assert cd0["vs_vanilla"] == pytest.approx([2.0, 2.0, 2.0])
    # paired with DML's net0 of the same seed: 82-81, 83-81.5, 81-80
    assert cd0["vs_dml"] == pytest.approx([1.0, 1.5, 1.0])
    ensemble = rows[("cd", "ensemble")]
    assert ensemble["vs_vanilla"] == pytest.approx([5.0, 3.0, 3.5]) and ensemble["vs_dml"] == pytest.approx([2.0, 2.0, 1.0])
    mean, std = summarize.mean_std(ensemble["vs_dml"])
    assert mean == pytest.approx(5 / 3) and std == pytest.approx(math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2))
    assert rows[("vanilla", "net0 resnet20")]["vs_vanilla"] is None and rows[("dml", "ensemble")]["vs_dml"] is None
    # the last epoch's training accuracy, per seed; none for an ensemble or a run without metrics.csv
    assert rows[("vanilla", "net0 resnet20")]["train"] == {0: 99.0, 1: 99.5, 2: 100.0}
    assert cd0["train"] == {0: 97.0, 1: 98.0, 2: 99.0} and rows[("cd", "net1 resnet20")]["train"] == {0: 100.0, 1: 100.0, 2: 100.0}
    assert ensemble["train"] == {} and rows[("dml", "net0 resnet20")]["train"] == {}


def test_leadership_is_the_most_frequent_leaders_mean_share(study):
    runs = summarize.load_runs(study)
    # epoch shares (0.5, 1 - seed/2) for net0 and (0.5, seed/2) for net1: means 0.75, 0.5, 0.75 (net1 in seed 2)
    assert [run["leader"] for run in sorted(runs, key=lambda run: run["seed"]) if run["config"] == "cd"] == [0.75, 0.5, 0.75]
    assert all(run["leader"] is None for run in runs if run["config"] != "cd")  # no leader column
    assert summarize.leadership(runs) == "cd: 0.75 / 0.50 / 0.75 (seeds 0, 1, 2)"


def test_the_table_and_the_plot(study, capsys):
    assert summarize.main([study]) == 0
    out = capsys.readouterr().out
    assert "| cd | net0 resnet20 | 98.00 ± 1.00 | 82.00 ± 1.00 (n=3) | 82.00 / 83.00 / 81.00 | +2.00 ± 0.00 | +1.17 ± 0.29 |" in out
    assert "| dml | ensemble | – | 82.17 ± 0.76 (n=3) |" in out
    assert out.index("| vanilla |") < out.index("| dml |") < out.index("| cd |")  # baselines first
    with Image.open(os.path.join(study, "study.png")) as image:
        assert image.width > 500 and image.height > 9 * 20


@pytest.mark.parametrize("change, flag", [({"dataset": "mnist"}, "--dataset"), ({"epochs": 20}, "--epochs"),
                                          ({"train_subset": 2000}, "--train-subset")])
def test_mixed_datasets_or_budgets_are_refused_in_one_line(study, capsys, change, flag):
    write_run(study, "cd-3", 0, "competitive", ["resnet20"] * 3, [80.0] * 4, **change)
    assert summarize.main([study]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: runs differ in {flag}")


def test_an_empty_directory_is_one_line(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


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


def test_the_compact_table_has_one_line_per_configuration(study):
    lines = summarize.compact(summarize.summarize(summarize.load_runs(study))).splitlines()
    assert len(lines) == 2 + 3
    assert lines[4] == ("| cd (resnet20 + resnet20) | 98.00 ± 1.00; 100.00 ± 0.00 | 82.00 ± 1.00; 82.00 ± 2.00 | +2.00 ± 0.00; +2.00 ± 1.73 | "
                        "83.83 ± 1.26 | +3.83 ± 1.04 | +1.67 ± 0.58 |")  # by hand from the fixture


def test_bn_perturbed_reports_every_condition(tmp_path, capsys):
    """experiments/bn_perturbed.py on a tiny trained run: one row per condition, and 'clean' is the reference."""
    import bn_perturbed
    import flags
    import train
    flags.launch(train.main, train.get_args_parser(), [
        "--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "0", "--batch-size", "32",
        "--device", "cpu", "--workers", "0", "--no-progress", "--model", "resnet20", "--epochs", "1",
        "--out-dir", str(tmp_path / "run")])
    capsys.readouterr()
    assert bn_perturbed.main(bn_perturbed.get_args_parser().parse_args(
        [str(tmp_path / "run" / "last.pt"), "--batches", "1", "--batch-size", "16"])) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "test acc" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == ["as saved", "clean", *bn_perturbed.PERTURBATIONS]
    assert rows[1].endswith("| +0.00 |")
