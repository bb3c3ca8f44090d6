"""Data parallelism on the CPU: gloo, two processes, torchrun for whole runs and
torch.multiprocessing for the step-level checks (teacher choice, perturbation draws, evaluation
counts, the replica guard, and the first losses of a 2-process run against a 1-process run)."""
import gc
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import checkpoints
import engine
import errors
import flags
import helpers
import stopping
import train_competitive_distillation as competitive
import utils
from helpers import ROOT, assert_same_weights, read_rows, step_run, weights
from perturb import PERTURBATIONS, Perturber
from models import unwrap

WORLD_SIZE = 2
TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "128", "--val-size", "64", "--batch-size", "16",
        "--device", "cpu", "--workers", "0", "--no-progress"]
# 2 epochs of 64 steps per process: long enough to signal a process in the middle of epoch 2.
LONG = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "512", "--val-size", "64", "--batch-size", "4",
        "--device", "cpu", "--workers", "0", "--no-progress", "--models", "resnet20", "resnet20",
        "--perturb-every", "2", "--epochs", "2", "--deterministic"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Compute on one thread here, as the spawned and torchrun processes do (equal arithmetic)."""
    # It also keeps OpenMP threads from spinning against the 2 worker processes on 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_env():
    """A subprocess environment without GPUs, one thread per process (torchrun's default too)."""
    return helpers.cpu_env(OMP_NUM_THREADS="1")


def torchrun_command(script, args, launcher=()):
    """`torchrun --standalone --nproc_per_node 2 [launcher flags] script args` through this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
            *launcher, os.path.join(ROOT, script), *args]


def torchrun(script, args, launcher=()):
    """Run a script under torchrun with 2 CPU processes; returns the CompletedProcess."""
    return subprocess.run(torchrun_command(script, args, launcher), capture_output=True, text=True, env=cpu_env(),
                          cwd=ROOT, timeout=600)


def single_process_evaluation(run_dir, args):
    """Evaluate a run's last.pt in this (single) process on the run's val and test sets."""
    args = competitive.get_args_parser().parse_args(args)  # its flags cover the mutual runs' too
    rt = utils.Runtime(CPU, None, args.channels_last)
    data, (_, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(flags.model_names(args), data.info, rt)
    for net, state in zip(nets, weights(os.path.join(run_dir, "last.pt"))):
        net.load_state_dict(state)
    return engine.evaluate(nets, val_loader, rt), engine.evaluate(nets, test_loader, rt)


def assert_logged_metrics_count_every_sample_once(run_dir, args):
    """The last epoch's logged val/test numbers (reduced over 2 processes) equal a 1-process evaluation."""
    val, test = single_process_evaluation(run_dir, args)
    rows = read_rows(run_dir)
    last = rows[-len(val):]
    for row, v, t in zip(last, val, test):
        assert float(row["val_acc"]) == pytest.approx(v["acc"], rel=1e-5), row["net"]
        assert float(row["test_acc"]) == pytest.approx(t["acc"], rel=1e-5), row["net"]
        assert float(row["test_loss"]) == pytest.approx(t["loss"], rel=1e-4), row["net"]


# ----------------------------------------------------------------------------------------------
# Whole runs under torchrun
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 2-process competitive run with the LONG flags (the reference for resume)."""
    out = tmp_path_factory.mktemp("straight")
    result = torchrun("train_competitive_distillation.py", [*LONG, "--out-dir", str(out)])
    return out, result


def test_competitive_two_processes(straight_run):
    out, result = straight_run
    assert result.returncode == 0, result.stderr
    assert "2 process(es) x batch 4 (global 8), lr x2 (--lr-scaling linear)" in result.stdout
    rows = read_rows(out)
    assert [(r["epoch"], r["net"]) for r in rows] == [
        (e, n) for e in ("1", "2") for n in ("net0_resnet20", "net1_resnet20", "ensemble")]
    for epoch in ("1", "2"):
        nets = [r for r in rows if r["epoch"] == epoch and r["net"] != "ensemble"]
        # every step has one leader, the same on both processes: shares reduced over ranks add up to 1
        assert sum(float(r["train_leader_share"]) for r in nets) == pytest.approx(1.0)
        assert sum(float(r["train_teachers"]) for r in nets) == pytest.approx(1.0)
    # the replica guard ran after every epoch (it raises on a mismatch); rank 0's checkpoint is whole
    assert checkpoints.load_checkpoint(str(out / "last.pt"))["resolved"]["world_size"] == 2
    assert_logged_metrics_count_every_sample_once(out, LONG)


def test_resume_with_another_process_count_is_refused(straight_run, tmp_path):
    out, _ = straight_run
    args = competitive.get_args_parser().parse_args(
        [*LONG, "--epochs", "3", "--resume", str(out / "last.pt"), "--out-dir", str(tmp_path)])
    with pytest.raises(errors.UsageError, match=r"written by 2 processes; resume it with the same number \(this run has 1\)"):
        competitive.main(args)


def test_mutual_two_processes(tmp_path):
    args = [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--perturb-every", "2"]
    result = torchrun("train_mutual_learning.py", [*args, "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["1"] * 3 + ["2"] * 3
    assert all(float(r["train_kd"]) > 0 for r in rows if r["net"] != "ensemble")
    assert_logged_metrics_count_every_sample_once(tmp_path, args)


def test_the_process_group_is_destroyed_after_what_holds_it_is_freed(tmp_path):
    """A DDP network left in a reference cycle is collected before the group goes, not at interpreter exit."""
    DDP = nn.parallel.DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection between the cycle's creation and the call
    try:
        holder = types.SimpleNamespace(net=DDP(nn.Linear(3, 2)))
        holder.itself = holder
        del holder
        assert any(type(o) is DDP for o in gc.get_objects())      # the cycle keeps it alive...
        stopping.close_process_group()
        assert not dist.is_initialized()
        assert not any(type(o) is DDP for o in gc.get_objects())  # ...until the group is closed
    finally:
        if enabled:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("script,model", [("train.py", "resnet20"), ("train_ceit.py", "ceit_tiny")])
def test_single_network_scripts_two_processes(tmp_path, script, model):
    result = torchrun(script, [*TINY, "--model", model, "--epochs", "1", "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "2 process(es) x batch 16 (global 32)" in result.stdout
    assert [r["net"] for r in read_rows(tmp_path)] == [f"net0_{model}"]
    if script == "train_ceit.py":  # CeiT's recipe: repeated augmentation dealt to the 2 processes, the torch loader
        assert "repeated augmentation x3 (DeiT's RASampler: 64 images per process and epoch of 128)" in result.stdout
        assert "torch loader" in result.stdout


def worker_pids(launcher_pid):
    """{rank: pid} of the worker processes that torchrun started."""
    children = []
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
            children += f.read().split()
    ranks = {}
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"RANK="):
                    ranks[int(entry[5:])] = int(pid)
    return ranks


def signal_rank_one_during_epoch_two(out, sig, launcher=()):
    """Start the LONG competitive run with --resume auto, signal rank 1 early in epoch 2; returns (rc, out, err)."""
    process = subprocess.Popen(torchrun_command("train_competitive_distillation.py",
                                                [*LONG, "--out-dir", str(out), "--resume", "auto"], launcher),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=ROOT)
    while not (out / "last.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # epoch 2 (64 steps per process) has just begun: the signal lands among its first steps
    os.kill(worker_pids(process.pid)[1], sig)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_job_then_resume_auto_finishes(tmp_path, straight_run):
    out = tmp_path / "run"
    returncode, stdout, stderr = signal_rank_one_during_epoch_two(out, signal.SIGKILL)
    assert returncode != 0, stdout
    # torchrun's failure summary names the killed process and why. It is not always the "Root
    # Cause" entry: that is the earliest timestamp, and rank 0's own error (its peer vanished) can
    # be stamped before the launcher notices the kill. One summary entry ("[k]:" blocks) must say it.
    assert "Failures:" in stderr or "Root Cause" in stderr, stderr  # torchrun's failure summary, shown when absent
    summary = stderr[stderr.index("Root Cause") if "Failures:" not in stderr else stderr.index("Failures:"):]
    assert re.search(r"rank\s+:\s+1 [^\[]*Signal 9 \(SIGKILL\)", summary), stderr
    ckpt = checkpoints.load_checkpoint(str(out / "last.pt"))  # the last complete checkpoint: epoch 1's
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert [r["epoch"] for r in read_rows(out)] == ["1"] * 3
    result = torchrun("train_competitive_distillation.py", [*LONG, "--out-dir", str(out), "--resume", "auto"])
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "from epoch 2:" in result.stdout
    assert [r["epoch"] for r in read_rows(out)] == ["1"] * 3 + ["2"] * 3   # none missing, none repeated
    straight, _ = straight_run
    assert_same_weights(weights(straight / "last.pt"), weights(out / "last.pt"))  # resume at an epoch boundary is exact


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_saves_mid_epoch_and_max_restarts_continues(tmp_path, straight_run):
    out = tmp_path / "run"
    returncode, stdout, stderr = signal_rank_one_during_epoch_two(out, signal.SIGTERM, ["--max-restarts", "1"])
    assert returncode == 0, stdout + stderr
    # both processes agreed to stop at the same step, saved it, and torchrun restarted them
    assert "SIGTERM: stopped at epoch 2 step" in stdout and "continue with: torchrun --nproc_per_node=2" in stdout
    assert "from epoch 2 step" in stdout, stdout
    straight, _ = straight_run
    rows, straight_rows = read_rows(out), read_rows(straight)
    assert [(r["epoch"], r["net"]) for r in rows] == [(r["epoch"], r["net"]) for r in straight_rows]
    for a, b in zip(rows, straight_rows):
        assert float(a["train_loss"] or 0) == pytest.approx(float(b["train_loss"] or 0), rel=1e-5)
        assert (a["train_leader_share"], a["test_acc"]) == (b["train_leader_share"], b["test_acc"])
    assert_same_weights(weights(straight / "last.pt"), weights(out / "last.pt"))  # mid-epoch resume is exact too


# ----------------------------------------------------------------------------------------------
# Step-level checks in 2 spawned gloo processes
# ----------------------------------------------------------------------------------------------
class LogitColumn(nn.Module):
    """Network i of a hand-built group: column i of the input, times one learnable scale."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, self.index] * self.scale


# Each process's batch cross-entropies of the 3 networks. Locally rank 0 ranks net0 first, rank 1
# net2; the means over both (2.2, 2.1, 2.0) rank net2 first, then net1, then net0.
LOCAL_CE = [[1.0, 2.0, 3.0], [3.4, 2.2, 1.0]]


def competition(rt, rule):
    """One competitive_step of 3 LogitColumn networks on this rank's batch; returns its statistics."""
    # Two classes, label 0, logits (0, -d): CE = log(1 + exp(-d)), so d = -log(exp(CE) - 1).
    ce = torch.tensor(LOCAL_CE[rt.rank])
    margins = -torch.log(torch.expm1(ce))
    x = torch.stack([torch.zeros(3), -margins], dim=-1).expand(4, 3, 2).contiguous()   # (B, net, class)
    labels = torch.zeros(4, dtype=torch.long)
    nets = [nn.parallel.DistributedDataParallel(LogitColumn(i)) for i in range(3)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]
    args = types.SimpleNamespace(label_smoothing=0.0, teacher_rule=rule, temperature=1.0, kd_weight=1.0, clip_grad=None,
                                 clip_mode="norm")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return competitive.competitive_step(step_run(nets, optimizers, scaler, args, rt), [x] * 3, labels, labels, torch.ones(3))


def perturbation_draws(rt):
    """24 steps of the perturbation schedule on the same batch in every process, with the operations
    drawn (a second perturber with the same seed replays the host draws); the rank is the process
    group's, found by the Perturber itself."""
    perturber = Perturber(every=2, ops=PERTURBATIONS, num_nets=3, seed=0, mean=(0.5,) * 3, std=(0.25,) * 3, device=CPU)
    chooser = Perturber(every=2, ops=PERTURBATIONS, num_nets=3, seed=0, mean=(0.5,) * 3, std=(0.25,) * 3, device=CPU)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    return {"rank": perturber.rank, "ops": [chooser.choose(step)[1] for step in range(24)],
            "draws": [(b.net, b.inputs[max(b.net, 0)], b.labels_perm, b.lams[max(b.net, 0)])
                      for b in (perturber(step, images, labels) for step in range(24))]}


def group_args(names, batch_size, *extra):
    """Competitive-script flags for a tiny run of `names` without perturbation."""
    return competitive.get_args_parser().parse_args(
        [*TINY, "--models", *names, "--batch-size", str(batch_size), "--perturb-every", "0", *extra])


def first_steps(rt, names, batch_size, steps=3):
    """A seeded group's first steps on this shard: (steps, n, 3) loss/ce/kd means, leader stats, weights."""
    args = group_args(names, batch_size)
    utils.seed_everything(args.seed)
    data, (train_loader, _, _) = utils.setup_data(args, rt)
    nets = utils.build_nets(names, data.info, rt)
    optimizers, _ = utils.build_optimizers(args, nets, rt)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, leaders = [], []
    for _, (images, labels) in zip(range(steps), train_loader):
        inputs = [utils.to_input(images, rt)] * len(nets)
        stats = competitive.competitive_step(step_run(nets, optimizers, scaler, args, rt), inputs, labels, labels,
                                             torch.ones(len(nets)))
        losses.append(utils.all_reduce_sum(torch.stack([stats["loss"], stats["ce"], stats["kd"]], 1), rt) / rt.world_size)
        leaders.append(torch.stack([stats["leader_share"], stats["teachers"]], 1))
    return torch.stack(losses), torch.stack(leaders), [unwrap(net).state_dict() for net in nets]


def trained_and_evaluated(rt):
    """Two steps of a resnet20 pair, then the end-of-epoch buffer sync and an evaluation."""
    # 33 validation images in batches of 16: rank 0 evaluates 2 batches, rank 1 only 1.
    args = group_args(["resnet20", "resnet20"], 8, "--val-size", "33", "--eval-batch-size", "16")
    utils.seed_everything(args.seed)
    data, (train_loader, val_loader, _) = utils.setup_data(args, rt)
    nets = utils.build_nets(["resnet20", "resnet20"], data.info, rt)
    optimizers, _ = utils.build_optimizers(args, nets, rt)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _, (images, labels) in zip(range(2), train_loader):
        competitive.competitive_step(step_run(nets, optimizers, scaler, args, rt), [utils.to_input(images, rt)] * 2,
                                     labels, labels, torch.ones(2))
    bn = next(m for m in unwrap(nets[0]).modules() if isinstance(m, nn.BatchNorm2d))
    running_mean_before = bn.running_mean.clone()
    utils.sync_replicas(nets, rt, epoch=0)
    return {"running_mean_before": running_mean_before, "running_mean_after": bn.running_mean.clone(),
            "val": engine.evaluate(nets, val_loader, rt), "val_batches": len(val_loader),
            "weights": [unwrap(net).state_dict() for net in nets]}


def guard_messages(rt):
    """sync_replicas on equal replicas, then after rank 1's copy of one parameter drifted."""
    nets = [nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))) for _ in range(2)]
    utils.sync_replicas(nets, rt, epoch=0)                    # equal: no error
    if rt.rank == 1:
        with torch.no_grad():
            unwrap(nets[1])[1].bias[0] += 1e-3
    try:
        utils.sync_replicas(nets, rt, epoch=4)
    except RuntimeError as error:
        return str(error)
    return None


def worker(rank, store_path, out_dir):
    """One of the 2 spawned processes: run every step-level check, save the results for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    rt = utils.Runtime(CPU, None, True, rank, WORLD_SIZE)
    results = {"better": competition(rt, "better"), "best": competition(rt, "best"),
               "perturb": perturbation_draws(rt), "eval": trained_and_evaluated(rt),
               "guard": guard_messages(rt), "vit": first_steps(rt, ["vit_tiny", "vit_tiny"], 8),
               "resnet": first_steps(rt, ["resnet20", "resnet20"], 8)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of worker() in rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("spawned")
    mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD_SIZE)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("rule,teachers", [("better", [2, 1, 0]), ("best", [1, 1, 0])])
def test_every_rank_makes_the_same_teacher_choice(ranks, rule, teachers):
    for rank, stats in enumerate(r[rule] for r in ranks):
        assert stats["ce"].tolist() == pytest.approx(LOCAL_CE[rank], rel=1e-5)   # local losses disagree...
        assert stats["leader_share"].tolist() == [0, 0, 1], rank                          # ...the global ranking decides
        assert stats["teachers"].tolist() == teachers, rank


def test_teacher_choices_agree_at_every_step_of_real_networks(ranks):
    for group in ("vit", "resnet"):
        leaders0, leaders1 = ranks[0][group][1], ranks[1][group][1]
        assert torch.equal(leaders0, leaders1), group
        assert (leaders0[:, :, 0].sum(1) == 1).all()   # one leader per step


def test_ranks_perturb_the_same_network_with_the_same_op_but_their_own_noise(ranks):
    first, second = ranks[0]["perturb"], ranks[1]["perturb"]
    assert (first["rank"], second["rank"]) == (0, 1)
    assert first["ops"] == second["ops"]
    draws0, draws1 = first["draws"], second["draws"]
    assert {net for net, *_ in draws0} == {-1, 0, 1, 2}  # steps without perturbation, and every network
    assert {"mixup", "gaussian_noise", "rotation"} <= set(first["ops"])
    for op, (net0, images0, labels0, lam0), (net1, images1, labels1, lam1) in zip(first["ops"], draws0, draws1):
        assert net0 == net1
        if op in ("mixup", "gaussian_noise"):  # per-pixel randomness: each rank draws its own
            assert not torch.equal(images0, images1), op
        else:  # flips, and scalar parameters drawn on the shared host generators
            assert torch.equal(images0, images1) and torch.equal(labels0, labels1) and torch.equal(lam0, lam1), op


def test_replicas_stay_identical_and_buffers_follow_rank_zero(ranks):
    eval0, eval1 = ranks[0]["eval"], ranks[1]["eval"]
    for a, b in zip(eval0["weights"], eval1["weights"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # each process updated BatchNorm running statistics from its own batch; the sync made them rank 0's
    assert not torch.equal(eval0["running_mean_before"], eval1["running_mean_before"])
    assert torch.equal(eval1["running_mean_after"], eval0["running_mean_before"])


def test_replica_guard_names_the_diverged_parameter(ranks):
    for rank in range(WORLD_SIZE):
        message = ranks[rank]["guard"]
        assert message == ("data-parallel replicas diverged after epoch 5: network 1 parameter '1.bias' "
                           "differs between rank 0 and rank 1"), message


def test_evaluation_counts_every_sample_once(ranks):
    eval0, eval1 = ranks[0]["eval"], ranks[1]["eval"]
    assert (eval0["val_batches"], eval1["val_batches"]) == (2, 1)  # uneven shards, no padding
    assert eval0["val"] == eval1["val"]
    args = group_args(["resnet20", "resnet20"], 8, "--val-size", "33", "--eval-batch-size", "16")
    rt = utils.Runtime(CPU, None, True)
    data, (_, val_loader, _) = utils.setup_data(args, rt)
    nets = utils.build_nets(["resnet20", "resnet20"], data.info, rt)
    for net, state in zip(nets, eval0["weights"]):
        net.load_state_dict(state)
    for distributed, single in zip(eval0["val"], engine.evaluate(nets, val_loader, rt)):
        assert distributed["acc"] == pytest.approx(single["acc"], abs=1e-9)
        assert distributed["top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert distributed["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_two_processes_match_one_process_with_the_same_global_batch(ranks):
    # vit_tiny has no BatchNorm, so 2 x 8 and 1 x 16 images give the same losses and gradients up
    # to float summation order; --lr-scaling linear gives both the same rate.
    losses, _, states = first_steps(utils.Runtime(CPU, None, True), ["vit_tiny", "vit_tiny"], 16)
    distributed_losses, _, distributed_states = ranks[0]["vit"]
    assert torch.allclose(distributed_losses, losses, rtol=1e-5, atol=1e-6), (distributed_losses, losses)
    for a, b in zip(distributed_states, states):
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_sync_bn_is_refused_on_the_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = group_args(["resnet20", "resnet20"], 8, "--sync-bn")
    with pytest.raises(errors.UsageError, match="--sync-bn needs CUDA"):
        utils.setup_runtime(args)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_sync_bn_with_compile_is_refused_in_one_line(world_size, monkeypatch, capsys):
    """--sync-bn --compile: one line and exit code 2 before anything is built, with or without torchrun
    (torch.compile breaks its graph at every SyncBatchNorm layer)."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(competitive.main, competitive.get_args_parser(),
                     [*TINY, "--models", "resnet20", "resnet20", "--sync-bn", "--compile"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "--sync-bn and --compile cannot be combined" in err and "drop one" in err


def test_sync_bn_checkpoints_load_into_plain_networks():
    info, rt = types.SimpleNamespace(num_classes=10, img_size=16, in_chans=3), utils.Runtime(CPU, None, False)
    # convert_sync_batchnorm converts in place: the plain network must be a separate one
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(utils.build_nets(["resnet20"], info, rt)[0])
    plain = utils.build_nets(["resnet20"], info, rt)[0]
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    plain.load_state_dict(synced.state_dict())  # same keys and shapes: demo.py can rebuild the group


def test_linear_lr_scaling_follows_the_global_batch():
    args = group_args(["resnet20", "resnet20"], 16)
    nets = [nn.Linear(2, 2), nn.Linear(2, 2)]
    _, lrs_one = utils.build_optimizers(args, nets, utils.Runtime(CPU, None, False))
    _, lrs_four = utils.build_optimizers(args, nets, utils.Runtime(CPU, None, False, rank=0, world_size=4))
    assert lrs_one == pytest.approx([0.1 * 16 / 128] * 2) and lrs_four == pytest.approx([0.1 * 64 / 128] * 2)
    args.lr_scaling = "none"
    assert utils.build_optimizers(args, nets, utils.Runtime(CPU, None, False, rank=0, world_size=4))[1] == lrs_one
