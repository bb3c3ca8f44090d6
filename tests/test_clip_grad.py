"""--clip-grad / --clip-mode: each network's gradients clipped before its optimizer step, checked by
hand against the definition and torch's clip_grad_norm_, recorded, and held by a resume."""
import json
import shutil

import pytest
import torch

import train
import train_competitive_distillation as competitive
import utils
from helpers import assert_same_weights, read_rows, sigterm_after_step, weights
from test_resume_rules import PAIR, TINY, launch


def two_nets_with_gradients(scaler=None):
    """Two small networks with known gradients (a fixed batch; their losses through `scaler` when given),
    and an SGD (lr 1, no momentum) for each."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)) for _ in range(2)]
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for k, net in enumerate(nets):
        loss = (k + 1) * torch.nn.functional.cross_entropy(net(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
    optimizers = [torch.optim.SGD(net.parameters(), lr=1.0) for net in nets]
    return nets, optimizers


def test_norm_mode_scales_each_network_to_the_bound_as_computed_by_hand():
    nets, optimizers = two_nets_with_gradients()
    before = [[p.detach().clone() for p in net.parameters()] for net in nets]
    grads = [[p.grad.clone() for p in net.parameters()] for net in nets]
    norms = [torch.cat([g.reshape(-1) for g in gs]).pow(2).sum().sqrt() for gs in grads]  # by hand, per network
    bound = 0.5 * float(min(norms))  # below both norms: both networks are scaled, each by its own factor
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = utils.step_optimizers(optimizers, scaler, clip_grad=bound, clip_mode="norm")
    assert torch.allclose(stats["grad_norm"], torch.stack(norms))
    for net, old, gs, norm in zip(nets, before, grads, norms):
        factor = bound / (float(norm) + 1e-6)  # clip_grad_norm_'s epsilon
        for p, p0, g in zip(net.parameters(), old, gs):
            assert torch.allclose(p.detach(), p0 - factor * g, atol=1e-7)  # SGD, lr 1: p - clipped gradient
        clipped = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm()
        assert clipped == pytest.approx(bound, rel=1e-5)


def test_norm_mode_equals_torch_clip_grad_norm_and_leaves_small_gradients_alone():
    nets, optimizers = two_nets_with_gradients()
    reference, _ = two_nets_with_gradients()
    norm1 = torch.cat([p.grad.reshape(-1) for p in nets[1].parameters()]).norm()
    bound = float(norm1) * 0.9  # net0's gradient (half of net1's) stays below: untouched
    for net in reference:
        torch.nn.utils.clip_grad_norm_(net.parameters(), bound)
    expected = [[p.grad.clone() for p in net.parameters()] for net in reference]
    untouched = [p.grad.clone() for p in nets[0].parameters()]
    utils.step_optimizers(optimizers, torch.amp.GradScaler("cpu", enabled=False), clip_grad=bound)
    for net, grads in zip(nets, expected):
        for p, g in zip(net.parameters(), grads):
            assert torch.equal(p.grad, g)
    assert all(torch.equal(p.grad, g) for p, g in zip(nets[0].parameters(), untouched))


def test_value_mode_clamps_every_element_and_a_frozen_network_reads_zero():
    nets, optimizers = two_nets_with_gradients()
    grads = [p.grad.clone() for p in nets[0].parameters()]
    stats = utils.step_optimizers([optimizers[0], None], torch.amp.GradScaler("cpu", enabled=False),
                                  clip_grad=0.01, clip_mode="value")
    assert stats == {}  # no norm is computed in value mode
    for p, g in zip(nets[0].parameters(), grads):
        assert torch.equal(p.grad, g.clamp(-0.01, 0.01))
    nets, optimizers = two_nets_with_gradients()
    stats = utils.step_optimizers([optimizers[0], None], torch.amp.GradScaler("cpu", enabled=False), clip_grad=1.0)
    assert stats["grad_norm"][1] == 0 and stats["grad_norm"][0] > 0


def test_a_scaled_loss_is_unscaled_before_clipping():
    """Under loss scaling (fp16) the bound is on the true gradient: the scaler unscales first."""
    plain, _ = two_nets_with_gradients()
    true_norm = torch.cat([p.grad.reshape(-1) for p in plain[0].parameters()]).norm()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    nets, optimizers = two_nets_with_gradients(scaler)  # 1024 times the true gradients
    assert torch.cat([p.grad.reshape(-1) for p in nets[0].parameters()]).norm() == pytest.approx(1024 * float(true_norm))
    stats = utils.step_optimizers(optimizers[:1], scaler, clip_grad=1e9)
    assert float(stats["grad_norm"][0]) == pytest.approx(float(true_norm), rel=1e-5)


def test_without_effect_a_huge_bound_trains_the_same_weights_and_logs_the_norm(tmp_path, capsys):
    plain, clipped, tight = tmp_path / "plain", tmp_path / "clipped", tmp_path / "tight"
    common = [*TINY, "--model", "resnet20", "--epochs", "1", "--deterministic"]
    launch(capsys, train, [*common, "--out-dir", plain])
    launch(capsys, train, [*common, "--out-dir", clipped, "--clip-grad", "1e9"])
    launch(capsys, train, [*common, "--out-dir", tight, "--clip-grad", "0.01"])
    assert_same_weights(weights(plain / "last.pt"), weights(clipped / "last.pt"))  # a factor of exactly 1
    with pytest.raises(AssertionError):
        assert_same_weights(weights(plain / "last.pt"), weights(tight / "last.pt"))
    assert "train_grad_norm" not in read_rows(plain)[0]
    assert float(read_rows(clipped)[0]["train_grad_norm"]) > 0.01
    record = json.loads((tight / "args.json").read_text())
    assert record["clip_grad"] == 0.01 and record["clip_mode"] == "norm"


def test_a_clipped_run_resumes_exactly_mid_epoch_and_keeps_its_bound(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*PAIR, "--epochs", "2", "--clip-grad", "0.3", "--deterministic"]
    launch(capsys, competitive, [*common, "--out-dir", straight])
    with pytest.raises(SystemExit), sigterm_after_step(3):  # 2 steps an epoch: stopped in epoch 2
        launch(capsys, competitive, [*common, "--out-dir", resumed])
    err = launch(capsys, competitive, [*PAIR, "--epochs", "2", "--resume", "auto", "--out-dir", resumed,
                                       "--clip-grad", "0.5"], code=2)
    assert "--clip-grad 0.3" in err
    launch(capsys, competitive, [*PAIR, "--epochs", "2", "--resume", "auto", "--out-dir", resumed])  # takes 0.3
    assert_same_weights(weights(straight / "last.pt"), weights(resumed / "last.pt"))
    assert [row["train_grad_norm"] for row in read_rows(straight)] == [row["train_grad_norm"] for row in read_rows(resumed)]


def test_a_run_recorded_before_the_flag_refuses_it_on_resume(tmp_path, capsys):
    run = tmp_path / "old"
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--stop-after", "1", "--out-dir", run])
    for name in ("args.json",):  # what a run of the code before --clip-grad recorded: no such entries
        record = json.loads((run / name).read_text())
        del record["clip_grad"], record["clip_mode"]
        (run / name).write_text(json.dumps(record))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["args"]["clip_grad"], ckpt["args"]["clip_mode"]
    torch.save(ckpt, run / "last.pt")
    shutil.copytree(run, tmp_path / "copy")
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto", "--out-dir", run,
                                 "--clip-grad", "1"], code=2)
    assert "was written without --clip-grad" in err
    launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto", "--out-dir", tmp_path / "copy"])
    assert "train_grad_norm" not in read_rows(tmp_path / "copy")[-1]


def test_a_bound_that_is_not_positive_is_refused_in_one_line(tmp_path, capsys):
    err = launch(capsys, train, [*TINY, "--model", "resnet20", "--epochs", "1", "--clip-grad", "0",
                                 "--out-dir", tmp_path / "run"], code=2)
    assert "--clip-grad must be positive" in err
