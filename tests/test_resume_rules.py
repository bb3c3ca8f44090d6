"""A resume continues the run it resumes (its recorded arguments are the arguments; a changed flag is
refused in one line unless it may change, and what changed is recorded), --config recomputes what it
must, and --resume auto never loses a run."""
import json
import os
import shutil
import subprocess

import pytest
import torch

import checkpoints
import configs
import flags
import stopping
import train
import train_ceit
import train_competitive_distillation as competitive
import train_one as one
import utils
from helpers import read_rows

TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
PAIR = [*TINY, "--models", "resnet20", "resnet20"]


def launch(capsys, module, args, code=None):
    """Run a script in-process as from a shell; with `code`, asserts it exits so with one stderr line."""
    capsys.readouterr()
    if code is None:
        return stopping.launch(module.main, module.get_args_parser(), [str(a) for a in args])
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(module.main, module.get_args_parser(), [str(a) for a in args])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A competitive pair trained one of two epochs with a non-default recipe: --stop-after 1."""
    out = tmp_path_factory.mktemp("run")
    stopping.launch(competitive.main, competitive.get_args_parser(),
                 [*PAIR, "--epochs", "2", "--stop-after", "1", "--weight-decay", "1e-3", "--momentum", "0.8",
                  "--perturb-every", "3", "--out-dir", str(out)])
    return out


def copy_run(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("flag, value", [
    ("--weight-decay", "0.1"), ("--momentum", "0.5"), ("--no-nesterov", None), ("--lr", "0.3"),
    ("--perturb-every", "5"), ("--perturbations", "hflip"), ("--teacher-rule", "best"), ("--kd-weight", "2"),
    ("--temperature", "3"), ("--label-smoothing", "0.1"), ("--optimizer", "adamw"), ("--no-decay-norm-and-bias", None),
    ("--channels-last", None), ("--no-channels-last", None)])
def test_a_resume_refuses_a_changed_recipe_in_one_line(capsys, one_epoch, tmp_path, flag, value):
    run = copy_run(one_epoch, tmp_path)
    argv = [*PAIR, "--epochs", "2", "--resume", "auto", "--out-dir", run, flag, *([value] if value else [])]
    recorded = json.loads((run / "args.json").read_text())
    if flag == "--channels-last":  # the recorded value is True: giving it again is no change
        launch(capsys, competitive, argv)
        return
    err = launch(capsys, competitive, argv, code=2)
    assert "was written with" in err and "a resume continues its run" in err  # (with --FLAG VALUE, or without --FLAG)
    assert json.loads((run / "args.json").read_text()) == recorded  # nothing rewritten


def test_a_resume_takes_the_recorded_arguments_and_records_what_changed(capsys, one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path)
    # no recipe flag given: the recorded ones apply (weight decay 1e-3, momentum 0.8, --perturb-every 3)
    launch(capsys, competitive, ["--resume", str(run / "last.pt"), "--epochs", "3", "--eval-every", "3",
                                 "--device", "cpu", "--workers", "0", "--no-progress"])
    record = json.loads((run / "args.json").read_text())
    assert record["weight_decay"] == [1e-3] and record["momentum"] == 0.8 and record["perturb_every"] == 3
    assert record["models"] == ["resnet20", "resnet20"] and record["epochs"] == 3
    (resume,) = record["resumes"]
    assert resume["epoch"] == 1 and resume["step"] == 0 and resume["checkpoint"].endswith("last.pt")
    assert resume["changed"] == {"epochs": [2, 3], "eval_every": [1, 3]}
    last = checkpoints.load_checkpoint(str(run / "last.pt"))
    assert last["epoch"] == 3 and last["optimizers"][0]["param_groups"][0]["weight_decay"] == 1e-3
    assert [r["epoch"] for r in read_rows(run) if r["net"] == "ensemble"] == ["1", "2", "3"]


def test_args_json_records_the_code_of_the_start_and_of_each_resume(capsys, one_epoch, tmp_path, monkeypatch):
    run = copy_run(one_epoch, tmp_path)
    started = json.loads((run / "args.json").read_text())["code"]
    assert started["threads"] == torch.get_num_threads() and started["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", os.path.dirname(checkpoints.__file__), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or None  # None outside a git checkout
    assert started["commit"] == head and (started["modified"] is None) == (head is None)
    monkeypatch.setattr(configs, "code_version", lambda: {"commit": "f" * 40, "modified": False, "torch": "x", "threads": 7})
    launch(capsys, competitive, [*PAIR, "--epochs", "2", "--resume", "auto", "--out-dir", run])
    record = json.loads((run / "args.json").read_text())
    assert record["code"] == started  # the code the run began with ...
    assert record["resumes"][0]["code"]["commit"] == "f" * 40  # ... and the code that continued it
    assert configs.parse_args(competitive.get_args_parser(), ["--config", str(run / "args.json")]).epochs == 2  # not a flag


def test_a_run_continued_in_another_directory_keeps_its_start_code_and_history(capsys, one_epoch, tmp_path, monkeypatch):
    source = copy_run(one_epoch, tmp_path)
    started = json.loads((source / "args.json").read_text())["code"]
    monkeypatch.setattr(configs, "code_version", lambda: {"commit": "e" * 40, "modified": False, "torch": "x", "threads": 3})
    launch(capsys, competitive, ["--resume", str(source / "last.pt"), "--epochs", "2", "--out-dir", str(tmp_path / "new"),
                                 "--device", "cpu", "--workers", "0", "--no-progress"])
    record = json.loads((tmp_path / "new" / "args.json").read_text())
    assert record["code"] == started  # the source run's start, not "unknown"
    (resume,) = record["resumes"]
    assert resume["checkpoint"] == str(source / "last.pt") and resume["code"]["commit"] == "e" * 40


def test_freeze_is_compared_as_a_set(capsys, tmp_path):
    launch(capsys, competitive, [*PAIR, "--epochs", "2", "--stop-after", "1", "--freeze", "0", "0", "--out-dir", tmp_path])
    launch(capsys, competitive, [*PAIR, "--epochs", "2", "--freeze", "0", "--resume", "auto", "--out-dir", tmp_path])
    assert checkpoints.load_checkpoint(str(tmp_path / "last.pt"))["epoch"] == 2


def test_resuming_a_best_pt_is_refused_naming_last_pt(capsys, one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path)
    err = launch(capsys, competitive, [*PAIR, "--epochs", "2", "--resume", run / "best.pt"], code=2)
    assert "is a best.pt" in err and f"resume from '{run / 'last.pt'}'" in err


def test_config_recomputes_what_depends_on_a_changed_flag(capsys, one_epoch, tmp_path):
    config = str(one_epoch / "args.json")   # SGD at batch 32: lr 0.025 computed, recorded apart from the flags
    recorded = json.loads((one_epoch / "args.json").read_text())
    assert recorded["lr"] is None and recorded["resolved"]["lr"] == [0.025] and "lr" not in recorded["given"]
    repeat = lambda *argv: configs.parse_args(competitive.get_args_parser(), ["--config", config, *argv])
    assert repeat().lr is None and utils.default_lrs(repeat(), 2) == [0.025]          # computed again, the same
    assert utils.default_lrs(repeat("--optimizer", "adamw"), 2) == [1e-3]             # computed anew
    assert utils.default_lrs(repeat("--batch-size", "8"), 2) == [0.00625]
    assert repeat("--lr", "0.5").lr == [0.5]
    kept = repeat("--seed", "3")
    assert kept.weight_decay == [1e-3] and kept.momentum == 0.8 and kept.seed == 3
    # an args.json of the older kind (its computed values written over the flags): changed flags recompute them
    older = {key: value for key, value in recorded.items() if key not in ("given", "resolved")}
    (tmp_path / "older.json").write_text(json.dumps({**older, "lr": [0.025]}))
    old = lambda *argv: configs.parse_args(competitive.get_args_parser(), ["--config", str(tmp_path / "older.json"), *argv])
    assert old().lr == [0.025] and old("--optimizer", "adamw").lr is None and old("--batch-size", "8").lr is None


def test_config_of_another_scripts_run_is_refused_unless_asked(capsys, tmp_path):
    out = tmp_path / "train"
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", out])
    err = launch(capsys, train_ceit, ["--config", out / "args.json", "--model", "vit_tiny"], code=2)
    assert "is a run of the train script" in err and "--config-any-script" in err
    args = configs.parse_args(train_ceit.get_args_parser(), ["--config", str(out / "args.json"), "--config-any-script"])
    assert args.optimizer == ["sgd"]  # taken as asked


@pytest.mark.parametrize("content, fragment", [
    ({"models": []}, "models = [] is not a value of --models"),
    ({"perturbations": []}, "perturbations = [] is not a value of --perturbations"),
    ("[" * 100000 + "]" * 100000, "is not a JSON file of flag values"),
])
def test_config_values_that_no_flag_could_give_are_one_line(capsys, tmp_path, content, fragment):
    path = tmp_path / "args.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert fragment in launch(capsys, competitive, [*PAIR, "--config", path], code=2)


# 2. --resume auto never loses a run ---------------------------------------------------------------
def test_resume_auto_without_last_pt_never_deletes_a_runs_results(capsys, tmp_path):
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path])
    os.remove(tmp_path / "last.pt")  # kept best.pt, results.json, metrics.csv to save disk
    before = sorted(os.listdir(tmp_path))
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--resume", "auto", "--out-dir", tmp_path],
                 code=2)
    assert "no last.pt to continue from; nothing was deleted" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_resume_auto_starts_a_run_that_died_before_its_first_epoch(capsys, tmp_path):
    (tmp_path / "args.json").write_text("{}")
    (tmp_path / "metrics.csv").write_text("epoch,net\n")
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--resume", "auto", "--out-dir", tmp_path])
    assert (tmp_path / "results.json").exists()


def test_a_complete_run_without_results_json_gets_it_written(capsys, tmp_path):
    """Killed after its last checkpoint, before results.json: --resume auto writes it (finishing is idempotent)."""
    argv = [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path]
    first = launch(capsys, train, argv)
    os.remove(tmp_path / "results.json")
    launch(capsys, train, [*argv, "--resume", "auto"])
    assert "results.json was missing and is written now" in capsys.readouterr().out
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["networks"] == json.loads(json.dumps(first["networks"]))
    assert written["epochs"] == 1 and written["script"] == "train"


def test_a_branched_complete_run_gets_its_results_too(capsys, tmp_path):
    argv = [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path]
    first = launch(capsys, one, argv)
    os.remove(tmp_path / "results.json")
    launch(capsys, one, [*argv, "--resume", "auto"])
    written = json.loads((tmp_path / "results.json").read_text())
    assert [n["net"] for n in written["networks"]] == [n["net"] for n in first["networks"]]
    assert [n["final_test_acc"] for n in written["networks"]] == pytest.approx([n["final_test_acc"] for n in first["networks"]],
                                                                                abs=1e-4)
