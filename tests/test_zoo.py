"""Bring your own networks and weights: tv:/timm: model names in groups (train, checkpoint, resume,
demo.py), --init, --freeze, --config and the interval log lines of unattended runs (CPU, seconds each)."""
import importlib.util
import json
import re

import pytest
import torch

import checkpoints
import demo
import engine
import flags
import models
import stopping
import train
import train_competitive_distillation as competitive
import train_mutual_learning as mutual
import utils
from helpers import assert_same_weights, read_rows, weights

TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
HAVE_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (pip install timm; bash setup.sh --test installs it)")


def run(module, argv):
    """A script in-process, as from a shell."""
    return stopping.launch(module.main, module.get_args_parser(), [str(a) for a in argv])


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
    assert checkpoints.load_checkpoint(str(tmp_path / "last.pt"))["models"] == names
    result = run(competitive, [*argv, "--resume", "auto"])
    assert [row["epoch"] for row in read_rows(tmp_path)][-1] == "2"
    assert [entry["model"] for entry in result["networks"][:-1]] == names
    assert result["networks"][1]["net"] == "net1_tv_mobilenet_v3_small"
    capsys.readouterr()
    run(demo, [tmp_path, "--which", "last", "--num-images", "2", "--out", tmp_path / "grid.png"])
    out = capsys.readouterr().out
    assert "net1_tv_mobilenet_v3_small" in out and (tmp_path / "grid.png").exists()
    assert demo.get_args_parser().parse_args([str(tmp_path)]).device == "auto"  # like the training scripts


# 2. --init and --freeze ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-20 trained one epoch alone (train.py), and a competitive pair trained one epoch."""
    root = tmp_path_factory.mktemp("trained")
    single = run(train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", root / "single"])
    run(competitive, [*TINY, "--models", "resnet20", "resnet20", "--epochs", "1", "--out-dir", root / "pair"])
    return root / "single", root / "pair", single["networks"][0]["final_test_acc"]


def initialised_group(argv):
    """The networks a competitive run with `argv` starts from, and the test loader it would use."""
    args = competitive.get_args_parser().parse_args([str(a) for a in argv])
    group = flags.check_args(args)
    rt = utils.setup_runtime(args)
    data, (_, _, test_loader) = utils.setup_data(args, rt)
    return utils.build_nets(group, data.info, rt), test_loader, rt


def test_init_from_a_train_run_reproduces_its_test_accuracy_at_step_0(trained, tmp_path):
    single, pair, test_acc = trained
    # the same weights from its last.pt, from a plain state_dict saved by DDP under "state_dict", and from the pair's net1
    state = checkpoints.load_checkpoint(str(single / "last.pt"))["nets"][0]
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, tmp_path / "plain.pth")
    nets, test_loader, rt = initialised_group([*TINY, "--models", "resnet20", "resnet20", "resnet20", "--init",
                                               f"0={single / 'last.pt'}", f"1={tmp_path / 'plain.pth'}",
                                               f"2={pair / 'last.pt'}@net1_resnet20"])
    results = engine.evaluate(nets, test_loader, rt)
    assert results[0]["acc"] == results[1]["acc"] == test_acc
    pair_state = checkpoints.load_checkpoint(str(pair / "last.pt"))["nets"][1]
    assert all(torch.equal(value, pair_state[key]) for key, value in nets[2].state_dict().items())


def test_reset_classifier_takes_weights_trained_for_another_class_count(trained, capsys, tmp_path):
    single = trained[0]
    argv = [*TINY, "--num-classes", "5", "--models", "resnet20", "resnet20", "--init", f"0={single / 'last.pt'}", "--epochs", "1"]
    err = one_line_error(capsys, competitive, [*argv, "--out-dir", tmp_path / "refused"])
    assert "tensor 'fc.weight' is (10, 64) in the file but (5, 64) in network 0 (resnet20)" in err and "--reset-classifier" in err
    nets, _, _ = initialised_group([*argv, "--reset-classifier"])
    state = checkpoints.load_checkpoint(str(single / "last.pt"))["nets"][0]
    assert torch.equal(nets[0].state_dict()["features.0.weight"], state["features.0.weight"])
    assert nets[0].fc.weight.shape == (5, 64)


def test_a_frozen_network_never_changes_nor_gets_a_gradient(trained, tmp_path, monkeypatch):
    single = trained[0]
    step, steps = competitive.competitive_step, []

    def checked(run, *args, **kwargs):
        stats = step(run, *args, **kwargs)
        nets = run.nets
        assert all(p.grad is None and not p.requires_grad for p in nets[0].parameters())
        assert not nets[0].training and nets[1].training
        steps.append(stats)
        return stats

    monkeypatch.setattr(competitive, "competitive_step", checked)
    run(competitive, [*TINY, "--models", "resnet20", "resnet20", "--init", f"0={single / 'last.pt'}", "--freeze", "0",
                      "--epochs", "2", "--out-dir", tmp_path])
    assert len(steps) == 4
    before, after = checkpoints.load_checkpoint(str(single / "last.pt")), checkpoints.load_checkpoint(str(tmp_path / "last.pt"))
    assert before["nets"][0].keys() == after["nets"][0].keys()
    assert all(torch.equal(value, after["nets"][0][key]) for key, value in before["nets"][0].items())  # BatchNorm statistics too
    assert after["optimizers"][0] == {} and after["optimizers"][1]
    assert not all(torch.equal(value, after["nets"][1][key]) for key, value in before["nets"][0].items())
    assert [row["lr"] for row in read_rows(tmp_path) if row["net"] == "net0_resnet20"] == ["0", "0"]


@pytest.mark.parametrize("flags,fragment", [
    (["--init", "5={single}"], "give NET=FILE with NET a network index of the group, 0..1"),
    (["--init", "{single}"], "give NET=FILE"),
    (["--init", "0=/nonexistent/best.pt"], "weight file '/nonexistent/best.pt' does not exist"),
    (["--init", "0={single}", "0={single}"], "names network 0 twice"),
    (["--init", "0={pair}"], "holds 2 networks (net0_resnet20, net1_resnet20); pick one"),
    (["--init", "0={pair}@7"], "no such network"),
    (["--init", "0={single}@1"], "no such network"),
    (["--init", "0={text}"], "is not a readable weight file"),
    (["--init", "0={tensor}"], "holds no state_dict"),
    (["--init", "0={plain}@0"], "@ picks a network of this repository's checkpoints"),
    (["--models", "resnet32", "resnet20", "--init", "0={single}"], "network 0 (resnet32)"),
    (["--models", "resnet20", "resnet20", "--init", "0={wider}"], "the file's tensor 'extra.weight' has no place in network 0"),
    (["--reset-classifier"], "--reset-classifier applies to networks initialised with --init or --pretrained"),
    (["--freeze", "2"], "--freeze 2: networks are numbered 0..1"),
    (["--freeze", "0", "1"], "--freeze names all 2 networks: at least one must train"),
])
def test_bad_init_and_freeze_flags_are_one_line_errors(trained, tmp_path, capsys, flags, fragment):
    single, pair, _ = trained
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    state = checkpoints.load_checkpoint(str(single / "last.pt"))["nets"][0]
    torch.save(state, tmp_path / "plain.pt")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "wider.pt")
    paths = dict(single=single / "last.pt", pair=pair / "last.pt", text=tmp_path / "notes.txt",
                 tensor=tmp_path / "tensor.pt", plain=tmp_path / "plain.pt", wider=tmp_path / "wider.pt")
    group = [] if "--models" in flags else ["--models", "resnet20", "resnet20"]
    err = one_line_error(capsys, competitive, [*TINY, *group, *[f.format(**paths) for f in flags], "--out-dir", tmp_path / "run"])
    assert fragment in err, err


def test_init_takes_torchvision_and_timm_weight_files(tmp_path):
    """torchvision's weight files are plain state_dicts (.pth); timm's hub files are .safetensors."""
    files = {"tv:mobilenet_v3_small": tmp_path / "mobilenet.pth"}
    if HAVE_TIMM:
        files["timm:test_vit"] = tmp_path / "test_vit.safetensors"
    sources = {}
    for name, path in files.items():
        sources[name] = models.create_model(name, num_classes=10, img_size=16, in_chans=3).state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(sources[name], str(path))
        else:
            torch.save(sources[name], path)
    nets, _, _ = initialised_group([*TINY, "--models", "resnet20", *files,
                                    "--init", *[f"{i + 1}={path}" for i, path in enumerate(files.values())]])
    for net, source in zip(nets[1:], sources.values()):
        assert all(torch.equal(value, source[key]) for key, value in net.state_dict().items())


# 3. --config --------------------------------------------------------------------------------------
def test_a_run_repeated_from_its_args_json_is_bit_identical(tmp_path):
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    run(competitive, [*TINY, "--models", "resnet20", "tv:mobilenet_v3_small", "--epochs", "1", "--deterministic",
                      "--out-dir", first])
    saved = json.loads((first / "args.json").read_text())
    assert saved["lr"] is None and saved["img_size"] == 16 and saved["val_size"] == 32 and saved["num_classes"] is None
    assert saved["resolved"]["lr"] == [0.025] and saved["resolved"]["num_classes"] == 10  # computed, recorded apart
    run(competitive, ["--config", first / "args.json", "--out-dir", again])
    assert_same_weights(weights(first / "last.pt"), weights(again / "last.pt"))
    assert [row["test_acc"] for row in read_rows(first)] == [row["test_acc"] for row in read_rows(again)]
    repeated = json.loads((again / "args.json").read_text())
    assert {k: v for k, v in repeated.items() if k not in ("out_dir", "config", "given")} == \
           {k: v for k, v in saved.items() if k not in ("out_dir", "config", "given")}  # given: --config alone
    run(competitive, ["--config", first / "args.json", "--seed", "1", "--out-dir", changed])  # one flag changed
    assert json.loads((changed / "args.json").read_text())["seed"] == 1
    assert not torch.equal(weights(first / "last.pt")[0]["fc.weight"], weights(changed / "last.pt")[0]["fc.weight"])


@pytest.mark.parametrize("content,fragment", [
    (None, "No such file or directory"),
    ("{not json", "is not a JSON file of flag values"),
    ("[1, 2]", "must hold a JSON object of flag values"),
    ('{"teacher_rule": "best"}', "'teacher_rule' is not a flag of"),
    ('{"optimizer": ["sgdd"]}', 'optimizer = ["sgdd"] is not a value of --optimizer'),
    ('{"epochs": "two"}', 'epochs = "two" is not a value of --epochs'),
    ('{"lr": 0.1}', "lr = 0.1 is not a value of --lr"),
    ('{"deterministic": 1}', "deterministic = 1 is not a value of --deterministic"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, fragment):
    path = tmp_path / "args.json"
    if content is not None:
        path.write_text(content)
    err = one_line_error(capsys, train, [*TINY, "--config", path, "--out-dir", tmp_path / "run"])
    assert fragment in err, err


# 4. logs of unattended runs -----------------------------------------------------------------------
def test_a_run_without_a_terminal_prints_interval_lines(tmp_path, capsys):
    """stdout is not a terminal under pytest: the default interval is on. 64 images in batches of 8
    are 8 steps an epoch: lines after steps 4 and 8 of each epoch with --log-interval 4."""
    capsys.readouterr()
    run(competitive, [*TINY, "--batch-size", "8", "--models", "resnet20", "resnet20", "--freeze", "0", "--epochs", "2",
                      "--log-interval", "4", "--out-dir", tmp_path])
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("epoch ") and " step " in line]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 1/2 step 4/8", "epoch 1/2 step 8/8",
                                                       "epoch 2/2 step 4/8", "epoch 2/2 step 8/8"]
    assert all(re.search(r"\| loss \d+\.\d{4} \d+\.\d{4} \| lr 0 0\.\d+ \| \d+ img/s \| ETA epoch \d:\d\d:\d\d, run \d:\d\d:\d\d$",
                         line) for line in lines), lines
    assert "compile off, CUDA graphs off" in out[0]
    assert out[1].startswith("  train subset: 64 images, the first of the training split; per class ")
    assert out[2].startswith("  --eval-subset: test 64 of 512 images")
    assert out[3].startswith("  net0_resnet20: 0.27M parameters, random initial weights, frozen")
    assert out[4].startswith("  net1_resnet20: 0.27M parameters, random initial weights, SGD peak lr 0.00625, weight decay 0.0005")
    assert engine.log_interval(competitive.get_args_parser().parse_args([])) == engine.LOG_INTERVAL


def test_interval_lines_are_off_with_0_and_a_negative_interval_is_refused(tmp_path, capsys):
    run(train, [*TINY, "--batch-size", "8", "--model", "resnet20", "--epochs", "1", "--log-interval", "0", "--out-dir", tmp_path])
    assert " step " not in capsys.readouterr().out
    err = one_line_error(capsys, train, [*TINY, "--log-interval", "-1", "--out-dir", tmp_path / "x"])
    assert "--log-interval must be >= 0 (0 = off), got -1" in err


@pytest.mark.parametrize("extra", [[], ["--sequential"]])
def test_a_frozen_network_in_mutual_learning_keeps_its_weights(trained, tmp_path, extra):
    single = trained[0]
    run(mutual, [*TINY, "--models", "resnet20", "resnet20", "--init", f"1={single / 'last.pt'}", "--freeze", "1",
                 "--epochs", "1", "--out-dir", tmp_path, *extra])
    before, after = weights(single / "last.pt")[0], weights(tmp_path / "last.pt")[1]
    assert all(torch.equal(value, after[key]) for key, value in before.items())


# 3. --pretrained and weights for other input channels ---------------------------------------------
def test_init_adapts_an_rgb_stem_to_one_channel_by_summing_and_says_so(tmp_path, capsys):
    """An RGB state_dict of tv:resnet18 (as ImageNet weights are) starts a network on 1-channel images: the
    stem's kernels summed over the colours (a grey image gives the response of its grey RGB copy), the rest as is."""
    rgb = models.create_model("tv:resnet18", num_classes=10, img_size=16, in_chans=3).state_dict()
    torch.save(rgb, tmp_path / "rgb.pth")
    write_fashion(tmp_path / "data")
    capsys.readouterr()
    net = initialised_group([*TINY, "--dataset", "fashion-mnist", "--data-dir", tmp_path / "data",
                             "--models", "tv:resnet18", "resnet20", "--init", f"0={tmp_path / 'rgb.pth'}"])[0][0]
    out = capsys.readouterr().out
    assert "network 0 (tv:resnet18): 'conv1.weight' adapted from 3 to 1 input channel (summed" in out
    assert torch.equal(net.conv1.weight, rgb["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(net.layer1[0].conv1.weight, rgb["layer1.0.conv1.weight"])
    grey, conv = torch.rand(2, 1, 16, 16), torch.nn.functional.conv2d
    assert torch.allclose(conv(grey, net.conv1.weight, stride=2, padding=3),
                          conv(grey.expand(-1, 3, -1, -1), rgb["conv1.weight"], stride=2, padding=3), atol=1e-5)


def test_adapting_to_other_channel_counts_repeats_and_scales_as_timm():
    from models.weights import adapt_input_channels
    weight = torch.randn(4, 3, 3, 3)
    two, five = adapt_input_channels(weight, 2), adapt_input_channels(weight, 5)
    assert torch.equal(two, weight[:, :2] * 1.5)
    assert torch.allclose(five, torch.cat([weight, weight[:, :2]], dim=1) * 0.6)


def write_torchvision_cache(home, name="resnet18"):
    """A weight file where torch.hub caches torchvision's pretrained `name` (random weights of its
    architecture, 1000 classes), as a download would leave it; returns its state_dict."""
    import os
    import torchvision
    weights = torchvision.models.get_model_weights(name).DEFAULT
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    torch.save(state, folder / os.path.basename(weights.url))
    return state


def test_pretrained_loads_the_cached_torchvision_weights_adapting_stem_and_head(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    imagenet = write_torchvision_cache(tmp_path / "torch")
    argv = [*TINY, "--dataset", "fashion-mnist", "--data-dir", tmp_path / "data", "--models", "tv:resnet18", "resnet20",
            "--pretrained", "--epochs", "1", "--out-dir", tmp_path / "run", "--stop-after", "1"]
    write_fashion(tmp_path / "data")
    capsys.readouterr()
    run(competitive, argv)
    out = capsys.readouterr().out
    assert "network 0 (tv:resnet18): classifier re-initialised (1000 classes in the weights, 10 here)" in out
    assert "'conv1.weight' adapted from 3 to 1 input channel" in out
    assert "net0_tv_resnet18: 11.18M parameters, the library's pretrained weights (--pretrained)" in out
    assert "net1_resnet20: 0.27M parameters, random initial weights" in out
    args = competitive.get_args_parser().parse_args([str(a) for a in argv])
    nets = initialised_group(argv)[0]  # what the run started from
    assert torch.equal(nets[0].conv1.weight, imagenet["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(nets[0].layer4[1].bn2.running_var, imagenet["layer4.1.bn2.running_var"])
    assert nets[0].fc.weight.shape == (10, 512)
    assert flags.check_args(args).pretrained == {0}


def write_fashion(root):
    from helpers import write_mnist_like
    write_mnist_like(root / "FashionMNIST" / "raw", train=120, test=20)


@pytest.mark.parametrize("flags_,fragment", [
    (["--models", "resnet20", "resnet20", "--pretrained"], "--pretrained loads the weights of tv: and timm: networks; this run has none"),
    (["--models", "tv:resnet18", "resnet20", "--pretrained", "1"], "--pretrained 1: network 1 (resnet20) is not a tv: or timm: network"),
    (["--models", "tv:resnet18", "resnet20", "--pretrained", "3"], "--pretrained 3: no such network; the group's are 0..1"),
    (["--models", "tv:resnet18", "resnet20", "--pretrained", "--init", "0={file}"], "network 0 is given both --init and --pretrained"),
    (["--models", "tv:resnet18", "resnet20", "--pretrained"], "tv:resnet18's weights (IMAGENET1K_V1) are not in"),
])
def test_pretrained_refusals_and_an_offline_machine_are_one_line(tmp_path, capsys, monkeypatch, flags_, fragment):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    import torch.hub
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")), raising=False)
    torch.save({}, tmp_path / "w.pth")
    err = one_line_error(capsys, competitive, [*TINY, *[f.format(file=tmp_path / "w.pth") for f in flags_],
                                               "--epochs", "1", "--out-dir", tmp_path / "run"])
    assert fragment in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_pretrained_timm_weights_that_cannot_be_had_are_one_line(monkeypatch):
    """timm's weights come from the Hugging Face hub (or its cache); whatever the hub raises offline, the run
    gets one line naming the model and where the weights are cached."""
    def offline(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them in the cache")
    monkeypatch.setattr(models.zoo, "import_timm", lambda: __import__("types").SimpleNamespace(create_model=offline,
                                                                                               is_model=lambda name: True))
    with pytest.raises(ValueError) as error:
        models.zoo.pretrained_state("timm:resnet18")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--pretrained: timm:resnet18's weights could not be loaded")
    assert "OSError: We couldn't connect" in message and "HF_HUB_CACHE" in message
