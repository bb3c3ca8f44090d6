"""--views independent: a group's networks see n differently augmented copies of one batch of images,
on both loader paths, as a pure function of (seed, epoch, view), and a resumed run continues exactly."""
import pytest
import torch

import flags
import stopping
import train_competitive_distillation as competitive
import train_mutual_learning as mutual
from datasets import make_loaders
from helpers import read_rows, sigterm_after_step
from test_datasets import coded_data, decode_and_check

TINY = ["--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "96", "--val-size", "0", "--batch-size", "32",
        "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress"]


def epoch_batches(path, views, epoch=0, seed=3):
    data = coded_data(128)
    train, _, _ = make_loaders(data, batch_size=32, loader=path, device="cpu", workers=0, seed=seed, views=views)
    train.set_epoch(epoch)
    return data, list(train)


@pytest.mark.parametrize("path", ["gpu", "torch"])
def test_each_view_is_an_augmentation_of_the_same_images(path):
    data, single = epoch_batches(path, views=1)
    _, triple = epoch_batches(path, views=3)
    assert len(single) == len(triple) == 4
    for (image, labels), (views, view_labels) in zip(single, triple):
        assert isinstance(views, list) and len(views) == 3 and torch.equal(labels, view_labels)
        assert torch.equal(views[0], image)            # view 0 is the single view: --views same is unchanged
        offsets = [decode_and_check(view, labels, data) for view in views]  # every view: a true crop+flip of its image
        # ... and the views were drawn independently: their crops differ for most images
        for other in offsets[1:]:
            differs = (offsets[0][0] != other[0]) | (offsets[0][1] != other[1]) | (offsets[0][2] != other[2])
            assert differs.float().mean() > 0.8


@pytest.mark.parametrize("path", ["gpu", "torch"])
def test_views_are_a_pure_function_of_seed_and_epoch(path):
    _, first = epoch_batches(path, views=2, epoch=1)
    _, again = epoch_batches(path, views=2, epoch=1)
    _, other_epoch = epoch_batches(path, views=2, epoch=2)
    for (a, _), (b, _) in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(first[0][0][1], other_epoch[0][0][1])


def test_the_two_loader_paths_batch_the_same_images_in_the_same_order():
    """The gpu and torch paths share the order of images (same indices per batch), each with its own
    augmentation generator, as for a single view."""
    _, gpu = epoch_batches("gpu", views=2)
    _, torch_path = epoch_batches("torch", views=2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(gpu, torch_path))


def test_independent_views_reach_each_network(monkeypatch, tmp_path):
    """Each network's forward sees its own view: a deep-mutual-learning step gets n different inputs."""
    seen = []
    step = mutual.mutual_step

    def recording(run, inputs, *args, **kwargs):
        seen.append([x.clone() for x in inputs])
        return step(run, inputs, *args, **kwargs)

    monkeypatch.setattr(mutual, "mutual_step", recording)
    mutual.main(mutual.get_args_parser().parse_args([*TINY, "--models", "resnet20", "resnet20", "--epochs", "1",
                                                     "--views", "independent", "--out-dir", str(tmp_path / "ind")]))
    assert len(seen) == 3 and all(not torch.equal(a, b) for a, b in seen)
    seen.clear()
    mutual.main(mutual.get_args_parser().parse_args([*TINY, "--models", "resnet20", "resnet20", "--epochs", "1",
                                                     "--out-dir", str(tmp_path / "same")]))
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in seen)


def test_a_mid_epoch_resume_with_independent_views_is_exact(tmp_path):
    """Interrupted after step 2 of epoch 2 (a stop request), resumed: metrics equal an uninterrupted run."""
    argv = [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--views", "independent", "--deterministic"]
    competitive.main(competitive.get_args_parser().parse_args([*argv, "--out-dir", str(tmp_path / "straight")]))
    with sigterm_after_step(5), pytest.raises(SystemExit) as stopped:  # step 2 of epoch 2
        competitive.main(competitive.get_args_parser().parse_args([*argv, "--out-dir", str(tmp_path / "resumed")]))
    assert stopped.value.code == 143
    competitive.main(competitive.get_args_parser().parse_args([*argv, "--out-dir", str(tmp_path / "resumed"),
                                                               "--resume", "auto"]))
    straight, resumed = read_rows(tmp_path / "straight"), read_rows(tmp_path / "resumed")
    keys = [k for k in straight[0] if k not in ("epoch_time_s", "images_per_s")]
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]


def test_views_are_a_group_flag_and_kept_on_resume(capsys, tmp_path):
    assert competitive.get_args_parser().parse_args([]).views == "same"
    competitive.main(competitive.get_args_parser().parse_args([*TINY, "--models", "resnet20", "resnet20", "--epochs", "1",
                                                               "--out-dir", str(tmp_path)]))
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(competitive.main, competitive.get_args_parser(),
                     [*TINY, "--models", "resnet20", "resnet20", "--epochs", "2", "--views", "independent",
                      "--resume", str(tmp_path / "last.pt")])
    assert exit_info.value.code == 2
    assert "was written with --views same; this run has independent" in capsys.readouterr().err
