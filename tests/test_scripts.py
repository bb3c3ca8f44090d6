"""The training scripts end to end on tiny synthetic data: runs, resume, interruption, bad input."""
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import errors
import flags
import models
import stopping
import train
import train_competitive_distillation as competitive
import train_mutual_learning as mutual
import utils
from helpers import ROOT, assert_same_weights, cpu_env, read_rows, step_run, weights, write_image_tree
from losses import kd_loss

SCRIPTS = ["train.py", "train_mutual_learning.py", "train_competitive_distillation.py", "train_ceit.py", "train_kdcl.py",
           "train_one.py", "train_okddip.py", "train_pcl.py", "train_byot.py", "demo.py"]
# 128 synthetic 16-px images, 4 steps of 32: seconds per epoch on two CPU cores.
TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "128", "--val-size", "64",
        "--batch-size", "32", "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]


def run_script(script, args, **kwargs):
    """Run a script in a subprocess with CUDA hidden; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=cpu_env(), cwd=ROOT, timeout=600, **kwargs)


def run_main(module, args):
    """Run a script's main() in this process with the given argv."""
    return module.main(module.get_args_parser().parse_args(args))


# Each script run as `python SCRIPT --help` runs it (as __main__, from the repository root, which is
# the scripts' folder), all in one interpreter: one torch import instead of one per script.
HELP_ALL = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    print(f"=== {script}", flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        print(f"=== exit {exit.code}", flush=True)
"""


def test_help():
    result = subprocess.run([sys.executable, "-c", HELP_ALL, *SCRIPTS], capture_output=True, text=True,
                            env=cpu_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    outputs = result.stdout.split("=== ")[1:]
    assert [part.split("\n", 1)[0] for part in outputs[::2]] == SCRIPTS
    for script, (text, end) in zip(SCRIPTS, zip(outputs[::2], outputs[1::2])):
        assert end.strip() == "exit 0", (script, end)
        assert "usage:" in text and ("--which" if script == "demo.py" else "--dataset") in text, script


def test_train_end_to_end_cuda_hidden(tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", [*TINY, "--model", "resnet20", "--epochs", "2", "--out-dir", str(out)])
    assert result.returncode == 0, result.stderr
    assert "device cpu" in result.stdout and "SYNTHETIC" in result.stdout
    for name in ("args.json", "metrics.csv", "last.pt", "best.pt", "results.json"):
        assert (out / name).exists(), name
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    rows = read_rows(out)
    assert [(r["epoch"], r["net"]) for r in rows] == [("1", "net0_resnet20"), ("2", "net0_resnet20")]
    results = json.loads((out / "results.json").read_text())
    assert results["networks"][0]["final_test_acc"] == pytest.approx(float(rows[-1]["test_acc"]), abs=1e-3)
    ckpt = checkpoints.load_checkpoint(str(out / "last.pt"))
    assert ckpt["models"] == ["resnet20"] and ckpt["epoch"] == 2 and ckpt["num_classes"] == 10


def test_competitive_heterogeneous_group_cuda_hidden(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--models", "resnet20", "vit_tiny", "--optimizer", "sgd", "adamw", "--lr", "0.05", "1e-3",
            "--epochs", "2", "--perturb-every", "2", "--out-dir", str(out)]
    result = run_script("train_competitive_distillation.py", args)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert [(r["epoch"], r["net"], r["model"]) for r in rows] == [
        (e, n, m) for e in ("1", "2") for n, m in
        [("net0_resnet20", "resnet20"), ("net1_vit_tiny", "vit_tiny"), ("ensemble", "resnet20+vit_tiny")]]
    for epoch in ("1", "2"):
        nets = [r for r in rows if r["epoch"] == epoch and r["net"] != "ensemble"]
        assert sum(float(r["train_leader_share"]) for r in nets) == pytest.approx(1.0)
        # with two networks exactly one learns each step: the mean teacher counts add up to 1
        assert sum(float(r["train_teachers"]) for r in nets) == pytest.approx(1.0)
        # the learning rates are each network's own
        assert float(nets[0]["lr"]) > 10 * float(nets[1]["lr"])


def test_sequential_mutual_learning_is_the_dml_papers_update():
    """--sequential: network 0 steps on CE + KD from network 1's predictions, then network 1 steps on
    CE + KD from network 0's *updated* predictions (Zhang et al. 2018, Algorithm 1)."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    nets = [make(), make()]
    copies = [copy.deepcopy(net) for net in nets]
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    args = mutual.get_args_parser().parse_args(["--models", "resnet20", "resnet20", "--sequential"])
    rt = utils.Runtime(torch.device("cpu"), None, False)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.5) for net in nets]
    stats = mutual.sequential_mutual_step(step_run(nets, optimizers, torch.amp.GradScaler("cpu", enabled=False), args, rt),
                                          [x, x], y, y, torch.ones(2))
    for i, other in ((0, 1), (1, 0)):  # by hand, in the paper's order
        net, teacher = copies[i], copies[other]
        (F.cross_entropy(net(x), y) + kd_loss(net(x), teacher(x).detach())).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.5 * p.grad
    for net, expected in zip(nets, copies):
        for p, q in zip(net.parameters(), expected.parameters()):
            torch.testing.assert_close(p, q)
    assert set(stats) == {"loss", "ce", "kd", "acc"} and all(v.shape == (2,) for v in stats.values())


def test_mutual_learning_three_networks_cuda_hidden(tmp_path):
    result = run_script("train_mutual_learning.py", [*TINY, "--models", "resnet20", "resnet20", "mobilenet_v2",
                                                     "--epochs", "1", "--perturb-every", "2", "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [n["net"] for n in results["networks"]] == ["net0_resnet20", "net1_resnet20", "net2_mobilenet_v2", "ensemble"]
    rows = read_rows(tmp_path)
    assert all(float(r["train_kd"]) > 0 for r in rows if r["net"] != "ensemble")
    assert "train_leader_share" not in rows[0]  # mutual learning has no leader


def test_authors_pair_flags():
    args = mutual.get_args_parser().parse_args(["--model1", "resnet", "--model2", "mobilenet", "--dataset", "cifar10"])
    assert flags.model_names(args) == ["resnet32", "mobilenet"]  # the authors' networks behind their names
    args = competitive.get_args_parser().parse_args(["--teacher", "resnet", "--student", "vit", "--dataset", "cifar10"])
    assert flags.model_names(args) == ["resnet32", "vit"]
    args = train.get_args_parser().parse_args(["--model", "resnet", "--dataset", "cifar10"])
    assert flags.model_names(args) == ["resnet32"]


def test_ceit_end_to_end_cuda_hidden(tmp_path):
    result = run_script("train_ceit.py", [*TINY, "--model", "ceit", "--epochs", "1", "--warmup-epochs", "0.5",
                                          "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["networks"][0]["model"] == "ceit"  # the authors' CeiT (32-channel stem, no LCA)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["optimizer"] == ["adamw"] and args["drop_path"] == 0.1 and args["label_smoothing"] == 0.1
    # and CeiT's per-image recipe (tests/test_ceit_recipe.py), which takes the torch loader
    assert args["rand_augment"] == "rand-m9-mstd0.5-inc1" and args["reprob"] == 0.25 and args["repeated_aug"]
    assert "torch loader" in result.stdout


@pytest.mark.parametrize("flag, vit_groups", [([], 2), (["--decay-norm-and-bias"], 1)])
def test_a_transformer_in_a_group_gets_the_transformer_recipe(flag, vit_groups):
    """In a mixed group the ViT gets DeiT's decay exemptions (norms, biases, pos_embed, cls_token) and
    stochastic depth, as in train_ceit.py; the CNN keeps decay everywhere and has no drop path."""
    args = competitive.get_args_parser().parse_args(["--models", "resnet20", "vit_tiny", "--dataset", "fake", *flag])
    info = types.SimpleNamespace(num_classes=10, img_size=32, in_chans=3)
    rt = utils.Runtime(torch.device("cpu"), None, False)
    nets = utils.build_nets(flags.model_names(args), info, rt, drop_path=args.drop_path)
    assert nets[1].blocks[-1].drop_path.rate == pytest.approx(0.1) and nets[1].blocks[0].drop_path.rate == 0
    optimizers, _ = utils.build_optimizers(args, nets, rt)
    assert [group["weight_decay"] for group in optimizers[0].param_groups] == [5e-4]
    vit_groups_found = [group for group in optimizers[1].param_groups if group["params"]]
    assert len(vit_groups_found) == vit_groups
    if vit_groups == 2:
        exempt = {id(p) for p in optimizers[1].param_groups[1]["params"]}
        assert optimizers[1].param_groups[1]["weight_decay"] == 0
        assert id(nets[1].pos_embed) in exempt and id(nets[1].cls_token) in exempt and id(nets[1].norm.weight) in exempt
        assert id(nets[1].blocks[0].attn.q.weight) not in exempt


def test_ceit_vit_pair_at_224_px():
    """A heterogeneous transformer pair at the authors' 224-px setting takes a competitive step."""
    torch.manual_seed(0)
    nets = [models.create_model(name, num_classes=5, img_size=224, in_chans=3) for name in ("ceit", "vit")]
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-4) for net in nets]
    images, labels = torch.randn(2, 3, 224, 224), torch.tensor([1, 3])
    args = competitive.get_args_parser().parse_args(["--models", "ceit", "vit"])
    rt = utils.Runtime(torch.device("cpu"), None, False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for net in nets for p in net.parameters()]
    stats = competitive.competitive_step(step_run(nets, optimizers, scaler, args, rt), [images, images], labels, labels,
                                         torch.ones(2))
    assert all(value.shape == (2,) and torch.isfinite(value).all() for value in stats.values())
    assert stats["leader_share"].sum() == 1 and stats["teachers"].sum() == 1          # one leader, one learner
    after = [p.detach() for net in nets for p in net.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after) if a.ndim > 1)


@pytest.mark.parametrize("module,extra", [
    (train, ["--model", "resnet20"]),
    (train, ["--model", "resnet20", "--no-crop", "--rotate", "15"]),
    (competitive, ["--models", "resnet20", "resnet20", "--perturb-every", "2"]),
    (competitive, ["--models", "resnet20", "resnet20", "--perturb-every", "2", "--amp", "bf16",
                   "--train-subset", "64"]),  # the CPU's bfloat16 convolutions are slow: 2 steps an epoch
], ids=["train", "train-no-crop-rotate", "competitive", "competitive-bf16"])
def test_exact_resume(tmp_path, module, extra):
    args = [*TINY, *extra, "--epochs", "2", "--deterministic"]
    run_main(module, [*args, "--out-dir", str(tmp_path / "straight")])
    run_main(module, [*args, "--out-dir", str(tmp_path / "split"), "--stop-after", "1"])
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    run_main(module, [*args, "--out-dir", str(tmp_path / "split"), "--resume", "auto"])
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt"))
    straight, split = read_rows(tmp_path / "straight"), read_rows(tmp_path / "split")
    assert [r["epoch"] for r in split] == [r["epoch"] for r in straight]  # no epoch missing or repeated
    for a, b in zip(straight, split):
        assert (a["train_loss"], a["test_acc"]) == (b["train_loss"], b["test_acc"])


def test_resume_into_a_new_out_dir_carries_the_best_weights(tmp_path):
    """--resume A/last.pt --out-dir B: B gets A's best weights (demo.py can load B/best.pt), every
    network's entry a real state, and later improvements are written on top of them."""
    args = [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2"]
    run_main(competitive, [*args, "--out-dir", str(tmp_path / "a"), "--stop-after", "1"])
    run_main(competitive, [*args, "--out-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "last.pt")])
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert len(best["nets"]) == 2 and all(isinstance(state, dict) and state for state in best["nets"])
    assert [r["epoch"] for r in read_rows(tmp_path / "b")] == ["2", "2", "2"]  # B's metrics start where it resumed


INTERRUPTIBLE = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "256", "--val-size", "64",
                 "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-progress",
                 "--models", "resnet20", "resnet20", "--perturb-every", "2", "--epochs", "2", "--deterministic"]


def interrupt_during_epoch_two(out, sig):
    """Start a competitive run, signal it shortly after epoch 1's checkpoint; returns (process, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train_competitive_distillation.py"),
                                *INTERRUPTIBLE, "--out-dir", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=ROOT)
    while not (out / "last.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # epoch 2 has 64 steps (about 1.5 s): the signal lands among them
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=600)
    return process, stdout, stderr


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    process, stdout, stderr = interrupt_during_epoch_two(out, signal.SIGTERM)
    assert process.returncode == 143, stdout + stderr
    assert "SIGTERM: stopped at epoch 2" in stdout
    ckpt = checkpoints.load_checkpoint(str(out / "last.pt"))
    assert ckpt["epoch"] == 1 and ckpt["step"] >= 1
    assert [r["epoch"] for r in read_rows(out)] == ["1", "1", "1"]   # epoch 1's rows kept, whole
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def test_ctrl_c_mid_epoch_then_resume_equals_straight_run(tmp_path):
    out = tmp_path / "interrupted"
    process, stdout, stderr = interrupt_during_epoch_two(out, signal.SIGINT)
    assert process.returncode == 130, stdout + stderr
    last = [line for line in stdout.splitlines() if "state saved to" in line]
    assert len(last) == 1 and "--resume" in last[0], stdout
    assert checkpoints.load_checkpoint(str(out / "last.pt"))["step"] >= 1
    # continue with the printed command, then compare with an uninterrupted run
    command = last[0].split("continue with: ", 1)[1].split()
    assert command[:2] == ["python", "train_competitive_distillation.py"]
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=cpu_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    run_main(competitive, [*INTERRUPTIBLE, "--out-dir", str(tmp_path / "straight")])
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(out / "last.pt"))
    straight, resumed = read_rows(tmp_path / "straight"), read_rows(out)
    assert [(r["epoch"], r["net"]) for r in resumed] == [(r["epoch"], r["net"]) for r in straight]
    for a, b in zip(straight, resumed):  # the epoch's statistics survive the interruption too
        assert (a["train_loss"], a["train_leader_share"], a["test_acc"]) == (b["train_loss"], b["train_leader_share"], b["test_acc"])


def expect_usage_error(capsys, module, args, *fragments):
    """The script exits with code 2 and one stderr line containing every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(module.main, module.get_args_parser(), args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("args,fragments", [
    (["--model", "resnet999"], ["unknown model 'resnet999'", "resnet32"]),
    (["--dataset", "cifar11"], ["unknown dataset", "cifar10"]),
    (["--epochs", "0"], ["--epochs must be a positive integer"]),
    (["--batch-size", "0"], ["--batch-size must be a positive integer"]),
    (["--lr", "-1"], ["--lr must be positive"]),
    (["--model", "vit_tiny", "--img-size", "18"], ["img_size 18", "patch"]),
    (["--resume", "no/such/file.pt"], ["does not exist"]),
    (["--train-subset", "100000"], ["--train-subset"]),
])
def test_bad_input(capsys, tmp_path, args, fragments):
    expect_usage_error(capsys, train, [*TINY, "--out-dir", str(tmp_path), *args], *fragments)


@pytest.mark.parametrize("value,fragment", [("-1", "--rotate must be in [0, 180] (degrees), got -1.0"),
                                            ("181", "--rotate must be in [0, 180]"),
                                            ("nan", "--rotate must be a finite number"),
                                            ("inf", "--rotate must be a finite number")])
def test_bad_rotate(capsys, tmp_path, value, fragment):
    expect_usage_error(capsys, train, [*TINY, "--out-dir", str(tmp_path), "--rotate", value], fragment)


def test_no_crop_on_an_image_folder_is_refused(capsys, tmp_path):
    write_image_tree(tmp_path / "data", ("train", "test"))
    expect_usage_error(capsys, train, [*TINY, "--out-dir", str(tmp_path / "run"), "--dataset", "imagefolder", "--data-dir",
                                       str(tmp_path / "data"), "--val-size", "0", "--no-crop"],
                       "--no-crop applies to in-memory data sets")


def test_missing_dataset_offline(capsys, tmp_path):
    expect_usage_error(capsys, train, ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download"], "CIFAR")


def test_group_needs_two_networks(capsys):
    expect_usage_error(capsys, competitive, [*TINY, "--models", "resnet20"], "at least 2 networks")
    expect_usage_error(capsys, mutual, [*TINY, "--models", "resnet20", "resnet20", "--lr", "0.1", "0.1", "0.1"],
                       "--lr takes one value or one per network")


def test_bad_resume_files(capsys, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--resume", str(garbage)], "not a PyTorch checkpoint file")
    run_dir = tmp_path / "run"
    run_main(train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", str(run_dir)])
    last = str(run_dir / "last.pt")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet32", "--epochs", "2", "--resume", last],
                       "was written with --model resnet20; this run has resnet32")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--num-classes", "7", "--resume", last],
                       "was written without --num-classes (it computed 10); this run has 7")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--resume", last], "raise --epochs")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--resume", last],
                       "was written with --batch-size 32; this run has 16")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--split-seed", "5", "--resume", last],
                       "--split-seed")
    # the augmentation too: a resumed run trains on the same kind of images
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--rotate", "10", "--resume", last],
                       "was written with --rotate 0.0; this run has 10.0")
    expect_usage_error(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--no-crop", "--resume", last],
                       "was written with --crop True; this run has False")


def test_a_resume_keeps_the_perturbation_schedule(capsys, tmp_path):
    """--perturb-every and --perturbations decide which steps and networks see perturbed batches: a
    resume that changes either is refused in one line."""
    run_dir = tmp_path / "run"
    group = [*TINY, "--models", "resnet20", "resnet20"]
    run_main(competitive, [*group, "--epochs", "1", "--out-dir", str(run_dir)])
    last = str(run_dir / "last.pt")
    expect_usage_error(capsys, competitive, [*group, "--epochs", "2", "--perturb-every", "5", "--resume", last],
                       "was written with --perturb-every 10; this run has 5", "a resume continues its run")
    expect_usage_error(capsys, competitive, [*group, "--epochs", "2", "--perturbations", "hflip", "--resume", last],
                       "was written with --perturbations", "this run has ['hflip']")


def test_compile_flag_wraps_networks_but_not_checkpoints():
    """--compile wraps each network; checkpoints and evaluation see the plain module's names."""
    rt = utils.Runtime(torch.device("cpu"), None, False, compile=True)
    info = argparse.Namespace(num_classes=3, img_size=16, in_chans=3)
    net = utils.build_nets(["resnet20"], info, rt)[0]
    assert hasattr(net, "_orig_mod")  # compiled lazily: nothing is compiled until the first forward
    saver = checkpoints.Checkpoints("unused", script="train", args=argparse.Namespace(), record={}, names=["resnet20"], nets=[net],
                                    info=argparse.Namespace(**vars(info), name="x", classes=(), mean=(), std=()),
                                    optimizers=[], rt=rt, state={})
    ckpt = saver.checkpoint(0, 0)
    plain = models.create_model("resnet20", num_classes=3, img_size=16, in_chans=3)
    plain.load_state_dict(ckpt["nets"][0])  # strict: the checkpoint has the plain module's names
    parser = train.get_args_parser()
    assert parser.parse_args([]).compile is False and parser.parse_args(["--compile"]).compile is True


def test_compile_under_torchrun_wraps_ddp_and_unwrap_sees_through_either_order(tmp_path):
    """Under torchrun --compile compiles the DDP module (Dynamo's DDP optimizer splits the graph at
    gradient buckets only when it traces DDP); unwrap finds the plain network in either nesting."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        # A runtime that says 2 processes makes build_nets wrap in DDP; the group of 1 is enough for that.
        rt = utils.Runtime(torch.device("cpu"), None, False, rank=0, world_size=2, compile=True)
        info = argparse.Namespace(num_classes=3, img_size=16, in_chans=3)
        net = utils.build_nets(["resnet20"], info, rt)[0]
        assert isinstance(net._orig_mod, DDP)                  # compile(DDP(network))
        plain = net._orig_mod.module
        assert isinstance(plain, type(models.create_model("resnet20", num_classes=3, img_size=16, in_chans=3)))
        assert models.unwrap(net) is plain
        assert models.unwrap(DDP(torch.compile(plain))) is plain     # the other order
        assert models.unwrap(torch.compile(plain)) is plain and models.unwrap(DDP(plain)) is plain
        assert models.unwrap(plain) is plain
    finally:
        dist.destroy_process_group()


def test_workers_default_follows_the_device(monkeypatch):
    """--workers: 2 on the CPU; on CUDA min(8, CPUs per process of this node); a given value wins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert utils.resolve_workers(None, torch.device("cpu")) == 2
    assert utils.resolve_workers(None, torch.device("cuda", 0)) == 8
    assert utils.resolve_workers(3, torch.device("cuda", 0)) == 3 and utils.resolve_workers(0, "cpu") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")           # 8 processes share the 32 CPUs
    assert utils.resolve_workers(None, torch.device("cuda", 0)) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert utils.resolve_workers(None, torch.device("cuda", 0)) == 1
    # setup_data hands the resolved count to the loaders
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    seen = []
    monkeypatch.setattr(utils, "make_loaders", lambda *a, workers, **k: seen.append(workers) or ([0], None, None))
    args = train.get_args_parser().parse_args(["--dataset", "fake", "--train-subset", "64", "--val-size", "0"])
    assert args.workers is None
    utils.setup_data(args, utils.Runtime(torch.device("cuda", 0), None, False))
    utils.setup_data(args, utils.Runtime(torch.device("cpu"), None, False))
    assert seen == [8, 2]


def test_resolve_device(monkeypatch):
    """CUDA devices always carry an index (torch.cuda.set_device refuses a bare 'cuda'); under
    torchrun it is the process's local rank; anything else is a one-line usage error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert utils.resolve_device("cuda") == torch.device("cuda:0")
    assert utils.resolve_device("auto") == torch.device("cuda:0")
    assert utils.resolve_device("cuda:1") == torch.device("cuda:1")
    assert utils.resolve_device("cuda", local_rank=3) == torch.device("cuda:3")
    assert utils.resolve_device("cpu", local_rank=3) == torch.device("cpu")
    for bad in ("gpu", "meta", "mps"):
        with pytest.raises(errors.UsageError, match="--device must be auto, cpu, cuda or cuda:N"):
            utils.resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(errors.UsageError, match="no CUDA device is available"):
        utils.resolve_device("cuda")


@pytest.mark.parametrize("cpu,native", [
    (argparse.Namespace(_get_cpu_capability=lambda: {"avx512_bf16": True, "amx_bf16": False}), True),
    (argparse.Namespace(_get_cpu_capability=lambda: {"avx512_bf16": False, "amx_bf16": True}), True),
    (argparse.Namespace(_get_cpu_capability=lambda: {"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}), False),
    (argparse.Namespace(_is_avx512_bf16_supported=lambda: False, _is_amx_tile_supported=lambda: True), True),  # older torch
    (argparse.Namespace(_is_avx512_bf16_supported=lambda: False, _is_amx_tile_supported=lambda: False), False),
    (argparse.Namespace(), False),                                                                            # no query at all
], ids=["avx512-bf16", "amx-bf16", "avx512-only", "old-amx", "old-none", "unknown"])
def test_native_bf16_detection(monkeypatch, cpu, native):
    from benchmarks import bench
    monkeypatch.setattr(torch._C, "_cpu", cpu)
    assert bench.cpu_has_native_bf16() is native


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_fp32_on_the_cpu_with_or_without_native_bf16(monkeypatch, native):
    """bf16 autocast trained no faster than fp32 on an AVX512-BF16 CPU (docs/speed.md), so auto stays fp32."""
    from benchmarks import bench
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: native)
    args = train.get_args_parser().parse_args(["--device", "cpu"])
    assert args.amp == "auto" and utils.setup_runtime(args).amp_dtype is None


@pytest.mark.parametrize("rank,local_rank,downloads", [(0, 0, "first"), (1, 1, "never"), (4, 0, "second")])
def test_one_download_per_file_system_under_torchrun(monkeypatch, rank, local_rank, downloads):
    """Rank 0 downloads first, then the first process of each other node; the rest only read."""
    events = []
    data = argparse.Namespace(info=argparse.Namespace(val_size=0, img_size=32, num_classes=10))
    monkeypatch.setattr(utils, "build_data", lambda *a, download, **k: events.append(("build", download)) or data)
    monkeypatch.setattr(utils.dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(utils, "make_loaders", lambda *a, **k: ([0], None, None))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    args = train.get_args_parser().parse_args(["--dataset", "cifar10", "--download"])
    rt = utils.Runtime(torch.device("cpu"), None, False, rank=rank, world_size=8)
    assert utils.setup_data(args, rt)[0] is data
    expected = {"first": [("build", True), "barrier", "barrier"],
                "second": ["barrier", ("build", True), "barrier"],
                "never": ["barrier", "barrier", ("build", False)]}[downloads]
    assert events == expected
