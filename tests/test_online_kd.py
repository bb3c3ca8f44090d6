"""The online-distillation baselines end to end (train_kdcl.py, train_one.py, train_okddip.py, train_pcl.py,
train_byot.py): runs on synthetic and real data, exact mid-epoch resume, torchrun, the deployed network,
bad input."""
import os

import pytest
import torch

import checkpoints
import engine
import flags
import models
import stopping
import train_byot as byot
import train_kdcl as kdcl
import train_okddip as okddip
import train_one as one
import train_pcl as pcl
import utils
from helpers import read_rows, sigterm_after_step
from test_distributed import torchrun

# Evaluated on 64 images of each split (the fake test split's 512 would take most of a tiny run's time); whole
# where demo.py's accuracy, always over the whole test split, is compared with the run's
WHOLE = ["--dataset", "fake", "--img-size", "16", "--train-subset", "96", "--val-size", "32", "--batch-size", "32",
         "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
TINY = [*WHOLE, "--eval-subset", "64"]
GROUP = {kdcl: ["--models", "resnet20", "resnet20"], one: ["--model", "resnet20"], okddip: ["--model", "resnet20"],
         pcl: ["--model", "resnet20"], byot: ["--model", "resnet20"]}
ROWS = {kdcl: ["net0_resnet20", "net1_resnet20", "ensemble"],
        one: ["branch0_resnet20", "branch1_resnet20", "branch2_resnet20", "ensemble"],
        okddip: ["leader_resnet20", "peer0_resnet20", "peer1_resnet20", "peer2_resnet20", "ensemble"],
        pcl: ["peer0_resnet20", "peer1_resnet20", "peer2_resnet20", "ensemble"],
        byot: ["deepest_resnet20", "exit1_resnet20", "exit2_resnet20", "ensemble"]}
# The column that shows each member distilling (BYOT: its shallow exits, from the deepest one)
KD = {kdcl: "train_kd", one: "train_kd", okddip: "train_kd", pcl: "train_kd_mean", byot: "train_kd"}
SCRIPTS = list(GROUP)


def run_main(module, argv):
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def one_line_error(capsys, module, argv):
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(module.main, module.get_args_parser(), [str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_two_epochs_write_one_row_per_member_and_epoch(module, tmp_path):
    results = run_main(module, [*TINY, *GROUP[module], "--epochs", "2", "--out-dir", tmp_path])
    rows = read_rows(tmp_path)
    assert [r["net"] for r in rows] == ROWS[module] * 2 and [r["epoch"] for r in rows][-1] == "2"
    assert [n["net"] for n in results["networks"]] == ROWS[module]
    distilling = [r for r in rows if r["net"] != "ensemble" and not r["net"].startswith("deepest")]
    assert all(float(r[KD[module]]) > 0 for r in distilling)  # every member distils (BYOT's deepest exit: none)
    assert all(r["test_acc"] and r["val_acc"] for r in rows)
    assert {"best.pt", "last.pt", "results.json"} <= set(os.listdir(tmp_path))


@pytest.mark.parametrize("module", [one, okddip, pcl, byot], ids=lambda m: m.__name__)
def test_the_deployed_network_is_a_plain_network_of_the_base(module, tmp_path, capsys):
    """deployed.pt loads into create_model(base) and gives the branched network's first row: the
    deployed branch's test accuracy, exactly; the startup line gives its size; demo.py shows the run."""
    import demo
    results = run_main(module, [*WHOLE, *GROUP[module], "--epochs", "1", "--out-dir", tmp_path])
    assert f"deployed network: {ROWS[module][0]}, a plain resnet20 of 0.27M parameters" in capsys.readouterr().out
    demo.main(demo.get_args_parser().parse_args([str(tmp_path), "--num-images", "2", "--device", "cpu"]))
    assert f"{results['networks'][0]['final_test_acc']:.2f}%" in capsys.readouterr().out  # the deployed network's
    plain = models.create_model("resnet20", num_classes=10, img_size=16, in_chans=3)
    plain.load_state_dict(torch.load(tmp_path / "deployed.pt", weights_only=True))  # strict
    args = module.get_args_parser().parse_args([*WHOLE, *GROUP[module]])
    rt = utils.setup_runtime(args)
    _, (_, _, test_loader) = utils.setup_data(args, rt)
    assert engine.evaluate([plain], test_loader, rt)[0]["acc"] == results["networks"][0]["final_test_acc"]
    # ... and --init takes it
    run_main(kdcl, [*WHOLE, "--models", "resnet20", "resnet20", "--epochs", "1", "--init", f"0={tmp_path / 'deployed.pt'}",
                    "--out-dir", tmp_path / "init"])


def test_parameter_counts():
    """ONE on ResNet-32 with 3 branches at 100 classes: about 1.19 M, its deployed branch 0.47 M
    (Lan et al. 2018); a KDCL group's networks are the standalone networks."""
    branched = models.create_model("one:resnet32:3", num_classes=100, img_size=32, in_chans=3)
    assert sum(p.numel() for p in branched.parameters()) == pytest.approx(1.19e6, rel=0.01)
    assert sum(v.numel() for v in branched.deployed_state_dict().values()) == pytest.approx(0.47e6, rel=0.01)
    args = kdcl.get_args_parser().parse_args(["--models", "resnet32", "mobilenet_v2"])
    info = type("Info", (), {"num_classes": 100, "img_size": 32, "in_chans": 3})
    nets = utils.build_nets(flags.check_args(args), info, utils.Runtime(torch.device("cpu"), None, False))
    for net, name in zip(nets, ["resnet32", "mobilenet_v2"]):
        alone = models.create_model(name, num_classes=100, img_size=32, in_chans=3)
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in alone.state_dict().items()}


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_a_mid_epoch_resume_is_exact(module, tmp_path):
    """Stopped by a signal after step 2 of epoch 2 and resumed: the same metrics as an uninterrupted run."""
    ramp = ["--rampup-epochs", "2"] if module in (one, okddip, pcl) else []  # a weight that changes between the epochs
    argv = [*TINY, *GROUP[module], "--epochs", "2", "--deterministic", *ramp]
    run_main(module, [*argv, "--out-dir", tmp_path / "straight"])
    with sigterm_after_step(5), pytest.raises(SystemExit) as stopped:  # step 2 of epoch 2
        run_main(module, [*argv, "--out-dir", tmp_path / "resumed"])
    assert stopped.value.code == 143
    assert checkpoints.load_checkpoint(str(tmp_path / "resumed" / "last.pt"))["step"] == 2
    run_main(module, [*argv, "--out-dir", tmp_path / "resumed", "--resume", "auto"])
    straight, resumed = read_rows(tmp_path / "straight"), read_rows(tmp_path / "resumed")
    keys = [k for k in straight[0] if k not in ("epoch_time_s", "images_per_s")]
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]


FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_one_epoch_on_a_fashion_mnist_subset_learns(module, tmp_path):
    """Real data: 512 Fashion-MNIST images, two epochs of 32 steps (evaluated after the second only, on
    1,000 test images); every member ends well above chance (10%)."""
    results = run_main(module, ["--dataset", "fashion-mnist", "--train-subset", "512", "--val-size", "0",
                                "--batch-size", "16", "--eval-subset", "1000", "--device", "cpu", "--workers", "0", "--no-progress",
                                *GROUP[module], "--epochs", "2", "--warmup-epochs", "0", "--eval-every", "2",
                                "--out-dir", tmp_path])
    # BYOT's shallow exits on a ResNet-20 are small (a bottleneck of 4 and 8 channels): above chance only
    floor = {name: 15 if module is byot and name.startswith("exit") else 30 for name in ROWS[module]}
    assert all(n["final_test_acc"] > floor[n["net"]] for n in results["networks"]), results["networks"]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_two_processes_under_torchrun(module, tmp_path):
    result = torchrun(f"{module.__name__}.py", [*TINY, *GROUP[module], "--batch-size", "16", "--epochs", "1",
                                                "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "2 process(es) x batch 16 (global 32)" in result.stdout
    assert [r["net"] for r in read_rows(tmp_path)] == ROWS[module]


def test_okddip_with_detached_teachers_under_torchrun(tmp_path):
    """--detach-teachers leaves the attention projections without gradient: fixed before DDP wraps the
    network, two processes train (DDP would otherwise wait for their gradients and fail at step 2)."""
    result = torchrun("train_okddip.py", [*TINY, *GROUP[okddip], "--batch-size", "16", "--epochs", "1",
                                          "--detach-teachers", "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert [r["net"] for r in read_rows(tmp_path)] == ROWS[okddip]


def test_detached_teachers_keep_the_projections_as_initialised(tmp_path, monkeypatch):
    """With --detach-teachers the projections end as they started; the rest of the network trains."""
    initial = {}

    def recording(net):
        initial.update({key: value.clone() for key, value in net.state_dict().items()})
        okddip_fix(net)

    okddip_fix = okddip.fix_projections
    monkeypatch.setattr(okddip, "fix_projections", recording)
    run_main(okddip, [*TINY, *GROUP[okddip], "--epochs", "1", "--detach-teachers", "--out-dir", tmp_path])
    trained = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["nets"][0]
    assert all(torch.equal(trained[key], initial[key]) for key in ("query.weight", "key.weight"))
    assert not torch.equal(trained["heads.0.weight"], initial["heads.0.weight"])  # a peer's classifier learnt


def test_bad_input_is_one_line(capsys, tmp_path):
    for module in (one, okddip):
        err = one_line_error(capsys, module, [*TINY, "--model", "vit_tiny", "--out-dir", tmp_path / "vit"])
        assert "vit_tiny cannot branch; choose from: resnet20" in err and "wrn_28_10" in err
        assert "tv_resnet18" not in err
        assert "cannot branch" in one_line_error(capsys, module, [*TINY, "--model", "tv:resnet18", "--out-dir", tmp_path / "tv"])
        minimum = 2 if module is one else 3  # OKDDip: two peers at least, or a peer has no one to attend to
        assert f"--branches must be >= {minimum}" in one_line_error(capsys, module, [*TINY, "--model", "resnet20", "--branches",
                                                                                     str(minimum - 1)])
    assert "invalid choice: 'best'" in one_line_error(capsys, kdcl, [*TINY, "--teacher", "best"])
    assert "at least 2 networks" in one_line_error(capsys, kdcl, [*TINY, "--models", "resnet20"])
    assert not (tmp_path / "vit").exists() and not (tmp_path / "tv").exists()  # nothing written


def test_pcls_temporal_mean_follows_the_trained_network():
    """The temporal mean's parameters after step t: decay min(1 - 1/(t + 1), 0.999): a copy after the first
    step, the average of the old mean and the new weights after the second; never a gradient of its own;
    its BatchNorm statistics its own (from its forwards), not the trained network's."""
    import types
    from helpers import step_run
    torch.manual_seed(0)
    model = models.create_model("pcl:resnet20:3", num_classes=10, img_size=16, in_chans=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    args = pcl.get_args_parser().parse_args([])
    run = step_run([model], [optimizer], torch.amp.GradScaler("cpu", enabled=False), args,
                   utils.Runtime(torch.device("cpu"), None, False))
    run.args, run.steps_per_epoch, run.resolved = args, 10, {"rampup_epochs": 0}
    views = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    labels = torch.randint(0, 10, (8,))
    batch = lambda step: pcl.pcl_batch(run, step, views, labels)[0]
    pcl.pcl_step(run, *batch(0))
    for mean, live in zip(model.mean.parameters(), model.live.parameters()):  # decay 0: a copy (to rounding)
        torch.testing.assert_close(mean, live, rtol=1e-6, atol=1e-7)
    before = [m.clone() for m in model.mean.parameters()]
    pcl.pcl_step(run, *batch(1))                                                                       # decay 1/2
    for old, mean, live in zip(before, model.mean.parameters(), model.live.parameters()):
        torch.testing.assert_close(mean, 0.5 * old + 0.5 * live, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.mean.parameters())
    bn = "trunk.1.running_mean"
    assert not torch.equal(model.mean.state_dict()[bn], model.live.state_dict()[bn])  # its own statistics
    assert batch(5000)[3].item() == pytest.approx(0.999)                               # the decay's ceiling
