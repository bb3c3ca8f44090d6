"""export.py on tiny trained runs (one network, a competitive pair, ONE, OKDDip): a fresh process that
imports only torch, safetensors and models/ rebuilds every exported network and predicts the test set
as the checkpoint does; the JSON says what the checkpoint and results.json say; ONNX agrees with
PyTorch; --init takes an exported file; bad input is one line, exit code 2, and leaves no file
(CPU, about half a minute: four one-step trainings, two subprocesses, one ONNX export)."""
import argparse
import errno
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import stopping
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoints
import demo
import export
import flags
import models
import train
import train_competitive_distillation as competitive
import train_okddip
import train_one
import utils
from helpers import ROOT, cpu_env

# One step of 32 of 64 training images at 16 px; 32 held out for validation (best.pt); the run evaluates 64 of
# the 512 test images (the tests below compare the networks on all 512).
TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--device", "cpu", "--workers", "0", "--no-progress", "--epochs", "1"]
RUNS = {"single": (train, ["--model", "resnet20"]),
        "pair": (competitive, ["--models", "resnet20", "resnet20"]),
        "one": (train_one, ["--model", "resnet20", "--branches", "2"]),        # deploys branch 0
        "okddip": (train_okddip, ["--model", "resnet20", "--branches", "3"])}  # deploys the leader, the last branch
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="--format onnx needs onnx and onnxscript: pip install onnx onnxscript")
HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None

# Rebuilds each exported network in a fresh process from its JSON and .safetensors file alone, runs
# the docs' snippet, and saves the logits on the given test images (and onnxruntime's, for ONNX files).
FRESH = r'''
import json, os, sys
import safetensors.torch
import torch
import models

spec = json.load(open(sys.argv[1]))
images = torch.load(spec["images"], weights_only=True)
logits = {}
for path in spec["exports"]:
    meta = json.load(open(path))
    net = models.create_model(meta["model"], num_classes=meta["num_classes"], img_size=meta["img_size"],
                              in_chans=meta["in_chans"])
    net.load_state_dict(safetensors.torch.load_file(os.path.join(os.path.dirname(path), meta["weights"])))
    with torch.no_grad():
        logits[path] = torch.cat([net.eval()(batch) for batch in images.split(256)])
for path in spec["onnx"]:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits[path] = torch.cat([torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])
                              for batch in images.split(256)])
exec(spec["snippet"])
repository = {name[:-3] for name in os.listdir(spec["root"]) if name.endswith(".py")} | {"datasets", "experiments"}
loaded = sorted(name for name in sys.modules if name.split(".")[0] in repository)
assert not loaded, f"the training code was imported: {loaded}"
torch.save(logits, spec["logits"])
'''


def run_export(argv):
    """export.py in-process, the way its __main__ runs it (bad input exits with code 2)."""
    return stopping.launch(export.main, export.get_args_parser(), [str(a) for a in argv])


def expect_error(argv, capsys, code=2):
    """Run export.py in-process; its one error line, after checking the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        run_export(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def docs_commands():
    """The argv of every export.py command in the bash blocks of README.md and docs/*.md."""
    commands = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", open(path).read(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" #")[0])
                if "export.py" in words:
                    commands.append(words[words.index("export.py") + 1:])
    return commands


def docs_snippet():
    """The Python block of docs/usage.md's "Sharing trained networks"."""
    text = open(os.path.join(ROOT, "docs", "usage.md")).read()
    section = text.split("## Sharing trained networks", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each of RUNS trained one step, and its best.pt exported into RUN/export (the single run through
    the command line, as a user runs it, with CUDA hidden)."""
    root = tmp_path_factory.mktemp("export")
    for name, (script, argv) in RUNS.items():
        stopping.launch(script.main, script.get_args_parser(), [*TINY, *argv, "--out-dir", str(root / name)])
        if name != "single":
            run_export([root / name])
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), str(root / "single")], capture_output=True,
                         text=True, env=cpu_env(), cwd=root, timeout=600, check=False)
    assert cli.returncode == 0 and not cli.stderr, cli.stderr
    assert cli.stdout.startswith(f"wrote {root / 'single' / 'export' / 'net0_resnet20.safetensors'} + .json: resnet20, epoch 1")
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def onnx_export(runs):
    """The single run's best.pt exported with --format onnx (None without onnx and onnxscript)."""
    if not HAS_ONNX:
        return None
    out = runs["single"] / "onnx"
    return out, run_export([runs["single"], "--format", "onnx", "--out", out])["net0_resnet20.json"]


@pytest.fixture(scope="module")
def test_set(runs):
    """The fake test set as the networks see it (the checkpoint's normalisation): (512, 3, 16, 16)."""
    ckpt = checkpoints.load_checkpoint(runs["single"] / "best.pt")
    data = demo.load_test_data(ckpt, argparse.Namespace(download=None, data_dir=None))
    return torch.stack([data.test[i][0] for i in range(len(data.test))])


@pytest.fixture(scope="module")
def checkpoint_logits(runs, test_set):
    """{exported JSON path: the checkpoint network's test-set logits}, networks rebuilt as demo.py does."""
    logits = {}
    for name, run in runs.items():
        path = run / "best.pt"
        for i, net in enumerate(demo.build_group([path], [checkpoints.load_checkpoint(path)], torch.device("cpu"))):
            with torch.no_grad():
                logits[str(run / "export" / f"net{i}_resnet20.json")] = torch.cat([net(b) for b in test_set.split(256)])
    return logits


@pytest.fixture(scope="module")
def fresh(runs, onnx_export, test_set, checkpoint_logits, tmp_path_factory):
    """FRESH's logits: every exported network, the ONNX file (with onnxruntime), the docs' snippet run."""
    root = tmp_path_factory.mktemp("fresh")
    torch.save(test_set, root / "images.pt")
    prefix = str(runs["single"] / "export" / "net0_resnet20")
    snippet = docs_snippet()
    assert snippet.count("runs/r56/export/net0_resnet56") == 2
    spec = {"images": str(root / "images.pt"), "exports": list(checkpoint_logits), "logits": str(root / "logits.pt"),
            "onnx": [str(onnx_export[0] / "net0_resnet20.onnx")] if onnx_export and HAS_ONNXRUNTIME else [],
            "snippet": snippet.replace("runs/r56/export/net0_resnet56", prefix), "root": ROOT}
    (root / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, "-c", FRESH, str(root / "spec.json")], capture_output=True, text=True,
                            env=cpu_env(), cwd=root, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    classes = checkpoints.load_checkpoint(runs["single"] / "best.pt")["classes"]
    printed = re.findall(r"'([^']+)'", result.stdout.splitlines()[-1])  # the snippet's 4 predicted classes
    assert len(printed) == 4 and set(printed) <= set(classes), result.stdout
    return torch.load(root / "logits.pt", weights_only=True)


def test_a_fresh_process_rebuilds_each_network_from_its_files(fresh, checkpoint_logits):
    assert len(checkpoint_logits) == 5  # single 1, pair 2, ONE 1, OKDDip 1
    for path, expected in checkpoint_logits.items():
        got = fresh[path]
        assert got.shape == expected.shape == (512, 10)
        assert (got - expected).abs().max() <= 1e-6, path
        assert torch.equal(got.argmax(1), expected.argmax(1)), path


def test_the_json_says_what_the_run_says(runs):
    for name, run in runs.items():
        ckpt = checkpoints.load_checkpoint(run / "best.pt")
        results = json.loads((run / "results.json").read_text())["networks"]
        n = len(ckpt["nets"])
        assert sorted(os.listdir(run / "export")) == sorted(f"net{i}_resnet20.{ext}" for i in range(n) for ext in ("json", "safetensors"))
        for i in range(n):
            record = json.loads((run / "export" / f"net{i}_resnet20.json").read_text())
            assert (record["model"], record["trained_as"], record["label"]) == ("resnet20", ckpt["models"][i], f"net{i}_resnet20")
            for key in ("num_classes", "img_size", "in_chans", "classes", "mean", "std", "dataset", "script"):
                assert record[key] == ckpt[key], key
            assert (record["checkpoint"], record["epoch"], record["step"]) == ("best.pt", ckpt["state"]["best"]["epoch"][i], 0)
            assert record["results"] == {k: v for k, v in results[i].items() if k not in ("net", "model")}
            assert record["results"]["best_val_acc"] == ckpt["state"]["best"]["val_acc"][i]
            assert record["args"] == json.loads(json.dumps(ckpt["args"], default=str))
            weights = run / "export" / record["weights"]
            assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
            with safe_open(weights, "pt") as f:
                assert f.metadata() == {"format": "pt", "model": "resnet20", "num_classes": "10", "img_size": "16", "in_chans": "3"}
    assert json.loads((runs["one"] / "export" / "net0_resnet20.json").read_text())["trained_as"] == "one:resnet20:2"


def test_a_branched_run_exports_its_deployed_branch(runs):
    # One epoch: best.pt's weights are the final ones, which the scripts also write as deployed.pt.
    for name in ("one", "okddip"):
        deployed = torch.load(runs[name] / "deployed.pt", weights_only=True)
        exported = load_file(runs[name] / "export" / "net0_resnet20.safetensors")
        assert exported.keys() == deployed.keys()
        assert all(torch.equal(exported[key], deployed[key]) for key in deployed), name


def test_which_last_exports_last_pt(runs, tmp_path, capsys):
    records = run_export([runs["pair"], "--which", "last", "--out", tmp_path])
    last = checkpoints.load_checkpoint(runs["pair"] / "last.pt")
    assert "epoch 1, test accuracy" in capsys.readouterr().out
    for i, state in enumerate(last["nets"]):
        assert records[f"net{i}_resnet20.json"]["checkpoint"] == "last.pt"
        assert records[f"net{i}_resnet20.json"]["epoch"] == last["epoch"] == 1
        exported = load_file(tmp_path / f"net{i}_resnet20.safetensors")
        assert exported.keys() == state.keys() and all(torch.equal(exported[key], state[key]) for key in state)


def test_init_starts_from_an_exported_file(runs, tmp_path, monkeypatch, capsys):
    weights = runs["one"] / "export" / "net0_resnet20.safetensors"
    built, build_nets = [], utils.build_nets

    def recording(*args, **kwargs):
        nets = build_nets(*args, **kwargs)
        built.append({key: value.detach().clone() for key, value in models.unwrap(nets[0]).state_dict().items()})
        return nets

    monkeypatch.setattr(utils, "build_nets", recording)
    stopping.launch(train.main, train.get_args_parser(), [*TINY, "--model", "resnet20", "--init", str(weights),
                                                       "--out-dir", str(tmp_path / "init")])
    assert f"initialised from {weights}" in capsys.readouterr().out
    expected = load_file(weights)
    assert len(built) == 1 and built[0].keys() == expected.keys()
    assert all(torch.equal(built[0][key], expected[key]) for key in expected)


@needs_onnx
def test_onnx_agrees_with_pytorch(onnx_export, fresh, checkpoint_logits, runs):
    out, record = onnx_export
    assert sorted(os.listdir(out)) == ["net0_resnet20.json", "net0_resnet20.onnx", "net0_resnet20.safetensors"]
    assert record["onnx"] == "net0_resnet20.onnx"
    assert json.loads((out / "net0_resnet20.json").read_text())["onnx_check"] == record["onnx_check"]
    if not HAS_ONNXRUNTIME:
        assert record["onnx_check"] is None
        pytest.skip("onnxruntime is not installed: the export is written unchecked (pip install onnxruntime)")
    assert record["onnx_check"]["inputs"] == 4 and record["onnx_check"]["max_abs_diff"] <= 1e-4
    got, expected = fresh[str(out / "net0_resnet20.onnx")], checkpoint_logits[str(runs["single"] / "export" / "net0_resnet20.json")]
    assert torch.allclose(got, expected, rtol=export.ONNX_RTOL, atol=export.ONNX_ATOL)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@needs_onnx
def test_onnx_without_onnxruntime_is_written_unchecked(onnx_export, runs, tmp_path, monkeypatch, capsys):
    model = (onnx_export[0] / "net0_resnet20.onnx").read_bytes()
    monkeypatch.setattr(export, "onnx_model", lambda *args: model)  # the export itself is tested above
    monkeypatch.setitem(sys.modules, "onnxruntime", None)           # makes it look uninstalled
    records = run_export([runs["single"], "--format", "onnx", "--out", tmp_path])
    assert "onnxruntime is not installed" in capsys.readouterr().out
    assert records["net0_resnet20.json"]["onnx_check"] is None and (tmp_path / "net0_resnet20.onnx").read_bytes() == model


@needs_onnx
def test_a_model_onnx_cannot_export_leaves_no_file(runs, tmp_path, monkeypatch, capsys):
    def unsupported(model, args, *, dynamo, dynamic_shapes, external_data, **kwargs):  # the arguments export.py checks for
        raise RuntimeError("unsupported operator aten::made_up\nmore detail")
    monkeypatch.setattr(torch.onnx, "export", unsupported)
    err = expect_error([runs["single"], "--format", "onnx", "--out", tmp_path / "out"], capsys, code=1)
    assert "cannot be exported to ONNX (RuntimeError: unsupported operator aten::made_up)" in err
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_leaves_nothing(runs, tmp_path, capsys):
    single = runs["single"]
    notes, started, best_only, corrupt = (tmp_path / name for name in ("notes", "started", "best_only", "corrupt"))
    for directory in (notes, started, best_only, corrupt):
        directory.mkdir()
    (notes / "notes.txt").write_text("not a run")
    (started / "args.json").write_bytes((single / "args.json").read_bytes())  # killed before its first epoch
    (best_only / "best.pt").write_bytes((single / "best.pt").read_bytes())
    (corrupt / "best.pt").write_text("not a checkpoint")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [([tmp_path / "missing"], "does not exist"),
             ([notes], "is not a run directory of this repository's scripts"),
             ([single / "best.pt"], f"pass the run directory that holds it ('{single}'"),
             ([started], "holds no best.pt or last.pt: nothing to export"),
             ([best_only, "--which", "last"], "holds no last.pt (its best.pt is exported with --which best)"),
             ([corrupt], "is not a PyTorch checkpoint file"),
             ([single, "--out", a_file], "is a file, not a directory"),
             ([single, "--out", a_file / "sub"], "cannot be created: "),
             ([single, "--format", "zip"], "invalid choice: 'zip'")]
    if os.geteuid() != 0:  # root writes into any directory
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        cases.append(([single, "--out", read_only / "export"], "is not writable"))
    for argv, message in cases:
        out = tmp_path / "out"
        err = expect_error([*argv] + ([] if "--out" in argv else ["--out", out]), capsys)
        assert message in err, (argv, err)
        assert not out.exists() and not (a_file / "sub").exists()
    assert sorted(os.listdir(notes)) == ["notes.txt"] and sorted(os.listdir(started)) == ["args.json"]


def test_missing_onnx_packages_are_one_line(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes it look uninstalled
    assert "pip install onnx onnxscript" in expect_error([runs["single"], "--format", "onnx", "--out", tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_no_file(runs, tmp_path, monkeypatch, capsys):
    replace, renamed = os.replace, []

    def full_disk_at_the_third(source, target):
        renamed.append(target)
        if len(renamed) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_at_the_third)
    err = expect_error([runs["pair"], "--out", tmp_path / "new" / "out"], capsys, code=1)
    assert os.strerror(errno.ENOSPC) in err and "nothing was exported" in err
    assert len(renamed) == 3 and os.listdir(tmp_path) == []  # two renamed into place, then removed, and their folders
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("the user's")
    renamed.clear()
    expect_error([runs["pair"], "--out", tmp_path / "out"], capsys, code=1)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]  # a folder that was there stays, with its files


def test_help_and_the_docs_commands():
    # (the `runs` fixture runs export.py as a command; its help needs no second process)
    assert all(flag in export.get_args_parser().format_help() for flag in ("RUN_DIR", "--which", "--format", "--out"))
    commands = docs_commands()
    assert len(commands) >= 3, commands  # README's and docs/usage.md's
    for argv in commands:
        export.get_args_parser().parse_args(argv)  # argparse exits (fails the test) on a bad flag
