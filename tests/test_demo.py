"""demo.py on a tiny trained run: the table matches the training log, the PNGs are written, the
user's images are classified, several checkpoints form one group, and user errors are one line
with exit code 2 (CPU, tens of seconds: two one-step trainings and one subprocess)."""
import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import demo
import flags
import metrics
import stopping
import train
import train_competitive_distillation as cd

ROOT = Path(__file__).resolve().parent.parent
# One training step: 64 of the fake set's 2048 training images, the rest held out for validation
# (evaluating is cheaper than training), at the smallest input size the scripts accept.
TINY = ["--dataset", "fake", "--img-size", "8", "--epochs", "1", "--batch-size", "64", "--val-size", "1984",
        "--eval-batch-size", "512", "--device", "cpu", "--no-progress"]
# network, model, epoch, top-1 %, top-5 %, loss: one row of demo.py's table
ROW = re.compile(r"^(\S+)\s+(\S+)\s+(.+?)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A competitive-distillation group of two and a single network, each trained one step."""
    root = tmp_path_factory.mktemp("demo")
    group, single = root / "group", root / "single"
    cd.main(cd.get_args_parser().parse_args(TINY + ["--models", "resnet20", "resnet20", "--out-dir", str(group)]))
    train.main(train.get_args_parser().parse_args(TINY + ["--model", "resnet20", "--out-dir", str(single)]))
    return group, single


@pytest.fixture(scope="module")
def cli(runs):
    """`python demo.py <group run dir> --which last` as a user runs it, with CUDA hidden."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "demo.py", str(runs[0]), "--which", "last"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def loose(runs, tmp_path_factory):
    """The two runs' last.pt copied out of their run directories (no metrics.csv beside them)."""
    root = tmp_path_factory.mktemp("loose")
    for run in runs:
        shutil.copy(run / "last.pt", root / f"{run.name}.pt")
    return root / "group.pt", root / "single.pt"


def run_demo(argv):
    """demo.py in-process, the way its __main__ runs it (user errors exit with code 2)."""
    return stopping.launch(demo.main, demo.get_args_parser(), [str(a) for a in argv])


def table(stdout):
    """{network: (model, epoch, top-1, top-5, loss)} parsed from demo.py's printed table."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match:
            net, model, epoch, *numbers = match.groups()
            rows[net] = (model, epoch, *map(float, numbers))
    return rows


def logged(run_dir, epoch):
    """{network: metrics.csv row} of one epoch of a training run."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {row["net"]: row for row in csv.DictReader(f) if int(row["epoch"]) == epoch}


def expect_usage_error(argv, capsys):
    """Run demo.py in-process and return its one error line, checking exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_demo(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_table_matches_the_training_log(cli, runs):
    assert cli.returncode == 0, cli.stderr
    rows = table(cli.stdout)
    expected = logged(runs[0], epoch=1)
    assert set(rows) == {"net0_resnet20", "net1_resnet20", "ensemble"} == set(expected)
    for net, (model, epoch, top1, top5, loss) in rows.items():
        # One test image is 100/512 = 0.2 %, so these tolerances only absorb the printed rounding.
        assert (model, epoch) == (expected[net]["model"], "1")
        assert top1 == pytest.approx(float(expected[net]["test_acc"]), abs=0.01), net
        assert top5 == pytest.approx(float(expected[net]["test_top5"]), abs=0.01), net
        assert loss == pytest.approx(float(expected[net]["test_loss"]), abs=1e-3), net


def test_prediction_grid_is_written(cli, runs):
    assert cli.returncode == 0, cli.stderr
    assert "(16 test images)" in cli.stdout
    with Image.open(runs[0] / "predictions.png") as image:
        image.load()
        colours = {colour for _, colour in image.getcolors(1 << 24)}
    # 16 tiles of 8-px images upscaled to 128 px, in a 4 x 4 grid with text under each image
    assert image.mode == "RGB" and 4 * 128 <= image.width <= 4000 and 4 * 128 < image.height <= 4000
    assert demo.RIGHT in colours or demo.WRONG in colours  # the verdicts were drawn


def test_curves_are_plotted_with_matplotlib(cli, runs):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; `pip install matplotlib` to test the plot")
    assert cli.returncode == 0, cli.stderr
    assert "curves.png (training curves)" in cli.stdout
    with Image.open(runs[0] / "curves.png") as image:
        assert image.width > 400 and image.height > 200


def test_user_images_give_topk(loose, tmp_path, capsys):
    colour, grey = tmp_path / "colour.png", tmp_path / "grey.png"
    Image.effect_noise((30, 20), 60).convert("RGB").save(colour)  # not square, not 8 px, three channels
    Image.effect_noise((7, 7), 60).save(grey)                       # one channel
    out_png = tmp_path / "images.png"
    run_demo([loose[0], "--images", colour, grey, "--topk", 2, "--out", out_png])
    out = capsys.readouterr().out
    assert "test set" not in out  # user images replace the test-set evaluation
    classes = checkpoints.load_checkpoint(loose[0])["classes"]
    lines = out.splitlines()
    for path in (colour, grey):
        start = lines.index(str(path))
        for net, line in zip(["net0_resnet20", "net1_resnet20", "ensemble"], lines[start + 1:start + 4]):
            guesses = re.findall(r"(\S+) ([\d.]+)%", line)
            assert line.split()[0] == net and len(guesses) == 2, line
            assert all(name in classes for name, _ in guesses)
            assert 100.05 >= float(guesses[0][1]) >= float(guesses[1][1]) >= 0
    with Image.open(out_png) as image:
        assert image.width >= 2 * 128 and image.height > 128


def test_two_checkpoints_form_one_group(runs, loose, tmp_path, capsys):
    group, single = runs
    run_demo([*loose, "--out", tmp_path / "p.png", "--num-images", 4])
    out = capsys.readouterr().out
    assert "training curves" not in out and "skipped" not in out  # no run directory: no plot, quietly
    rows = table(out)
    assert set(rows) == {"net0_resnet20", "net1_resnet20", "net2_resnet20", "ensemble"}
    assert rows["ensemble"][0] == "resnet20+resnet20+resnet20"
    # the single run's network is net2 here: its weights load as trained
    assert rows["net2_resnet20"][2] == pytest.approx(float(logged(single, 1)["net0_resnet20"]["test_acc"]), abs=0.01)
    assert rows["net0_resnet20"][2] == pytest.approx(float(logged(group, 1)["net0_resnet20"]["test_acc"]), abs=0.01)


def test_mismatched_checkpoints_are_refused(runs, tmp_path, capsys):
    ckpt = checkpoints.load_checkpoint(runs[1] / "last.pt")
    ckpt["img_size"] = 16
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    err = expect_usage_error([runs[0], other], capsys)
    assert "3x16px" in err and "3x8px" in err


def test_user_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    not_checkpoint = tmp_path / "notes.txt"
    not_checkpoint.write_text("not a checkpoint")
    not_image = tmp_path / "fake.png"
    not_image.write_text("not an image")
    assert "does not exist" in expect_usage_error([tmp_path / "missing"], capsys)
    assert "not a PyTorch checkpoint file" in expect_usage_error([not_checkpoint], capsys)
    assert "no best.pt or last.pt" in expect_usage_error([tmp_path], capsys)
    assert "missing.png" in expect_usage_error([runs[0], "--images", tmp_path / "missing.png"], capsys)
    assert "not a readable image" in expect_usage_error([runs[0], "--images", not_image], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in expect_usage_error([runs[0], "--device", "cuda"], capsys)


def test_run_directory_without_matplotlib(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    run_demo([runs[0], "--out", tmp_path / "p.png", "--curves", tmp_path / "c.png", "--num-images", 4])
    out = capsys.readouterr().out
    assert "plot skipped" in out and "pip install matplotlib" in out
    assert not (tmp_path / "c.png").exists()
    # everything else still works: a run directory means its best.pt, each network at its best epoch
    assert f"{runs[0] / 'best.pt'}:" in out
    best = checkpoints.load_checkpoint(runs[0] / "best.pt")["state"]["best"]
    rows = table(out)
    for i, net in enumerate(["net0_resnet20", "net1_resnet20"]):
        assert rows[net][1] == str(best["epoch"][i])
        assert rows[net][2] == pytest.approx(best["test_acc"][i], abs=0.01)
    assert "ensemble" in rows and (tmp_path / "p.png").is_file()


def test_teacher_matrix_of_a_competitive_run(runs, cli):
    """metrics.csv's taught_by columns form the teacher matrix: nobody teaches itself, and each
    learner's row sums to its mean number of teachers (train_teachers)."""
    series = metrics.read_metrics(str(runs[0]))
    nets, matrix = demo.teacher_matrix(series)
    assert nets == ["net0_resnet20", "net1_resnet20"]
    assert matrix[0][0] == matrix[1][1] == 0
    for net, row in zip(nets, matrix):
        with open(runs[0] / "metrics.csv", newline="") as f:
            teachers = [float(r["train_teachers"]) for r in csv.DictReader(f) if r["net"] == net]
        assert sum(row) == pytest.approx(sum(teachers) / len(teachers), abs=1e-5)
    assert demo.teacher_matrix(metrics.read_metrics(str(runs[1]))) is None  # a single network has none
    if importlib.util.find_spec("matplotlib"):
        with Image.open(runs[0] / "curves.png") as image:
            assert image.width >= 3 * 600  # accuracy, leadership and the teacher matrix
