"""Reliability, third pass: a command never overwrites another run, a finished run is repaired whole, one
parent death is one stop request, and the weak spots an adversarial user found (each test fails on the code
before its fix)."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import checkpoints
import engine
import models
import utils
import stopping
import train
import train_byot
import train_ceit
import train_competitive_distillation as competitive
import train_kdcl
import train_mutual_learning as mutual
import train_okddip
import train_one
import train_pcl
from helpers import ROOT, assert_same_weights, cpu_env, read_rows, weights

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402
import summarize  # noqa: E402

TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
SCRIPTS = {train: ["--model", "resnet20"], mutual: ["--models", "resnet20", "resnet20"],
           competitive: ["--models", "resnet20", "resnet20"], train_kdcl: ["--models", "resnet20", "resnet20"],
           train_one: ["--model", "resnet20"], train_okddip: ["--model", "resnet20"], train_pcl: ["--model", "resnet20"],
           train_byot: ["--model", "resnet20"],
           train_ceit: ["--model", "vit_tiny", "--rand-augment", "none", "--reprob", "0", "--no-repeated-aug"]}


def launch(capsys, module, argv, code=None):
    """A script in-process as from a shell; with `code`, its exit code and its one stderr line."""
    capsys.readouterr()
    if code is None:
        return stopping.launch(module.main, module.get_args_parser(), [str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(module.main, module.get_args_parser(), [str(a) for a in argv])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# 1. A resume into another run's directory -----------------------------------------------------------
def test_a_resume_into_another_runs_directory_is_refused_and_changes_nothing(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    pair = [*TINY, "--models", "resnet20", "resnet20"]
    launch(capsys, train_kdcl, [*pair, "--epochs", "2", "--stop-after", "1", "--out-dir", a])
    launch(capsys, train_kdcl, [*pair, "--epochs", "1", "--weight-decay", "0.01", "--out-dir", b])
    before = {name: (b / name).read_bytes() for name in os.listdir(b) if (b / name).is_file()}
    err = launch(capsys, train_kdcl, ["--resume", a / "last.pt", "--out-dir", b, "--epochs", "2"], code=2)
    assert f"--out-dir '{b}' holds another run" in err
    assert {name: (b / name).read_bytes() for name in os.listdir(b) if (b / name).is_file()} == before
    launch(capsys, train_kdcl, ["--resume", a / "last.pt", "--out-dir", tmp_path / "empty", "--epochs", "2"])  # allowed
    assert (tmp_path / "empty" / "results.json").exists()


# 2. One parent death, one stop request; a DataLoader worker that dies -------------------------------
def test_compare_starts_every_run_from_its_main_thread(tmp_path, monkeypatch):
    """Linux signals a child whenever its parent thread ends: children of a pool's threads were signalled
    twice when compare.py died (the second signal: 'interrupted twice', no save)."""
    threads = []

    class Recording:
        def __init__(self, *args, **kwargs):
            threads.append(threading.current_thread() is threading.main_thread())
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(compare.subprocess, "Popen", Recording)
    argv = ["--out", str(tmp_path), "--seeds", "0", "1", "--jobs", "2", "--configs", "vanilla", "dml"]
    assert compare.main(compare.get_args_parser().parse_args(argv)) == 0
    assert threads == [True] * 4


def test_a_killed_compare_stops_its_run_once_and_saves_it(tmp_path):
    """SIGKILL to compare.py: its running child gets one SIGTERM (the parent-death signal), saves last.pt
    mid-epoch and says so; the next compare.py continues it."""
    out = tmp_path / "study"
    argv = [sys.executable, os.path.join(ROOT, "experiments", "compare.py"), "--out", str(out), "--seeds", "0",
            "--configs", "vanilla", "--", *TINY, "--train-subset", "256", "--batch-size", "8", "--epochs", "50",
            "--log-interval", "1"]
    parent = subprocess.Popen(argv, env=cpu_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "logs" / "vanilla-seed0.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step 2/" in log.read_text()):
        time.sleep(0.2)
    parent.kill()
    parent.wait()
    deadline = time.time() + 120
    while time.time() < deadline and "continue with" not in log.read_text() and "error:" not in log.read_text():
        time.sleep(0.2)
    text = log.read_text()
    assert "SIGTERM: stopped at epoch" in text and "interrupted twice" not in text, text[-500:]
    assert (out / "vanilla" / "seed0" / "last.pt").exists()


def test_a_dead_dataloader_worker_saves_the_run_and_says_so(tmp_path, capsys, monkeypatch):
    batches = engine.batches

    def dying(run, epoch):
        for step, batch in batches(run, epoch):
            if epoch == 1 and step == 1:
                raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
            yield step, batch

    argv = [*TINY, "--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--deterministic"]
    monkeypatch.setattr(engine, "batches", dying)
    err = launch(capsys, train, [*argv, "--out-dir", tmp_path / "run"], code=1)
    assert "a DataLoader worker died in epoch 2" in err and "the 1 steps trained are saved" in err
    last = checkpoints.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert (last["epoch"], last["step"]) == (1, 1)
    monkeypatch.setattr(engine, "batches", batches)
    launch(capsys, train, [*argv, "--out-dir", tmp_path / "run", "--resume", "auto"])
    launch(capsys, train, [*argv, "--out-dir", tmp_path / "straight"])
    assert_same_weights(weights(tmp_path / "run" / "last.pt"), weights(tmp_path / "straight" / "last.pt"))


# 3. A finished run repaired whole -------------------------------------------------------------------
@pytest.mark.parametrize("module", list(SCRIPTS), ids=lambda m: m.__name__)
def test_a_finished_run_gets_every_missing_final_file_written_again(module, tmp_path, capsys):
    """Killed after its last checkpoint, before its final files: --resume auto writes them all, as the
    end of training wrote them (results.json with its --model-ema section; deployed.pt where there is one)."""
    run = tmp_path / "run"
    argv = [*TINY, *SCRIPTS[module], "--epochs", "1", "--model-ema", "0.9", "--out-dir", run]
    launch(capsys, module, argv)
    finals = {name: (run / name).read_bytes() for name in ("results.json", "deployed.pt") if (run / name).exists()}
    assert json.loads(finals["results.json"])["ema"]
    for name in finals:
        (run / name).unlink()
    launch(capsys, module, [*argv, "--resume", "auto"])
    said = capsys.readouterr().out
    assert f"its {' and '.join(finals)} {'was' if len(finals) == 1 else 'were'} missing" in said, said
    assert json.loads((run / "results.json").read_text()) == json.loads(finals["results.json"])
    if "deployed.pt" in finals:
        written = torch.load(run / "deployed.pt", weights_only=True)
        expected = torch.load(io.BytesIO(finals["deployed.pt"]), weights_only=True)
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
        assert all(value.device.type == "cpu" for value in written.values())
    launch(capsys, module, [*argv, "--resume", "auto"])  # complete: nothing to do
    assert "nothing to do" in capsys.readouterr().out


# 4. --reset-classifier on a branched network ----------------------------------------------------------
def test_reset_classifier_resets_the_heads_of_a_branched_network_not_its_gate(tmp_path, capsys):
    launch(capsys, train_one, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path / "source"])
    source = weights(tmp_path / "source" / "last.pt")[0]
    built = []
    build = utils.build_nets

    def recording(*args, **kwargs):
        nets = build(*args, **kwargs)
        built.append({k: v.detach().clone() for k, v in models.unwrap(nets[0]).state_dict().items()})
        return nets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "build_nets", recording)
        launch(capsys, train_one, [*TINY, "--model", "resnet20", "--epochs", "1", "--init", tmp_path / "source" / "last.pt",
                                   "--reset-classifier", "--out-dir", tmp_path / "init"])
    initialised = built[0]
    for key in ("gate.0.weight", "gate.1.running_mean", "trunk.0.weight", "stages.2.0.conv1.weight"):
        assert torch.equal(initialised[key], source[key]), key      # the gate and the body are loaded
    for key in ("heads.0.weight", "heads.2.weight"):
        assert not torch.equal(initialised[key], source[key]), key  # every branch's classifier is fresh


# 5. Branched names outside their scripts -------------------------------------------------------------
@pytest.mark.parametrize("module, argv", [(train, ["--model", "one:resnet20:2"]),
                                          (train_kdcl, ["--models", "okddip:resnet20:4", "resnet20"]),
                                          (competitive, ["--models", "byot:resnet20", "resnet20"])])
def test_a_network_trained_as_several_is_refused_outside_its_script(module, argv, tmp_path, capsys):
    err = launch(capsys, module, [*TINY, *argv, "--out-dir", tmp_path / "run"], code=2)
    assert "is one network trained as several by train_" in err and not (tmp_path / "run").exists()


# 6. demo.py checks where it writes before it works ----------------------------------------------------
@pytest.mark.parametrize("flag, name", [("--out", "pred.txt"), ("--curves", "curves.xyz")])
def test_demo_refuses_an_unwritable_format_before_evaluating(flag, name, tmp_path, capsys, monkeypatch):
    import demo
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path / "run"])
    monkeypatch.setattr(demo, "build_group", lambda *a, **k: pytest.fail("evaluated before the check"))
    err = launch(capsys, demo, [tmp_path / "run", flag, tmp_path / name, "--device", "cpu"], code=2)
    assert f"{flag} '{tmp_path / name}'" in err and ".png" in err


def test_demo_images_that_are_not_files_say_what_they_are(tmp_path, capsys):
    import demo
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", tmp_path / "run"])
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    for path, what in ((tmp_path / "pipe", "is not a regular file"), (tmp_path / "folder", "is a directory"),
                       (tmp_path / "nothing.png", "does not exist")):
        err = launch(capsys, demo, [tmp_path / "run", "--images", path, "--device", "cpu"], code=2)
        assert f"image '{path}' {what}" in err


# 7. The weak spots ---------------------------------------------------------------------------------------
def test_an_extended_ramped_run_equals_a_straight_one(tmp_path, capsys):
    """Resumed with a larger --epochs, ONE's default ramp-up follows the new length (computed again from the
    flags), so the extended run is the straight one, tensor for tensor."""
    argv = [*TINY, "--model", "resnet20", "--deterministic"]
    launch(capsys, train_one, [*argv, "--epochs", "2", "--stop-after", "1", "--out-dir", tmp_path / "extended"])
    launch(capsys, train_one, [*argv, "--epochs", "3", "--resume", "auto", "--out-dir", tmp_path / "extended"])
    launch(capsys, train_one, [*argv, "--epochs", "3", "--out-dir", tmp_path / "straight"])
    assert_same_weights(weights(tmp_path / "extended" / "last.pt"), weights(tmp_path / "straight" / "last.pt"))
    resolved = json.loads((tmp_path / "extended" / "args.json").read_text())["resolved"]
    assert resolved["rampup_epochs"] == pytest.approx(3 * 80 / 300)


def test_a_resume_names_flags_as_the_command_line_spells_them_and_takes_another_spelling_of_the_group(tmp_path, capsys):
    run = tmp_path / "run"
    launch(capsys, train_kdcl, [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--stop-after", "1",
                                "--out-dir", run])
    err = launch(capsys, train_kdcl, [*TINY, "--teacher", "minlogit", "--epochs", "2", "--resume", "auto", "--out-dir", run],
                 code=2)
    assert "was written with --teacher naive; this run has minlogit" in err and "kdcl-teacher" not in err
    launch(capsys, competitive, [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--stop-after", "1",
                                 "--out-dir", tmp_path / "pair"])
    err = launch(capsys, competitive, [*TINY, "--model1", "resnet20", "--model2", "resnet32", "--epochs", "2", "--resume",
                                       "auto", "--out-dir", tmp_path / "pair"], code=2)
    assert "names resnet20 resnet32" in err
    launch(capsys, competitive, [*TINY, "--model1", "resnet20", "--model2", "resnet20", "--epochs", "2", "--resume", "auto",
                                 "--out-dir", tmp_path / "pair"])  # the same networks, spelled as a pair
    assert checkpoints.load_checkpoint(str(tmp_path / "pair" / "last.pt"))["epoch"] == 2


def test_export_checks_the_checkpoint_its_results_and_where_it_writes(tmp_path, capsys):
    import export
    a, b = tmp_path / "a", tmp_path / "b"
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--out-dir", a])
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--seed", "1", "--out-dir", b])
    # into another run's directory, or over another run's export: refused, nothing written
    err = launch(capsys, export, [a, "--out", b], code=2)
    assert "holds another run's files" in err
    launch(capsys, export, [b, "--out", tmp_path / "shared"])
    err = launch(capsys, export, [a, "--out", tmp_path / "shared"], code=2)
    assert "holds another run's files" in err
    launch(capsys, export, [a, "--out", a / "export"])
    launch(capsys, export, [a, "--out", a / "export"])  # its own export is replaced
    # last.pt newer than results.json: the accuracies are left out, with a note
    results = json.loads((a / "results.json").read_text())
    (a / "results.json").write_text(json.dumps({**results, "epochs": 1}))
    launch(capsys, export, [a, "--which", "last", "--out", tmp_path / "last"])
    assert "describes other weights than the checkpoint's" in capsys.readouterr().out
    # best.pt deleted from a run with a validation split: said as such
    (a / "best.pt").unlink()
    launch(capsys, export, [a, "--out", tmp_path / "nobest"])
    assert "its best.pt is missing, though the run had a validation split" in capsys.readouterr().out
    # a best.pt linked from another run: refused
    os.symlink(b / "best.pt", a / "best.pt")
    err = launch(capsys, export, [a, "--out", tmp_path / "linked"], code=2)
    assert "is not of the run in" in err and "--seed" in err


def study_of(tmp_path, capsys):
    """A study of two finished vanilla seeds (tiny real runs)."""
    study = tmp_path / "study"
    for seed in (0, 1):
        launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--seed", seed,
                               "--out-dir", study / "vanilla" / f"seed{seed}"])
    return study


def test_summarize_refuses_a_copied_run_a_broken_one_and_a_png_over_another_file(tmp_path, capsys):
    study = study_of(tmp_path, capsys)
    assert summarize.main([str(study), "--png", str(study / "vanilla" / "seed0" / "results.json")]) == 2
    assert "is a PNG file" in capsys.readouterr().err
    (tmp_path / "results.png").write_text("not a picture")
    assert summarize.main([str(study), "--png", str(tmp_path / "results.png")]) == 2
    assert "exists and is not a PNG image" in capsys.readouterr().err
    assert (tmp_path / "results.png").read_text() == "not a picture"
    results = study / "vanilla" / "seed1" / "results.json"
    record = json.loads(results.read_text())
    record["networks"][0]["final_test_acc"] = float("nan")
    results.write_text(json.dumps(record))
    assert summarize.main([str(study)]) == 2
    assert f"{results}: net0_resnet20's final_test_acc is nan" in capsys.readouterr().err
    import shutil
    shutil.rmtree(study / "vanilla" / "seed1")
    shutil.copytree(study / "vanilla" / "seed0", study / "vanilla" / "seed1")
    args = json.loads((study / "vanilla" / "seed1" / "args.json").read_text())
    (study / "vanilla" / "seed1" / "args.json").write_text(json.dumps({**args, "seed": 1}))  # the seed edited too
    assert summarize.main([str(study)]) == 2
    assert "not by vanilla/seed1 (a copied run would count twice)" in capsys.readouterr().err


def test_compare_usage_errors_are_one_line_with_exit_code_2(tmp_path):
    for argv in (["--out", str(tmp_path), "--configs", "nope"], ["--out", str(tmp_path), "--jobs", "0"]):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compare.py"), *argv],
                              capture_output=True, text=True, env=cpu_env(), cwd=ROOT)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ") and "usage:" not in done.stderr


def test_a_signal_after_the_run_finished_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    """A run whose files are written, signalled while its process ends: one line, exit code 0."""
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "--model", "resnet20", "--epochs", "1",
                                      "--out-dir", str(tmp_path / "run")])
    previous = {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS}
    try:
        stopping.launch(train.main, train.get_args_parser())
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert exit_info.value.code == 0
        assert "SIGTERM after the run had finished: its files are complete" in capsys.readouterr().out
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tensors_of(value):
    """Every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_of(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_of(item)]
    return []


@pytest.mark.parametrize("device", __import__("helpers").DEVICES)
def test_every_saved_file_holds_cpu_tensors(device, tmp_path, capsys):
    """Files meant for other machines load with a plain torch.load(..., weights_only=True), no map_location:
    last.pt (optimizer states, --model-ema averages), best.pt and deployed.pt hold CPU tensors only."""
    run = tmp_path / "run"
    launch(capsys, train_one, [*[a if a != "cpu" else device for a in TINY], "--model", "resnet20", "--epochs", "1",
                               "--model-ema", "0.9", "--out-dir", run])
    for name in ("last.pt", "best.pt", "deployed.pt"):
        content = torch.load(run / name, weights_only=True)
        assert tensors_of(content) and all(t.device.type == "cpu" for t in tensors_of(content)), name
