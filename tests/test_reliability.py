"""What a user can get wrong or go through (divergence, reused and shared run directories, full
disks, bad checkpoints, repeated signals) ends in one line and a documented exit code, and never
costs a run's saved work."""
import checkpoints
import errno
import errors
import multiprocessing
import os
import signal
import stopping
import subprocess
import sys
import time
import types

import pytest
import torch

import flags
import metrics
import train
import train_ceit
import train_competitive_distillation as competitive
import train_mutual_learning as mutual
import utils
from helpers import ROOT, cpu_env, read_rows, write_broken_image_tree, write_image_tree, write_mnist_like

TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
PAIR = [*TINY, "--models", "resnet20", "resnet20"]


def launch(capsys, module, args, code):
    """Run a script in-process as from a shell; asserts its exit code and one stderr line, returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(module.main, module.get_args_parser(), [str(a) for a in args])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def train_once(out, *extra, epochs=1):
    """A finished one-network run in `out`."""
    return stopping.launch(train.main, train.get_args_parser(), [*TINY, "--model", "resnet20", "--epochs", str(epochs),
                                                                "--out-dir", str(out), *extra])


# 1. divergence and numeric flags ------------------------------------------------------------------
def test_divergence_stops_the_run_and_never_saves_nan_weights(capsys, tmp_path):
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--lr", "1e20", "--warmup-epochs", "0",
                                 "--out-dir", tmp_path], code=3)
    assert "diverged" in err and "net0_resnet20" in err and "epoch 1" in err and "first at step" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
    assert read_rows(tmp_path)[0]["train_loss"] == "nan"  # the diverged epoch is on record


def test_divergence_in_a_later_epoch_keeps_the_good_checkpoint(capsys, tmp_path, monkeypatch):
    step = competitive.competitive_step
    calls = []

    def poisoned(*args, **kwargs):  # the group's losses turn NaN on the 2nd epoch's 2nd step
        stats = step(*args, **kwargs)
        calls.append(1)
        return {**stats, "loss": stats["loss"] * float("nan")} if len(calls) == 4 else stats

    monkeypatch.setattr(competitive, "competitive_step", poisoned)
    err = launch(capsys, competitive, [*PAIR, "--epochs", "3", "--out-dir", tmp_path], code=3)
    assert "epoch 2 (first at step 1)" in err and str(tmp_path / "last.pt") in err
    best = checkpoints.load_checkpoint(str(tmp_path / "best.pt"))
    last = checkpoints.load_checkpoint(str(tmp_path / "last.pt"))
    assert best["epoch"] == last["epoch"] == 1
    assert all(torch.isfinite(t).all() for state in last["nets"] for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("module,args,fragment", [
    (competitive, ["--temperature", "0"], "--temperature must be positive"),
    (competitive, ["--kd-weight", "-1"], "--kd-weight must be >= 0"),
    (competitive, ["--kd-weight", "nan"], "--kd-weight must be a finite number"),
    (mutual, ["--momentum", "nan"], "--momentum must be a finite number"),
    (mutual, ["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (competitive, ["--lr", "inf"], "--lr must be a finite number"),
    (competitive, ["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (train_ceit, ["--mix-prob", "1.5"], "--mix-prob must be in [0, 1]"),
    (train, ["--momentum", "1.5"], "--momentum must be in [0, 1)"),
])
def test_numeric_flags_are_checked_up_front(capsys, tmp_path, module, args, fragment):
    models = ["--model", "vit_tiny"] if module is train_ceit else ["--model", "resnet20"] if module is train else ["--models", "resnet20", "resnet20"]
    err = launch(capsys, module, [*TINY, *models, *args, "--out-dir", tmp_path], code=2)
    assert fragment in err
    assert not tmp_path.exists() or not os.listdir(tmp_path)  # refused before anything was written


# 2. and 3. one run per directory -------------------------------------------------------------------
def test_a_used_run_directory_is_refused_unless_resumed_or_overwritten(capsys, tmp_path):
    train_once(tmp_path)
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path], code=2)
    assert "holds an earlier run" in err and "--resume auto" in err and "--overwrite" in err
    first = checkpoints.load_checkpoint(str(tmp_path / "best.pt"))["nets"]
    train_once(tmp_path, "--overwrite", "--seed", "1")  # starts afresh: the old best.pt is gone with the rest
    second = checkpoints.load_checkpoint(str(tmp_path / "best.pt"))["nets"]
    assert not torch.equal(first[0]["fc.weight"], second[0]["fc.weight"])
    assert [r["epoch"] for r in read_rows(tmp_path)] == ["1"]
    events = [name for name in os.listdir(tmp_path) if name.startswith("events.out")]
    assert len(events) == 1


def test_resume_auto_in_a_directory_without_last_pt_starts_afresh(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,net\n")  # a run killed before its first epoch ended
    train_once(tmp_path, "--resume", "auto")
    assert (tmp_path / "last.pt").exists()


def test_a_concurrent_run_in_the_same_directory_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    long_run = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--model", "resnet20",
                                 "--epochs", "1000", "--out-dir", str(out)], env=cpu_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "args.json").exists() and long_run.poll() is None:
            time.sleep(0.05)
        assert long_run.poll() is None, long_run.stderr.read()
        err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1000", "--resume", "auto",
                                     "--out-dir", out], code=2)
        assert f"is in use by process {long_run.pid}" in err
    finally:
        long_run.send_signal(signal.SIGTERM)
        long_run.wait(timeout=120)
    assert long_run.returncode == 143
    assert not (out / ".lock").exists()  # released at exit


def test_a_stale_lock_and_stale_temporary_files_are_cleaned(tmp_path):
    dead = subprocess.Popen(["true"])  # a process id that no longer runs
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    (tmp_path / f"last.pt.tmp{dead.pid}").write_bytes(b"half a checkpoint")
    train_once(tmp_path, "--resume", "auto")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["args.json", "metrics.csv", "last.pt", "best.pt", "results.json",
         *[n for n in os.listdir(tmp_path) if n.startswith("events.out")]])


# 5. one line instead of a traceback -----------------------------------------------------------------
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    train_once(tmp_path, epochs=1)
    before = (tmp_path / "last.pt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto", "--out-dir", tmp_path],
                 code=1)
    assert "No space left on device" in err and "last.pt" in err
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_an_unwritable_run_directory_is_one_line(capsys):
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--out-dir", "/dev/null/run"], code=1)
    assert "cannot write to run directory '/dev/null/run'" in err


def test_an_incomplete_checkpoint_is_one_line(capsys, tmp_path):
    train_once(tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt["models"]
    torch.save(ckpt, tmp_path / "old.pt")
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", tmp_path / "old.pt"], code=2)
    assert "incomplete checkpoint (no models)" in err
    import demo
    err = launch(capsys, demo, [tmp_path / "old.pt"], code=2)
    assert "incomplete checkpoint (no models)" in err


def test_running_out_of_memory_is_one_line(capsys, monkeypatch):
    def huge(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1200000000000 bytes.")

    monkeypatch.setattr(train, "main", huge)
    err = launch(capsys, train, ["--img-size", "5000"], code=1)
    assert "out of memory" in err and "--img-size" in err


def test_a_second_ctrl_c_does_not_lose_the_state(tmp_path):
    """Two SIGINTs 30 ms apart: exit 130 without a traceback, and a loadable last.pt."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_competitive_distillation.py"),
                                *TINY[:4], "--train-subset", "512", *TINY[6:8], "--batch-size", "4", *TINY[10:],
                                "--models", "resnet20", "resnet20", "--epochs", "2", "--out-dir", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=ROOT)
    while not (out / "last.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.03)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    # the second arrives before the first is honoured (stop at once) or while its save runs; either way
    # the message says so, never that the run had finished
    assert "while finishing" not in stderr and ("interrupted twice" in stderr or "SIGINT: stopped" in stdout), stdout + stderr
    assert checkpoints.load_checkpoint(str(out / "last.pt"))["epoch"] >= 1


# 4., 9. and 11. data ---------------------------------------------------------------------------------
FOLDER = ["--dataset", "imagefolder", "--img-size", "16", "--val-size", "2", "--batch-size", "2", "--device", "cpu",
          "--loader", "torch", "--no-progress", "--model", "resnet20"]


def test_unreadable_images_are_skipped_with_a_counted_warning(capfd, tmp_path):
    bad = write_broken_image_tree(tmp_path / "data")
    # Two epochs read every file twice, through two worker processes per loader (capfd: their stderr too).
    results = stopping.launch(train.main, train.get_args_parser(), [
        *FOLDER, "--data-dir", str(tmp_path / "data"), "--workers", "2", "--epochs", "2", "--out-dir", str(tmp_path / "run")])
    assert results["epochs"] == 2
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert sorted(line.split()[4] for line in warnings) == sorted(map(str, bad))  # each file named once
    assert sorted(line.rsplit("; ", 1)[1].split()[0] for line in warnings) == ["1", "2"]


def test_no_skip_bad_images_stops_with_one_line_naming_the_file(capfd, tmp_path):
    bad = write_broken_image_tree(tmp_path / "data")
    before = set(multiprocessing.active_children())
    # One worker process: the error crosses from it to the main process, and still reads as one line.
    err = launch(capfd, train, [*FOLDER, "--data-dir", tmp_path / "data", "--workers", "1", "--epochs", "1",
                                "--no-skip-bad-images", "--out-dir", tmp_path / "run"], code=2)
    assert "unreadable image" in err and any(f"image {path} (" in err for path in bad), err
    assert set(multiprocessing.active_children()) <= before  # its worker stopped, not left to the garbage collector


def test_a_data_dir_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "fashion-mnist.tar").write_bytes(b"an archive")
    err = launch(capsys, train, [*TINY, "--dataset", "fashion-mnist", "--img-size", "28", "--model", "resnet20",
                                 "--epochs", "1", "--data-dir", tmp_path / "fashion-mnist.tar", "--out-dir", tmp_path / "run"], code=2)
    assert f"--data-dir {tmp_path / 'fashion-mnist.tar'} is not a directory" in err


def test_the_startup_line_names_the_files_read(capsys, tmp_path):
    write_mnist_like(tmp_path / "data", train=80, high=147)  # the four .gz files right in --data-dir
    stopping.launch(train.main, train.get_args_parser(), [
        *TINY, "--dataset", "fashion-mnist", "--img-size", "28", "--train-subset", "32", "--val-size", "16",
        "--model", "resnet20", "--epochs", "1", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    startup = capsys.readouterr().out.splitlines()[0]
    assert startup.startswith("training net0_resnet20 on fashion-mnist: ")
    assert f"32 train / 16 val / 10 test images from {tmp_path / 'data'}, " in startup


def test_a_single_class_image_folder_is_one_line(capsys, tmp_path):
    write_image_tree(tmp_path / "data", ("train", "test"), classes=("cat",))
    err = launch(capsys, train, [*FOLDER, "--data-dir", tmp_path / "data", "--epochs", "1", "--out-dir", tmp_path / "run"], code=2)
    assert f"{tmp_path / 'data' / 'train'} has 1 class folder (cat); a classifier needs at least 2" in err


# 6., 7. and 10. resuming ---------------------------------------------------------------------------
def test_resume_auto_on_a_complete_run_exits_0(capsys, tmp_path):
    train_once(tmp_path)
    capsys.readouterr()
    assert train_once(tmp_path, "--resume", "auto") is None
    assert "is complete (1 of 1 epochs)" in capsys.readouterr().out


def test_resume_refuses_other_data_seed_or_script(capsys, tmp_path):
    run_dir = tmp_path / "run"
    stopping.launch(competitive.main, competitive.get_args_parser(),
                 [*PAIR, "--epochs", "1", "--out-dir", str(run_dir)])
    last = run_dir / "last.pt"
    assert "--val-size" in launch(capsys, competitive, [*PAIR, "--epochs", "2", "--val-size", "16", "--resume", last], 2)
    assert "--seed" in launch(capsys, competitive, [*PAIR, "--epochs", "2", "--seed", "3", "--resume", last], 2)
    err = launch(capsys, mutual, [*PAIR, "--epochs", "2", "--resume", last], 2)
    assert "written by the competitive script; this is the mutual script" in err


def test_resume_messages_for_a_directory_and_a_corrupt_best_pt(capsys, tmp_path):
    train_once(tmp_path)
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", tmp_path], code=2)
    assert "is a directory" in err and str(tmp_path / "last.pt") in err
    (tmp_path / "best.pt").write_bytes(b"garbage")
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto",
                                 "--out-dir", tmp_path], code=2)
    assert "best.pt" in err and "remove or rename it" in err


def test_a_resumed_run_purges_tensorboard_points_it_redoes(tmp_path):
    """Resuming in epoch 1 (mid-epoch) hides the points a killed run wrote from epoch 1 on, too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rt = utils.Runtime(torch.device("cpu"), None, False)
    row = {"epoch": 1, "net": "net0_x", "model": "x"}
    killed = metrics.MetricsLog(str(tmp_path), rt, 0, resumed=False)
    killed.write(1, [{**row, "train_loss": 5.0}])
    killed.write(2, [{**row, "epoch": 2, "train_loss": 6.0}])
    killed.close()
    resumed = metrics.MetricsLog(str(tmp_path), rt, 0, resumed=True)
    resumed.write(1, [{**row, "train_loss": 1.0}])
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss/net0_x")] == [(1, 1.0)]


def test_a_stop_request_leaves_later_signals_ignored_while_the_process_exits():
    """After a stop request, the exit path ignores a repeated Ctrl-C (it would otherwise raise inside
    the interpreter's shutdown hooks); without one, the previous handlers come back."""
    previous = signal.getsignal(signal.SIGINT)
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        rt = types.SimpleNamespace(distributed=False)
        with stopping.StopRequest(rt):
            pass
        assert signal.getsignal(signal.SIGINT) is previous
        with pytest.raises(SystemExit):
            with stopping.StopRequest(rt) as stop:
                stop.signal = signal.SIGINT
                raise SystemExit(130)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


@pytest.mark.parametrize("name, refused", [("tv:vgg11", "AdaptiveAvgPool2d(output_size=(7, 7)) at 'avgpool'"),
                                           ("tv:alexnet", "AdaptiveAvgPool2d(output_size=(6, 6)) at 'avgpool'"),
                                           ("tv:resnet18", None), ("resnet20", None)])
def test_deterministic_cuda_refuses_adaptive_pooling_without_a_deterministic_backward(name, refused):
    """--deterministic on CUDA with a network whose adaptive pooling has no deterministic CUDA backward
    (torchvision's VGG and AlexNet pool to 7x7 and 6x6): one line before anything trains, instead of a
    RuntimeError at the first backward. Pooling to 1x1 (a mean in ATen) passes. Only a CUDA runtime is
    described: the check itself needs no GPU."""
    info = types.SimpleNamespace(num_classes=10, img_size=64, in_chans=3)  # (AlexNet's geometry needs 63 px or more)
    cuda = utils.Runtime(torch.device("cuda", 0), None, False, deterministic=True)
    built = []
    with pytest.MonkeyPatch.context() as patch:  # stop before the networks would move to the (absent) GPU
        patch.setattr(torch.nn.Module, "to", lambda net, *args, **kwargs: built.append(net) or net)
        if refused:
            with pytest.raises(errors.UsageError) as error:
                utils.build_nets([name], info, cuda)
            message = str(error.value)
            assert "\n" not in message and message.startswith(f"--deterministic on CUDA: network 0 ({name}) has {refused}")
            assert built == []
        else:
            utils.build_nets([name], info, cuda)
            assert len(built) == 1
    for runtime in (utils.Runtime(torch.device("cpu"), None, False, deterministic=True),  # deterministic on the CPU
                    utils.Runtime(torch.device("cuda", 0), None, False)):                # not asked for
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.Module, "to", lambda net, *args, **kwargs: net)
            utils.build_nets([name], info, runtime)
    assert utils.nondeterministic_on_cuda(torch.nn.AdaptiveMaxPool2d(1))   # no 1x1 exception for max pooling
    assert not utils.nondeterministic_on_cuda(torch.nn.AdaptiveAvgPool2d((1, 1)))
    assert utils.nondeterministic_on_cuda(torch.nn.AdaptiveAvgPool2d((None, 1)))


def test_deterministic_cuda_refusal_comes_before_training(tmp_path, capsys, monkeypatch):
    """The same check through a script: exit code 2 and its one line, nothing trained, nothing written."""
    monkeypatch.setattr(utils, "resolve_device", lambda name, local_rank=None: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(utils, "setup_data", lambda args, rt, **kwargs: (types.SimpleNamespace(
        info=types.SimpleNamespace(num_classes=10, img_size=32, in_chans=3, val_size=0, in_memory=True)), (None, None, None)))
    err = launch(capsys, competitive, [*TINY, "--models", "tv:vgg11", "resnet20", "--deterministic",
                                       "--out-dir", tmp_path / "run"], 2)
    assert "--deterministic on CUDA: network 0 (tv:vgg11) has AdaptiveAvgPool2d" in err
    assert not (tmp_path / "run").exists()
