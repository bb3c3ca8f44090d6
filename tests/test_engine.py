"""engine.py's helpers: statistics by name, metrics.csv columns, TensorBoard tags, optional TensorBoard."""
import sys
import types

import pytest
import torch

import capture
import engine
import errors
import flags
import train
import train_competitive_distillation as competitive
import utils
from helpers import DEVICES, read_rows

TINY = ["--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]


def run_main(module, args):
    return module.main(module.get_args_parser().parse_args(args))


def scalar_tags(run_dir):
    """TensorBoard scalar tags written into a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_a_new_statistic_is_one_edit_in_the_script(tmp_path, monkeypatch, capsys):
    """A statistic added to the step's dict becomes a metrics.csv column, a TensorBoard tag and part
    of the epoch line, with no change to engine.py."""
    step = competitive.competitive_step

    def step_with_margin(*args, **kwargs):
        stats = step(*args, **kwargs)
        return {**stats, "margin": stats["ce"] - stats["kd"]}

    monkeypatch.setattr(competitive, "competitive_step", step_with_margin)
    run_main(competitive, [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--out-dir", str(tmp_path)])
    rows = [r for r in read_rows(tmp_path) if r["net"] != "ensemble"]
    assert len(rows) == 4
    for row in rows:  # the mean of a difference is the difference of the means
        assert float(row["train_margin"]) == pytest.approx(float(row["train_ce"]) - float(row["train_kd"]), abs=1e-4)
    assert {"train/margin/net0_resnet20", "train/margin/net1_resnet20", "train/leader_share/net0_resnet20",
            "val/acc/ensemble"} <= scalar_tags(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 6 and all("margin" in line for line in lines if "ensemble" not in line)


def test_a_resumed_run_with_a_new_statistic_gains_a_column(tmp_path, monkeypatch):
    """Rows already written keep their values; the new column is empty for them."""
    run_main(train, [*TINY, "--model", "resnet20", "--epochs", "2", "--stop-after", "1", "--out-dir", str(tmp_path)])
    step = train.vanilla_step
    monkeypatch.setattr(train, "vanilla_step", lambda *a, **k: {**step(*a, **k), "one": torch.ones(())})
    run_main(train, [*TINY, "--model", "resnet20", "--epochs", "2", "--resume", "auto", "--out-dir", str(tmp_path)])
    rows = read_rows(tmp_path)
    assert [(r["epoch"], r["train_one"]) for r in rows] == [("1", ""), ("2", "1")]
    assert rows[0]["train_loss"] and rows[0]["test_acc"]


def test_epoch_stats_means_and_resume_state():
    """Means over steps per network; a scalar statistic is one network's; state round-trips."""
    rt = utils.Runtime(torch.device("cpu"), None, False)
    stats = engine.EpochStats(rt)
    stats.add({"loss": torch.tensor([1.0, 2.0]), "acc": torch.tensor([50.0, 100.0])})
    stats.add({"loss": torch.tensor([3.0, 4.0]), "acc": torch.tensor([100.0, 100.0])})
    assert stats.means() == [{"loss": 2.0, "acc": 75.0}, {"loss": 3.0, "acc": 100.0}]
    restored = engine.EpochStats(rt)
    restored.load_state_dict(stats.state_dict())
    restored.add({"loss": torch.tensor([5.0, 6.0]), "acc": torch.tensor([0.0, 0.0])})
    assert restored.means() == [{"loss": 3.0, "acc": 50.0}, {"loss": 4.0, "acc": 200 / 3}]
    single = engine.EpochStats(rt)
    single.add({"loss": torch.tensor(0.5)})
    assert single.means() == [{"loss": 0.5}]


def step_statistics(values, scale):
    """A stand-in step: its statistics are a pure function of its inputs (each (2,), for 2 networks),
    so the eager and the captured call compute the same values."""
    return {"loss": values.sum(1) * scale, "acc": values.mean(1), "best": values.amax(1)}


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_summed_inside_the_captured_step_equal_eager_sums(device):
    """With --cuda-graphs the captured step also adds its statistics into StepSums (capture.capture_step),
    so that those additions are part of the graph: each epoch's means, the first non-finite step and a
    mid-epoch resume equal EpochStats.add's, bit for bit. On the CPU the capture is off."""
    device = torch.device(device)
    rt = utils.Runtime(device, None, False, cuda_graphs=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    epochs = [[(torch.randn(2, 5, generator=generator).to(device), torch.tensor(1.0 + i).to(device)) for i in range(6)]
              for _ in range(2)]
    epochs[1][4][0][1, 2] = float("nan")  # network 1 diverges at step 4 of the second epoch

    def eager_epoch(batches, first_step=0, state=None):
        stats = engine.EpochStats(rt, first_step)
        if state is not None:
            stats.load_state_dict(state)
        for values, scale in batches:
            stats.add(step_statistics(values, scale))
        return stats

    def captured_epochs(batches_per_epoch, start_step=0, state=None):
        run = types.SimpleNamespace(rt=rt, step_sums=None, start_epoch=0, start_step=start_step,
                                    resumed={"stats": state})
        step = capture.capture_step(run, step_statistics, warmup=2, capture=device.type == "cuda")
        results = []
        for epoch, batches in enumerate(batches_per_epoch):
            stats = engine.epoch_stats(run, epoch)
            for values, scale in batches:
                stats.add(step(values, scale))
            results.append(read(stats))
        return results

    def read(stats):
        """Everything an epoch's statistics give: means, first non-finite steps, checkpoint state (as
        the exact reprs of the numbers, so that NaN equals NaN)."""
        state = stats.state_dict()
        return repr((stats.means(), stats.first_nonfinite.tolist(), {k: v.tolist() for k, v in state["sums"].items()},
                     state["steps"]))

    eager = list(map(eager_epoch, epochs))
    assert [stats.first_nonfinite.tolist() for stats in eager] == [[-1, -1], [-1, 4]]
    expected = [read(stats) for stats in eager]
    assert captured_epochs(epochs) == expected
    # Interrupted after step 3 of the second epoch: the resumed sums continue in the graph's buffers, and
    # the divergence is still found at step 4 of the epoch.
    state = eager_epoch(epochs[1][:3]).state_dict()
    assert read(eager_epoch(epochs[1][3:], first_step=3, state=state)) == expected[1]
    assert captured_epochs([epochs[1][3:]], start_step=3, state=state) == [expected[1]]


def test_epoch_line_is_built_from_names():
    row = {"epoch": 3, "net": "net0_resnet20", "model": "resnet20", "lr": 0.05, "train_loss": 0.25, "train_acc": 91.5,
           "train_leader_share": 0.75, "val_acc": 88.0, "test_acc": 87.5, "epoch_time_s": 12.0, "images_per_s": 400.0}
    line = engine.epoch_line(3, 10, row)
    assert line == ("epoch   3/10 | net0_resnet20      | lr 0.05 | train loss 0.2500 acc 91.50% leader_share 0.7500 "
                    "| val 88.00% | test 87.50% | 12.0s 400 img/s")


def test_training_without_tensorboard(tmp_path, monkeypatch, capsys):
    """A missing tensorboard costs one warning; metrics.csv and checkpoints are still written."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    run_main(train, [*TINY, "--model", "resnet20", "--epochs", "1", "--out-dir", str(tmp_path)])
    warnings = [line for line in capsys.readouterr().out.splitlines() if "TensorBoard unavailable" in line]
    assert len(warnings) == 1 and "metrics.csv is still written" in warnings[0]
    assert len(read_rows(tmp_path)) == 1 and (tmp_path / "last.pt").exists()
    assert not [name for name in (p.name for p in tmp_path.iterdir()) if name.startswith("events.out")]


def test_list_models_and_flag_groups(capsys):
    """--list-models prints every registered name and the aliases, then exits 0; --help shows the groups."""
    parser = competitive.get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--list-models"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "resnet32" in out and "ceit_tiny" in out and " vit " in out and "resnet = resnet32" in out
    help_text = parser.format_help()
    for group in ("model:", "data:", "optimization:", "run:", "speed:", "distributed (under torchrun):",
                  "competitive distillation:"):
        assert group in help_text, group


def test_eval_every_skips_evaluations_but_never_the_last_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    results = run_main(train, [*TINY, "--model", "resnet20", "--epochs", "3", "--eval-every", "2", "--out-dir", str(out)])
    rows = read_rows(out)
    assert [bool(row["test_acc"]) for row in rows] == [False, True, True]
    assert [bool(row["val_acc"]) for row in rows] == [False, True, True]
    assert results["networks"][0]["final_test_acc"] == pytest.approx(float(rows[-1]["test_acc"]), rel=1e-5)
    assert results["networks"][0]["best_epoch"] in (2, 3)
    # The last epoch of a --stop-after invocation is evaluated too, so results.json always has numbers.
    out = tmp_path / "stopped"
    results = run_main(train, [*TINY, "--model", "resnet20", "--epochs", "3", "--eval-every", "5", "--stop-after", "1",
                               "--out-dir", str(out)])
    assert [bool(row["test_acc"]) for row in read_rows(out)] == [True]
    with pytest.raises(errors.UsageError, match="--eval-every must be a positive integer"):
        run_main(train, [*TINY, "--model", "resnet20", "--eval-every", "0"])


def test_model_ema_equals_a_hand_computed_average_and_resumes_exactly(tmp_path, capsys):
    """--model-ema d: after every step theta_ema <- d theta_ema + (1 - d) theta (the first step copies),
    buffers included; evaluated as ema_* rows; a resume continues the averages bit for bit."""
    import checkpoints
    import demo
    args = [*TINY, "--model", "resnet20", "--epochs", "2", "--model-ema", "0.9", "--deterministic"]
    seen = []
    step = train.vanilla_step

    def recording(run, *a, **k):
        stats = step(run, *a, **k)
        seen.append({key: value.detach().clone() for key, value in run.nets[0].state_dict().items()})
        return stats

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "vanilla_step", recording)
        results = run_main(train, [*args, "--out-dir", str(tmp_path / "straight")])
    expected = {key: value.double() for key, value in seen[0].items()}
    for state in seen[1:]:
        for key, value in state.items():
            if value.is_floating_point():
                expected[key] = 0.9 * expected[key] + 0.1 * value.double()
    average = checkpoints.load_checkpoint(str(tmp_path / "straight" / "last.pt"))["state"]["ema"]["averages"][0]
    for key, value in expected.items():
        if seen[0][key].is_floating_point():
            torch.testing.assert_close(average[f"module.{key}"].double(), value, rtol=1e-5, atol=1e-6)
        else:  # BatchNorm's batch counter: the network's own
            assert torch.equal(average[f"module.{key}"], seen[-1][key])
    assert int(average["n_averaged"]) == len(seen) == 4
    rows = read_rows(tmp_path / "straight")
    assert [r["net"] for r in rows] == ["net0_resnet20", "ema_net0_resnet20"] * 2
    assert results["ema"][0]["net"] == "ema_net0_resnet20" and results["networks"][0]["net"] == "net0_resnet20"
    # interrupted after epoch 1, resumed: the averages continue exactly
    run_main(train, [*args, "--stop-after", "1", "--out-dir", str(tmp_path / "resumed")])
    run_main(train, [*args, "--resume", "auto", "--out-dir", str(tmp_path / "resumed")])
    resumed = checkpoints.load_checkpoint(str(tmp_path / "resumed" / "last.pt"))["state"]["ema"]["averages"][0]
    assert all(torch.equal(resumed[key], average[key]) for key in average)
    # demo.py --ema shows the averages
    capsys.readouterr()
    demo.main(demo.get_args_parser().parse_args([str(tmp_path / "straight"), "--which", "last", "--ema", "--num-images", "2",
                                                 "--device", "cpu"]))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("net0_resnet20"))
    assert f"{results['ema'][0]['final_test_acc']:.2f}%" in line  # the average's test accuracy, not the network's


def test_the_exponential_average_is_averaged_models_bit_for_bit_and_never_reads_the_device():
    """ema.ExponentialAverage against torch's AveragedModel with its EMA update (what --model-ema used
    before): every floating tensor (parameters, BatchNorm statistics) equal bit for bit after several
    steps; the batch counter copied; the update count a Python number."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    import ema
    import models
    torch.manual_seed(0)
    net = models.create_model("resnet20", num_classes=10, img_size=16, in_chans=3)
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    average = ema.ExponentialAverage(net, 0.9)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.update_parameters(net)
        average.update(net)
    ours, theirs = average.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and isinstance(average.count, int) and int(ours["n_averaged"]) == 4
    for key, value in theirs.items():
        if value.is_floating_point():
            assert torch.equal(ours[key], value), key
        elif key.endswith("num_batches_tracked"):  # copied from the network (AveragedModel blended it as a float)
            assert torch.equal(ours[key], net.state_dict()[key[len("module."):]])
    restored = ema.ExponentialAverage(net, 0.9)
    restored.load_state_dict(theirs)  # an AveragedModel's checkpoint resumes
    assert restored.count == 4 and all(torch.equal(a, b) for a, b in zip(restored.module.parameters(),
                                                                          reference.module.parameters()))
