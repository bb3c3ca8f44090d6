"""Bring your own networks and weights: tv:/timm: model names in groups (train, checkpoint, resume,
demo.py), --init, --freeze, --config and the interval log lines of unattended runs (CPU, seconds each)."""
import importlib.util

import pytest
import torch

import demo
import engine
import models
import train_competitive_distillation as competitive
import utils
from helpers import read_rows

TINY = ["--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
HAVE_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (pip install timm; bash setup.sh --test installs it)")


def run(module, argv):
    """A script in-process, as from a shell."""
    return utils.launch(module.main, module.get_args_parser(), [str(a) for a in argv])


def one_line_error(capsys, module, argv, code=2):
    """Run a script that must fail: exit code `code` and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(module, argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# 1. model zoos ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,in_chans,img_size", [("tv:mobilenet_v3_small", 1, 16), ("tv:vit_b_32", 3, 32),
                                                    ("tv:googlenet", 3, 32), ("tv:resnet18", 3, 16)])
def test_torchvision_models_follow_the_model_contract(name, in_chans, img_size):
    net = models.create_model(name, num_classes=7, img_size=img_size, in_chans=in_chans)
    x = torch.randn(2, in_chans, img_size, img_size)
    assert net.train()(x).shape == net.eval()(x).shape == (2, 7)


@needs_timm
@pytest.mark.parametrize("name,in_chans", [("timm:test_vit", 3), ("timm:test_resnet", 1)])
def test_timm_models_follow_the_model_contract(name, in_chans):
    net = models.create_model(name, num_classes=7, img_size=16, in_chans=in_chans)
    x = torch.randn(2, in_chans, 16, 16)
    assert net.train()(x).shape == net.eval()(x).shape == (2, 7)


def test_zoo_names_are_checked_in_one_line():
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'.*resnet18"):
        models.resolve_name("tv:resnet19")
    with pytest.raises(ValueError, match=r"tv:alexnet cannot take 3x16px inputs.*--img-size"):
        models.create_model("tv:alexnet", num_classes=3, img_size=16, in_chans=3)
    assert models.resolve_name("TV:resnet18") == "tv:resnet18"


def test_a_missing_timm_is_one_line_saying_pip_install(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # `import timm` now raises ImportError
    err = one_line_error(capsys, competitive, [*TINY, "--models", "resnet20", "timm:resnet18"])
    assert "pip install timm" in err


def test_help_and_list_models_name_the_models(capsys):
    help_text = competitive.get_args_parser().format_help()
    assert "resnet56" in help_text and "tv:NAME" in help_text and "timm:NAME" in help_text
    with pytest.raises(SystemExit):
        competitive.get_args_parser().parse_args(["--list-models"])
    out = capsys.readouterr().out
    assert "tv:NAME" in out and "mobilenet_v3_small" in out and "timm:NAME" in out


def test_a_zoo_group_trains_resumes_and_loads_in_demo(tmp_path, capsys):
    """A registered, a torchvision and (when installed) a timm network compete; the run stops after
    one epoch, resumes for the second, and demo.py rebuilds the group from its names."""
    names = ["resnet20", "tv:mobilenet_v3_small"] + (["timm:test_vit"] if HAVE_TIMM else [])
    argv = [*TINY, "--models", *names, "--epochs", "2", "--out-dir", tmp_path]
    run(competitive, [*argv, "--stop-after", "1"])
    assert engine.load_checkpoint(str(tmp_path / "last.pt"))["models"] == names
    result = run(competitive, [*argv, "--resume", "auto"])
    assert [row["epoch"] for row in read_rows(tmp_path)][-1] == "2"
    assert [entry["model"] for entry in result["networks"][:-1]] == names
    assert result["networks"][1]["net"] == "net1_tv_mobilenet_v3_small"
    capsys.readouterr()
    run(demo, [tmp_path, "--which", "last", "--num-images", "2", "--out", tmp_path / "grid.png"])
    out = capsys.readouterr().out
    assert "net1_tv_mobilenet_v3_small" in out and (tmp_path / "grid.png").exists()
