"""What a run logs besides metrics.csv: the --log-every step scalars, the networks side by side in
TensorBoard's custom scalars, the arguments and final accuracies (text, hparams), --log-wandb offline, and
--eval-subset's marked evaluation (CPU, seconds each)."""
import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import stopping
import train
import train_mutual_learning as mutual
import utils
from helpers import read_rows, write_image_tree

TINY = ["--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "32", "--batch-size", "16",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (pip install wandb; bash setup.sh --test installs it)")


def run(module, argv):
    return stopping.launch(module.main, module.get_args_parser(), [str(a) for a in argv])


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_step_scalars_are_interval_means_at_the_global_step_with_the_rate_of_that_step(tmp_path):
    """4 steps an epoch, --log-every 2: scalars at steps 2, 4, 6, 8, each the mean of its two steps' statistics;
    the mean of an epoch's two intervals is the epoch's mean in metrics.csv; the rate is the step's."""
    run(mutual, [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--log-every", "2", "--out-dir", tmp_path])
    steps = events(tmp_path / "steps")
    assert set(steps.Tags()["scalars"]) == {f"step/{name}/net{i}_resnet20" for name in ("loss", "ce", "kd", "acc", "lr")
                                            for i in (0, 1)}
    loss = steps.Scalars("step/loss/net1_resnet20")
    assert [event.step for event in loss] == [2, 4, 6, 8]
    rows = [row for row in read_rows(tmp_path) if row["net"] == "net1_resnet20"]
    for epoch, row in enumerate(rows):
        mean = (loss[2 * epoch].value + loss[2 * epoch + 1].value) / 2
        assert mean == pytest.approx(float(row["train_loss"]), rel=1e-4)
    # the rate at the step: metrics.csv's lr column is the rate of an epoch's last step (steps 4 and 8)
    lr = [event.value for event in steps.Scalars("step/lr/net0_resnet20")]
    assert [lr[1], lr[3]] == pytest.approx([float(row["lr"]) for row in rows], rel=1e-5) and lr[0] < lr[1] and lr[3] < lr[2]


def test_the_networks_share_one_chart_per_quantity_and_the_run_keeps_its_arguments_and_final_accuracies(tmp_path):
    run(mutual, [*TINY, "--models", "resnet20", "resnet20", "--epochs", "1", "--log-every", "2", "--out-dir", tmp_path])
    epochs = events(tmp_path)
    from tensorboard.plugins.custom_scalar import layout_pb2
    layout = layout_pb2.Layout()
    layout.ParseFromString(epochs.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["test acc"] == ["^test/acc/"] and charts["train kd"] == ["^train/kd/"]
    assert {"test/acc/net0_resnet20", "test/acc/net1_resnet20", "test/acc/ensemble"} <= set(epochs.Tags()["scalars"])
    text = epochs.Tensors("arguments/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text)["models"] == ["resnet20", "resnet20"]
    results = json.loads((tmp_path / "results.json").read_text())
    final = epochs.Scalars("final/final_test_acc/net1_resnet20")
    assert [(event.step, event.value) for event in final] == [(1, pytest.approx(results["networks"][1]["final_test_acc"]))]
    from tensorboard.plugins.hparams import plugin_data_pb2
    session = plugin_data_pb2.HParamsPluginData.FromString(epochs.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    assert session.session_start_info.hparams["temperature"].number_value == 1.0
    assert session.session_start_info.hparams["models"].string_value == "['resnet20', 'resnet20']"
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # one event file per invocation


def test_log_every_0_writes_no_step_scalars_and_a_resume_continues_the_steps_without_repeating_them(tmp_path):
    run(train, [*TINY, "--model", "resnet20", "--epochs", "2", "--log-every", "0", "--out-dir", tmp_path / "off"])
    assert not (tmp_path / "off" / "steps").exists()
    argv = [*TINY, "--model", "resnet20", "--epochs", "2", "--log-every", "1", "--out-dir", tmp_path / "on"]
    run(train, [*argv, "--stop-after", "1"])
    run(train, [*argv, "--resume", "auto"])
    assert [event.step for event in events(tmp_path / "on" / "steps").Scalars("step/loss/net0_resnet20")] == list(range(1, 9))


@needs_wandb
def test_log_wandb_offline_writes_its_run_under_the_run_directory_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--log-every", "2", "--log-wandb",
            "--out-dir", tmp_path]
    run(mutual, [*argv, "--stop-after", "1"])
    run_id = (tmp_path / "wandb_id").read_text().strip()
    run(mutual, [*argv, "--resume", "auto"])
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    offline = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2 and all((folder / f"run-{run_id}.wandb").stat().st_size > 0 for folder in offline)


def test_log_wandb_without_wandb_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        run(train, [*TINY, "--model", "resnet20", "--epochs", "1", "--log-wandb", "--out-dir", tmp_path / "run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --log-wandb needs the wandb package, which is not installed: pip install wandb"
    assert not (tmp_path / "run").exists()


def test_eval_subset_evaluates_n_images_of_each_split_and_marks_every_accuracy(tmp_path, capsys):
    result = run(train, [*TINY, "--model", "resnet20", "--epochs", "1", "--val-size", "100", "--eval-subset", "50",
                         "--out-dir", tmp_path])
    out = capsys.readouterr().out
    assert "--eval-subset: val 50 of 100 images, test 50 of 512 images" in out and "val* " in out and "test* " in out
    assert "final test accuracy (last epoch, --eval-subset: val 50 of 100 images" in out
    assert result["eval_subset"] == "val 50 of 100 images, test 50 of 512 images"
    # the accuracy is one of 50 images': a multiple of 2 %
    assert round(result["networks"][0]["final_test_acc"] / 2, 6).is_integer()


def test_eval_subset_of_a_class_sorted_folder_keeps_every_class_of_each_split(tmp_path):
    write_image_tree(tmp_path, ("train", "val", "test"), classes=("a", "b", "c"), per_class={"train": 4, "val": 6, "test": 8})
    from datasets import build_data
    data = utils.eval_subset(build_data("imagefolder", tmp_path, img_size=16, download=False), 6, seed=0)
    for split in ("val", "test"):
        kept, inner = getattr(data, split), getattr(data, split).dataset  # a Subset of the split
        assert sorted(inner.folder.samples[int(inner.indices[i])][1] for i in kept.indices) == [0, 0, 1, 1, 2, 2]
    assert data.info.val_size == data.info.test_size == 6
    assert data.info.eval_subset == "val 6 of 18 images, test 6 of 24 images"
    with pytest.raises(Exception, match="--eval-subset 2 has no image of class c"):
        utils.eval_subset(build_data("imagefolder", tmp_path, img_size=16, download=False), 2, seed=0)
