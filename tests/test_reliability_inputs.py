"""Signals, pipes and peers (SIGHUP, a closed stdout, an interruption before training, a stopped
torchrun worker), experiments/compare.py's children and seeds, and the inputs that once gave a
traceback: each ends in one line and its exit code, and never costs a run's saved work."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoints
import demo
import flags
import stopping
import train
import train_competitive_distillation as competitive
import utils
from helpers import ROOT, cpu_env
from test_distributed import torchrun_command, worker_pids
from test_reliability import launch  # a script run in-process as from a shell, its one error line

TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
# Long enough (many 4-image steps) to be signalled in the middle of an epoch.
LONG = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "512", "--val-size", "0", "--batch-size", "4",
        "--device", "cpu", "--workers", "0", "--no-progress", "--model", "resnet20", "--epochs", "50"]


def start(script, args, **kwargs):
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, script), *map(str, args)], env=cpu_env(), cwd=ROOT,
                            text=True, **kwargs)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be signalled"


# 3. signals, pipes and peers ----------------------------------------------------------------------
def test_sighup_is_a_stop_request_like_sigterm(tmp_path):
    """A closed terminal or ssh session: the state is saved, the lock released, exit 129."""
    process = start("train.py", [*LONG, "--log-interval", "5", "--out-dir", tmp_path],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while "step 10/" not in process.stdout.readline():  # the training loop runs
        assert process.poll() is None
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 129, err
    assert "SIGHUP: stopped at epoch 1" in out
    assert checkpoints.load_checkpoint(str(tmp_path / "last.pt"))["step"] > 0
    assert not (tmp_path / ".lock").exists()


def test_a_closed_stdout_stops_the_printing_not_the_run(tmp_path):
    """`train.py ... | head -3`: the run goes on to its end and writes its results."""
    process = start("train.py", [*TINY, "--model", "resnet20", "--epochs", "3", "--out-dir", tmp_path],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(3):
        process.stdout.readline()
    process.stdout.close()  # the reader went away, as `head -3` does
    err = process.stderr.read()
    assert process.wait(timeout=300) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 3


def test_an_interruption_before_training_says_that_nothing_was_saved(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "build_nets", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--out-dir", tmp_path], code=130)
    assert err == "error: interrupted before training began: nothing was saved"


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_a_stopped_torchrun_worker_ends_the_run_after_dist_timeout(tmp_path):
    """One of two workers stopped (kill -STOP): the other ends after --dist-timeout in one line naming
    its rank, instead of waiting for gloo's 30 minutes."""
    args = [*LONG, "--log-interval", "5", "--dist-timeout", "5", "--out-dir", str(tmp_path)]
    process = subprocess.Popen(torchrun_command("train.py", args), env=cpu_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        while "step 10/" not in process.stdout.readline():
            assert process.poll() is None, process.stderr.read()
        stopped = worker_pids(process.pid)[1]
        os.kill(stopped, signal.SIGSTOP)
        started, err = time.time(), ""
        while "error: rank 0" not in err and time.time() - started < 120:
            err += process.stderr.readline()
        assert time.time() - started < 120
        os.kill(stopped, signal.SIGKILL)  # instead of torchrun's 30 s before it kills a worker that ignores SIGTERM
        err += process.communicate(timeout=120)[1]
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "error: rank 0: waited longer than --dist-timeout (5 s) for the other processes" in err


def test_compare_refuses_a_repeated_seed():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compare.py"), "--out", "x", "--seeds", "0",
                             "0", "--dry-run"], capture_output=True, text=True, env=cpu_env())
    assert result.returncode != 0 and "error: --seeds names 0 twice" in result.stderr


def test_a_killed_compare_leaves_no_orphan(tmp_path):
    """compare.py killed by SIGKILL: its child run gets SIGTERM, saves last.pt, releases its lock, and
    the next compare.py continues it."""
    study = tmp_path / "study"
    compare = start(os.path.join("experiments", "compare.py"),
                    ["--out", study, "--configs", "vanilla", "--seeds", "0", "--", *LONG[:-2], "--epochs", "50",
                     "--train-subset", "128"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = study / "vanilla" / "seed0"
    # once epoch 1 has ended the run is inside its loop (a SIGTERM during setup saves nothing, as it should)
    wait_for(run_dir / "metrics.csv", compare)
    time.sleep(0.5)
    compare.kill()
    compare.wait()
    deadline = time.time() + 60
    while (run_dir / ".lock").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not (run_dir / ".lock").exists()  # the child ended
    assert (run_dir / "last.pt").exists()    # ... having saved its state
    log = (study / "logs" / "vanilla-seed0.log").read_text()
    # SIGTERM saved the state (a second signal during that save, seen once in a loaded full suite, stops
    # at once and says so; last.pt then is epoch 1's)
    assert "SIGTERM: stopped at epoch" in log or "error: interrupted twice" in log, log[-500:]


# 4. one line where a traceback was --------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    stopping.launch(train.main, train.get_args_parser(), [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("case", ["superscript-net", "superscript-pick", "seed", "world-size-no-rank", "world-size-abc",
                                  "out-dir-file", "out-dir-dangling", "int64-weights"])
def test_bad_inputs_are_one_line(capsys, tmp_path, monkeypatch, checkpoint, case):
    last = checkpoint / "last.pt"
    pair = [*TINY, "--models", "resnet20", "resnet20", "--out-dir", tmp_path / "run"]
    if case == "superscript-net":
        assert "NET a network index" in launch(capsys, competitive, [*pair, "--init", f"²={last}"], code=2)
    elif case == "superscript-pick":
        assert "no such network" in launch(capsys, competitive, [*pair, "--init", f"0={last}@²"], code=2)
    elif case == "seed":
        assert "--seed must be in 0..2**63-1" in launch(capsys, train, [*TINY, "--seed", str(2**64)], code=2)
    elif case == "world-size-no-rank":
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("RANK", raising=False)
        assert "WORLD_SIZE=2 without RANK" in launch(capsys, train, [*TINY, "--out-dir", tmp_path], code=2)
    elif case == "world-size-abc":
        monkeypatch.setenv("WORLD_SIZE", "abc")
        assert "WORLD_SIZE='abc' is not a non-negative integer" in launch(capsys, train, [*TINY, "--out-dir", tmp_path], code=2)
    elif case == "out-dir-file":
        (tmp_path / "file").write_text("x")
        assert "is a file, not a directory" in launch(capsys, train, [*TINY, "--out-dir", tmp_path / "file"], code=2)
    elif case == "out-dir-dangling":
        os.symlink(tmp_path / "nowhere", tmp_path / "link")
        assert "dangling symbolic link" in launch(capsys, train, [*TINY, "--out-dir", tmp_path / "link"], code=2)
    elif case == "int64-weights":
        state = checkpoints.load_checkpoint(str(last))["nets"][0]
        torch.save({k: v.to(torch.int64) for k, v in state.items()}, tmp_path / "ints.pt")
        err = launch(capsys, train, [*TINY, "--model", "resnet20", "--init", tmp_path / "ints.pt", "--out-dir", tmp_path / "run"],
                     code=2)
        assert "is int64 in the file but float32" in err


def test_an_at_sign_in_an_init_files_own_name_is_taken_whole(capsys, tmp_path, checkpoint):
    state = checkpoints.load_checkpoint(str(checkpoint / "last.pt"))["nets"][0]
    torch.save(state, tmp_path / "weights@v2.pt")  # a plain state_dict whose name has an @
    stopping.launch(train.main, train.get_args_parser(),
                 [*TINY, "--model", "resnet20", "--init", str(tmp_path / "weights@v2.pt"), "--epochs", "1",
                  "--out-dir", str(tmp_path / "run")])
    assert "initialised from" in capsys.readouterr().out


def test_a_too_small_timm_model_is_one_line(capsys, tmp_path):
    pytest.importorskip("timm")
    err = launch(capsys, train, [*TINY, "--model", "timm:gcvit_xxtiny", "--img-size", "28", "--out-dir", tmp_path], code=2)
    assert "timm:gcvit_xxtiny cannot" in err and "28px" in err


@pytest.mark.parametrize("content", [b"\xef\xbb\xbfepoch,net,model,test_acc\n1,net0_resnet20,resnet20,x\n",
                                     b"epoch,net,model,test_acc\none,net0_resnet20,resnet20,10\n",
                                     bytes(range(256)) * 4])
def test_a_bad_metrics_csv_is_one_line_in_resume_and_demo(capsys, tmp_path, checkpoint, content):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    (run / "metrics.csv").write_bytes(content)
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto", "--out-dir", run], code=2)
    assert "metrics.csv" in err and "move it away" in err
    stopping.launch(demo.main, demo.get_args_parser(), [str(run), "--num-images", "2", "--device", "cpu"])
    assert "training-curve plot skipped" in capsys.readouterr().out  # the predictions are still shown


def test_a_bom_metrics_csv_still_resumes(capsys, tmp_path, checkpoint):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    (run / "metrics.csv").write_bytes(b"\xef\xbb\xbf" + (run / "metrics.csv").read_bytes())
    stopping.launch(train.main, train.get_args_parser(),
                 [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto", "--out-dir", str(run)])
    assert checkpoints.load_checkpoint(str(run / "last.pt"))["epoch"] == 2


def test_demo_checks_that_it_can_write_before_evaluating(capsys, checkpoint, monkeypatch):
    evaluated = []
    monkeypatch.setattr(demo, "build_group", lambda *a, **k: evaluated.append(1))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.samefile(path, checkpoint) else real_access(path, mode))
    err = launch(capsys, demo, [checkpoint, "--device", "cpu"], code=2)
    assert "is not writable; write elsewhere with --out FILE" in err and not evaluated


def test_demo_refuses_a_decompression_bomb_in_one_line(capsys, tmp_path, checkpoint, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: beyond twice the limit, PIL's error
    err = launch(capsys, demo, [checkpoint, "--images", tmp_path / "bomb.png", "--device", "cpu"], code=2)
    assert "is not a readable image" in err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between the limit and twice it: PIL only warns
    assert "is not a readable image" in launch(capsys, demo, [checkpoint, "--images", tmp_path / "bomb.png",
                                                              "--device", "cpu"], code=2)


def test_a_long_default_run_name_is_shortened(tmp_path):
    names = ["timm:vit_base_patch16_224"] * 12  # 311 characters joined
    name = os.path.basename(checkpoints.default_run_dir("competitive", "cifar100", names))
    assert len(name) < 160 and "12nets" in name
    # the same group gets the same name (a hash of its models), up to the time stamp -YYYYmmdd-HHMMSS
    assert name[:-16] == os.path.basename(checkpoints.default_run_dir("competitive", "cifar100", names))[:-16]
    other = os.path.basename(checkpoints.default_run_dir("competitive", "cifar100", ["timm:vit_small_patch16_224"] * 12))
    assert other[:-16] != name[:-16]
