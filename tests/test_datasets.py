"""Tests for datasets/: every source in its real on-disk format, the split, and both loader paths (CPU, seconds)."""
import gzip
import importlib.util
import io
import pickle
import re
import struct
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torchvision import transforms

import datasets.sources as sources
from datasets import (
    DATASETS, ArrayDataset, DataInfo, DatasetError, GpuLoader, TorchLoader, build_data, data_from_arrays, make_loaders)
from datasets.loaders import _rotate
from datasets.sources import AUGMENT_STREAM, mix_seed
from helpers import DEVICES, write_broken_image_tree, write_image_tree, write_mnist_like

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def no_debian_fashion_mnist(monkeypatch, tmp_path):
    """Hide Debian's Fashion-MNIST so that lookups only see tmp_path (the Debian test restores it)."""
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")


def without_md5_checks(tv):
    """torchvision's CIFAR or SVHN class with its per-file md5 checks off (its reading and downloading
    unchanged): the small files written here are in the real format but are not the real files."""
    if hasattr(tv, "split_list"):  # SVHN: {split: [url, filename, md5]}
        fields = {"split_list": {split: [url, filename, None] for split, (url, filename, _) in tv.split_list.items()}}
    else:  # CIFAR: [[filename, md5], ...] and the metadata file's md5
        fields = {"train_list": [[f, None] for f, _ in tv.train_list], "test_list": [[f, None] for f, _ in tv.test_list],
                  "meta": {**tv.meta, "md5": None}}
    return type(tv.__name__, (tv,), fields)


@pytest.fixture(autouse=True)
def small_files_pass_torchvision(monkeypatch):
    """The md5-free readers for every test here (test_real_torchvision_checks_md5 restores the real one)."""
    for name in ("cifar10", "cifar100", "svhn"):
        monkeypatch.setitem(sources.TORCHVISION_DATASETS, name, without_md5_checks(sources.TORCHVISION_DATASETS[name]))


# ---------------------------------------------------------------------------------------------
# Writers for the real on-disk formats
# ---------------------------------------------------------------------------------------------

def coded_cifar_images(count, start):
    """Random CIFAR rows (N, 3072) whose first byte is the image's index, so splits can be traced."""
    rows = np.random.default_rng(start).integers(0, 256, (count, 3072), dtype=np.uint8)
    rows[:, 0] = np.arange(start, start + count)
    return rows


def write_cifar10(root, per_file=10):
    """cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta (pickled dicts, protocol 2 as the real
    ones; str keys, which is what the real files' Python 2 strings load as with encoding="latin1")."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for number, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rows = coded_cifar_images(per_file, number * per_file)
        batch = {"batch_label": name, "labels": [int(r[0]) % 10 for r in rows], "data": rows,
                 "filenames": [f"{i}.png" for i in range(per_file)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))


def write_cifar100(root, train=20, test=10):
    """cifar-100-python: train, test, meta; labels under fine_labels (pickled as write_cifar10's)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count, start in (("train", train, 0), ("test", test, train)):
        rows = coded_cifar_images(count, start)
        batch = {"data": rows, "fine_labels": [(int(r[0]) * 7) % 100 for r in rows], "coarse_labels": [0] * count}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_svhn(root, train=12, test=6):
    """train_32x32.mat / test_32x32.mat as torchvision downloads them: X (32, 32, 3, N), y (N, 1) in 1..10."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        scipy.io.savemat(root / f"{split}_32x32.mat", {
            "X": rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8),
            "y": (np.arange(count) % 10 + 1).astype(np.uint8).reshape(-1, 1)})


# ---------------------------------------------------------------------------------------------
# Building each dataset
# ---------------------------------------------------------------------------------------------

def expected_normalised(images_uint8, info):
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(DatasetError) as error:
        build_data("cifar1000", tmp_path)
    assert all(name in str(error.value) for name in DATASETS)


def test_cifar10_from_python_batches(tmp_path):
    write_cifar10(tmp_path)
    data = build_data("cifar10", tmp_path, val_size=10, download=False)
    info = data.info
    assert (info.num_classes, info.in_chans, info.img_size, info.in_memory, info.synthetic) == (10, 3, 32, True, False)
    assert info.classes[0] == "airplane" and len(info.classes) == 10
    assert (info.train_size, info.val_size, info.test_size) == (40, 10, 10)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)
    images, labels = data.arrays["test"]
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    # The pickle's 3072 bytes are channel-major rows: byte 0 is the red value of pixel (0, 0).
    assert images[:, 0, 0, 0].tolist() == list(range(50, 60))
    assert labels.tolist() == [i % 10 for i in range(50, 60)]
    image, label = data.test[3]
    assert image.dtype == torch.float32 and isinstance(label, int) and label == int(labels[3])
    torch.testing.assert_close(image, expected_normalised(images[3], info), atol=1e-6, rtol=0)
    assert data.train[0][0].shape == (3, 32, 32) and len(data.train) == 40 and len(data.val) == 10


def test_cifar100_fine_labels_and_resize(tmp_path):
    write_cifar100(tmp_path)
    data = build_data("cifar100", tmp_path, val_size=5, img_size=48, download=False)
    info = data.info
    assert (info.num_classes, info.img_size, info.native_size) == (100, 48, 32)
    assert info.mean == (0.5071, 0.4865, 0.4409)
    assert data.arrays["train"][0].shape == (15, 3, 32, 32)  # arrays stay at native size
    images, labels = data.arrays["test"]
    assert labels.tolist() == [(int(i) * 7) % 100 for i in images[:, 0, 0, 0]]
    assert data.test[0][0].shape == (3, 48, 48) and data.train[0][0].shape == (3, 48, 48)
    batch, _ = next(iter(make_loaders(data, batch_size=4, loader="gpu", device="cpu")[0]))
    assert batch.shape == (4, 3, 48, 48)


@pytest.mark.parametrize("name, layout, compress", [
    ("fashion-mnist", "FashionMNIST/raw", True),   # where torchvision downloads to
    ("fashion-mnist", "fashion-mnist", False),     # plain IDX files
    ("fashion-mnist", ".", True),                  # the four .gz files copied into --data-dir itself
    ("mnist", "MNIST/raw", False),
    ("mnist", "mnist", True),
    ("mnist", ".", False),
])
def test_mnist_likes_from_idx_files(tmp_path, name, layout, compress):
    # In a bare directory the files' mean pixel must be the data set's (0.286 / 0.131), not random's 0.5.
    high = {"fashion-mnist": 147, "mnist": 67}[name] if layout == "." else 256
    written = write_mnist_like(tmp_path / layout, compress=compress, high=high)
    data = build_data(name, tmp_path, val_size=6, download=False)
    info = data.info
    assert info.source == str(tmp_path / layout)  # the startup line names the files read
    assert (info.in_chans, info.img_size, info.num_classes) == (1, 28, 10)
    assert (info.train_size, info.val_size, info.test_size) == (24, 6, 10)
    assert info.hflip == (name == "fashion-mnist") and info.crop_padding == 2
    assert info.mean == ((0.2860,) if name == "fashion-mnist" else (0.1307,))
    images, labels = data.arrays["test"]
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(written["t10k"][0]))
    assert labels.tolist() == written["t10k"][1].tolist()
    torch.testing.assert_close(data.test[2][0], expected_normalised(images[2], info), atol=1e-6, rtol=0)
    with pytest.raises(DatasetError, match="--val-size"):  # the default 5000 does not fit 30 images
        build_data(name, tmp_path, download=False)


def test_the_other_sets_files_in_a_bare_directory_are_refused(tmp_path):
    write_mnist_like(tmp_path, high=67)  # MNIST's mean pixel
    with pytest.raises(DatasetError, match="look like MNIST's") as error:
        build_data("fashion-mnist", tmp_path, download=False)
    assert str(tmp_path / "fashion-mnist") in str(error.value)


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "fake"])
def test_a_data_dir_that_is_not_a_directory_is_refused(tmp_path, name):
    path = tmp_path / "fashion-mnist.tar"
    path.write_bytes(b"an archive, not its contents")
    with pytest.raises(DatasetError, match=re.escape(f"--data-dir {path} is not a directory")):
        build_data(name, path, download=False)


@pytest.mark.skipif(not HAS_SCIPY, reason="SVHN's .mat files need scipy")
def test_svhn_from_mat_files(tmp_path):
    write_svhn(tmp_path)
    data = build_data("svhn", tmp_path, val_size=2, download=False)
    info = data.info
    assert (info.in_chans, info.num_classes, info.hflip, info.train_size, info.test_size) == (3, 10, False, 10, 6)
    images, labels = data.arrays["test"]
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [1, 2, 3, 4, 5, 6]
    assert data.arrays["train"][1].max() == 9 and 0 in data.arrays["train"][1].tolist() + labels.tolist() + \
        data.arrays["val"][1].tolist()  # label 10 means the digit 0


def test_svhn_without_scipy_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DatasetError, match="pip install scipy"):
        build_data("svhn", tmp_path, download=False)


# The hand parsers this repository used before torchvision read these formats (kept here, small, as the
# reference): the arrays torchvision's readers give must be exactly theirs.

def reference_cifar(folder, train_files, test_files, label_key):
    """CIFAR python batches: latin1 pickles, rows of 3072 channel-major bytes -> (N, 3, 32, 32), labels int64."""
    def split(files):
        batches = []
        for name in files:
            with open(folder / name, "rb") as f:
                batches.append({k.decode() if isinstance(k, bytes) else k: v
                                for k, v in pickle.load(f, encoding="latin1").items()})
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        return images, np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return {"train": split(train_files), "test": split(test_files)}


def reference_idx(folder):
    """IDX files (plain or .gz): 0, 0, 0x08, ndim, big-endian int32 sizes, then the bytes; images get a channel axis."""
    def read(stem):
        path = folder / stem if (folder / stem).is_file() else folder / f"{stem}.gz"
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            content = f.read()
        assert content[:3] == b"\x00\x00\x08"
        ndim = content[3]
        shape = struct.unpack(f">{ndim}I", content[4:4 + 4 * ndim])
        return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
    return {split: (read(f"{prefix}-images-idx3-ubyte")[:, None], read(f"{prefix}-labels-idx1-ubyte").astype(np.int64))
            for split, prefix in (("train", "train"), ("test", "t10k"))}


def reference_svhn(root):
    """SVHN .mat files: X (H, W, C, N) -> (N, C, H, W), y (N, 1) in 1..10 -> y % 10."""
    import scipy.io

    arrays = {}
    for split in ("train", "test"):
        content = scipy.io.loadmat(root / f"{split}_32x32.mat")
        arrays[split] = (np.ascontiguousarray(content["X"].transpose(3, 2, 0, 1)),
                         content["y"].reshape(-1).astype(np.int64) % 10)
    return arrays


@pytest.mark.parametrize("name, write, reference", [
    ("cifar10", write_cifar10, lambda root: reference_cifar(
        root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels")),
    ("cifar100", write_cifar100, lambda root: reference_cifar(root / "cifar-100-python", ["train"], ["test"], "fine_labels")),
    ("mnist", lambda root: write_mnist_like(root / "MNIST" / "raw", compress=False), lambda root: reference_idx(root / "MNIST" / "raw")),
    ("fashion-mnist", lambda root: write_mnist_like(root / "fashion-mnist"), lambda root: reference_idx(root / "fashion-mnist")),
    pytest.param("svhn", write_svhn, reference_svhn, marks=pytest.mark.skipif(not HAS_SCIPY, reason="needs scipy")),
])
def test_torchvision_reads_exactly_what_the_hand_parser_read(tmp_path, name, write, reference):
    """Same uint8 (N, C, H, W) images, same int64 labels, same order, for every split."""
    write(tmp_path)
    data = build_data(name, tmp_path, val_size=0, download=False)
    expected = reference(tmp_path)
    for split in ("train", "test"):
        images, labels = data.arrays[split]
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.ndim == 4
        assert torch.equal(images, torch.from_numpy(expected[split][0]))
        assert torch.equal(labels, torch.from_numpy(expected[split][1]))


@pytest.mark.parametrize("name, write", [("cifar10", write_cifar10), ("cifar100", write_cifar100),
                                         pytest.param("svhn", write_svhn, marks=pytest.mark.skipif(not HAS_SCIPY, reason="needs scipy"))])
def test_real_torchvision_checks_md5(tmp_path, monkeypatch, name, write):
    """torchvision's own class refuses files that are not the published ones: a one-line error that says so."""
    monkeypatch.setitem(sources.TORCHVISION_DATASETS, name, getattr(torchvision.datasets, {
        "cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}[name]))
    write(tmp_path)
    with pytest.raises(DatasetError, match=r"are corrupt \(torchvision's md5 check failed\); download disabled") as error:
        build_data(name, tmp_path, download=False)
    assert "\n" not in str(error.value) and "--dataset fake" in str(error.value)


def test_an_unreadable_idx_file_is_one_line(tmp_path):
    write_mnist_like(tmp_path / "mnist", compress=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(DatasetError, match=re.escape(f"cannot read {path} as an IDX file")) as error:
        build_data("mnist", tmp_path, download=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, test_split", [("imagefolder", "test"), ("imagenet", "val")])
def test_image_folders(tmp_path, name, test_split):
    write_image_tree(tmp_path, ("train", test_split))
    data = build_data(name, tmp_path, img_size=16, val_size=2, download=False)
    info = data.info
    assert (info.num_classes, info.classes, info.in_memory, info.img_size) == (2, ("cat", "dog"), False, 16)
    assert info.source == f"{tmp_path}: train/ (training, 2 held out for validation), " + (
        "test/ (test)" if name == "imagefolder" else "val/ (test: ImageNet's validation set, the usual test set)")
    assert (info.train_size, info.val_size, info.test_size) == (4, 2, 6) and data.arrays is None
    for split in (data.train, data.val, data.test):
        image, label = split[0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label in (0, 1)
    # Eval images are uniform colour, so normalisation is checkable exactly (up to PIL's resize rounding).
    expected = (40 / 255 - torch.tensor(info.mean)) / torch.tensor(info.std)
    torch.testing.assert_close(data.test[0][0][:, 8, 8], expected, atol=1e-5, rtol=0)
    train, val, test = make_loaders(data, batch_size=2, device="cpu", workers=0)
    assert isinstance(train, TorchLoader) and len(train) == 2 and len(test) == 2
    assert sum(len(labels) for _, labels in val) == 2
    with pytest.raises(DatasetError, match="--loader gpu"):
        make_loaders(data, batch_size=2, loader="gpu", device="cpu")


def test_an_unreadable_image_takes_the_next_ones_place_with_one_warning(tmp_path, capsys):
    truncated, text = write_broken_image_tree(tmp_path)
    data = build_data("imagefolder", tmp_path, img_size=16, val_size=0, download=False)
    # ImageFolder's sorted order: cat/0, 1, 2, 2_truncated (3), dog/0 (4), 1, 2, 2_notes (7).
    for bad, substitute in ((3, 4), (7, 0)):  # the last one wraps around to the first
        for _ in range(2):  # found unreadable twice, named once
            torch.manual_seed(0)  # the train transform is random
            image, label = data.train[bad]
            torch.manual_seed(0)
            expected_image, expected_label = data.train[substitute]
            assert torch.equal(image, expected_image) and label == expected_label
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: skipped unreadable image {truncated} (image file is truncated)")
    assert warnings[0].endswith(f"1 unreadable in {tmp_path / 'train'} so far")
    assert warnings[1].startswith(f"warning: skipped unreadable image {text} (not an image file)")
    assert warnings[1].endswith("2 unreadable in " + str(tmp_path / "train") + " so far")

    strict = build_data("imagefolder", tmp_path, img_size=16, val_size=0, download=False, skip_bad_images=False)
    with pytest.raises(DatasetError, match=re.escape(f"unreadable image {text} (not an image file); remove or replace it")):
        strict.train[7]


def test_a_folder_of_unreadable_files_is_an_error(tmp_path):
    write_image_tree(tmp_path, ("test",))
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "0.png").write_text("not an image")
    data = build_data("imagefolder", tmp_path, img_size=16, download=False)
    with pytest.raises(DatasetError, match="2 image files in a row are unreadable in .*copied completely"):
        data.train[0]


def test_a_single_class_folder_is_refused(tmp_path):
    write_image_tree(tmp_path, ("train", "test"), classes=("cat",))
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'train'} has 1 class folder (cat); a classifier needs at least 2")):
        build_data("imagefolder", tmp_path, img_size=16, download=False)


def test_fake_is_synthetic_seeded_and_sized(tmp_path):
    data = build_data("fake", tmp_path, num_classes=7)
    again = build_data("fake", tmp_path, num_classes=7)
    info = data.info
    assert info.synthetic and info.in_memory and (info.num_classes, info.in_chans, info.img_size) == (7, 3, 32)
    assert (info.train_size, info.val_size, info.test_size) == (2048, 0, 512) and data.val is None
    assert torch.equal(data.arrays["train"][0], again.arrays["train"][0])
    assert data.arrays["train"][1].max() == 6 and len(info.classes) == 7
    # The statistics are measured on the training images; normalised test pixels come out roughly standard.
    batch, _ = next(iter(make_loaders(data, batch_size=256, device="cpu")[2]))
    assert abs(batch.mean()) < 0.1 and abs(batch.std() - 1) < 0.1
    big = build_data("fake", tmp_path, img_size=40)  # stored at 32 px and resized, like CIFAR
    assert big.arrays["test"][0].shape == (512, 3, 32, 32) and big.info.native_size == 32
    assert big.info.img_size == 40 and big.test[0][0].shape == (3, 40, 40)
    assert next(iter(make_loaders(big, batch_size=8, device="cpu")[0]))[0].shape == (8, 3, 40, 40)
    assert not any(tmp_path.iterdir())  # fake never touches data_dir


DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", DEBIAN_DIR)
    data = build_data("fashion-mnist", tmp_path / "empty", download=False)
    info = data.info
    assert (info.train_size, info.val_size, info.test_size) == (55000, 5000, 10000)
    assert data.arrays["train"][0].shape == (55000, 1, 28, 28) and info.in_chans == 1
    assert torch.bincount(data.arrays["test"][1]).tolist() == [1000] * 10  # the real test set is balanced
    # The published statistics describe these files.
    pixels = torch.cat([data.arrays["train"][0], data.arrays["val"][0]]).float() / 255
    assert abs(pixels.mean().item() - 0.2860) < 1e-3 and abs(pixels.std().item() - 0.3530) < 1e-3


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------

def test_val_split_disjoint_complete_and_fixed_by_split_seed(tmp_path):
    write_cifar10(tmp_path)

    def split(split_seed):
        data = build_data("cifar10", tmp_path, val_size=10, split_seed=split_seed, download=False)
        return [set(data.arrays[s][0][:, 0, 0, 0].tolist()) for s in ("train", "val")]

    train, val = split(0)
    assert len(train) == 40 and len(val) == 10 and not train & val and train | val == set(range(50))
    assert split(0) == [train, val]
    assert split(1)[1] != val
    for bad in (50, 60, -1):
        with pytest.raises(DatasetError, match="--val-size"):
            build_data("cifar10", tmp_path, val_size=bad, download=False)


# ---------------------------------------------------------------------------------------------
# Loaders: the gpu path against the torchvision pipeline
# ---------------------------------------------------------------------------------------------

def coded_data(count, *, img_size=32, hflip=True, with_val=False, crop_padding=4, rotate=0.0):
    """Images whose pixels name their own coordinates: channel 0 = 100 + 4 * column, channel 1 = 100 + 4 * row,
    channel 2 = 50 + index % 200; labels = index. Any crop/flip can be read back from the output."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    index = torch.arange(count)
    images = torch.stack([
        (100 + 4 * cols).expand(count, 32, 32),
        (100 + 4 * rows).expand(count, 32, 32),
        (50 + index % 200)[:, None, None].expand(count, 32, 32),
    ], 1).to(torch.uint8)
    arrays = {"train": (images, index.clone()), "test": (images.clone(), index.clone())}
    if with_val:
        arrays["val"] = (images.clone(), index.clone())
    info = DataInfo(name="coded", num_classes=count, in_chans=3, img_size=img_size, mean=(0.5, 0.4, 0.3),
                    std=(0.2, 0.25, 0.3), classes=tuple(map(str, range(count))), synthetic=True, in_memory=True,
                    train_size=count, val_size=count if with_val else 0, test_size=count, native_size=32,
                    crop_padding=crop_padding, hflip=hflip, rotate=rotate)
    return data_from_arrays(info, arrays)


def to_pixels(batch, info):
    """Undo normalisation: normalised float (B, C, H, W) -> integer pixel values."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((batch * std + mean) * 255).round().long()


def reference_crop_flip(image, offset_y, offset_x, flip, pad=4):
    """The torchvision definition, by hand: crop the zero-padded image at (offset_y, offset_x), then mirror."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    crop = padded[:, offset_y:offset_y + 32, offset_x:offset_x + 32]
    return crop[:, :, ::-1] if flip else crop


def decode_and_check(batch, labels, data):
    """Recover each sample's (offset_y, offset_x, flip) from its pixels and check the whole image against them."""
    pixels = to_pixels(batch, data.info)
    source_row = (pixels[:, 1, 16, 16] - 100) // 4  # output (16, 16) is never padding at pad 4
    col_here, col_right = (pixels[:, 0, 16, 16] - 100) // 4, (pixels[:, 0, 16, 17] - 100) // 4
    flips = col_right < col_here
    offset_y = source_row - 16 + 4
    offset_x = torch.where(flips, col_here + 4 - 15, col_here + 4 - 16)
    images = data.arrays["train"][0]
    for i in range(0, len(labels), 17):  # a spread of samples, full images
        expected = reference_crop_flip(images[labels[i]].numpy(), int(offset_y[i]), int(offset_x[i]), bool(flips[i]))
        assert np.array_equal(pixels[i].numpy(), expected)
    return offset_y, offset_x, flips


@pytest.mark.parametrize("path", ["gpu", "torch"])
def test_augmentation_distribution(path):
    """Both paths: crops from the zero-padded image with offsets uniform on 0..8 per axis, flips at rate 0.5."""
    data = coded_data(512)
    train, _, _ = make_loaders(data, batch_size=128, loader=path, device="cpu", workers=0, seed=3)
    offsets_y, offsets_x, flips = [], [], []
    for epoch in range(8):  # 4096 draws
        train.set_epoch(epoch)
        for batch, labels in train:
            y, x, f = decode_and_check(batch, labels, data)
            offsets_y.append(y), offsets_x.append(x), flips.append(f)
    draws = 8 * 512
    # Each offset count is Binomial(4096, 1/9): mean 455, sd 20; +-100 is 5 sd.
    for offsets in (torch.cat(offsets_y), torch.cat(offsets_x)):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and (counts - draws / 9).abs().max() < 100, counts.tolist()
    # Flip rate: sd 0.0078 over 4096 draws; 0.04 is 5 sd.
    assert abs(torch.cat(flips).float().mean().item() - 0.5) < 0.04


def test_no_flip_datasets_never_flip():
    data = coded_data(256, hflip=False)
    for path in ("gpu", "torch"):
        train, _, _ = make_loaders(data, batch_size=128, loader=path, device="cpu", workers=0)
        for batch, labels in train:
            assert not decode_and_check(batch, labels, data)[2].any()


@pytest.mark.parametrize("img_size, atol", [(32, 1e-5), (48, 0.02)])  # 0.02: one grey level at std 0.2
def test_eval_batches_match_torchvision(img_size, atol):
    """Un-augmented data: the gpu path normalises (and resizes) like ToTensor + Normalize (+ PIL Resize)."""
    data = coded_data(40, img_size=img_size, with_val=True)
    gpu = make_loaders(data, batch_size=8, loader="gpu", device="cpu")
    torch_path = make_loaders(data, batch_size=8, loader="torch", device="cpu", workers=0)
    for gpu_loader, torch_loader in zip(gpu[1:], torch_path[1:], strict=True):
        assert isinstance(gpu_loader, GpuLoader) and len(gpu_loader) == len(torch_loader) == 3  # 40 / 16
        for (gpu_images, gpu_labels), (ref_images, ref_labels) in zip(gpu_loader, torch_loader, strict=True):
            assert gpu_images.shape == ref_images.shape == (len(ref_labels), 3, img_size, img_size)
            assert gpu_images.dtype == torch.float32 and torch.equal(gpu_labels, ref_labels)
            torch.testing.assert_close(gpu_images, ref_images, atol=atol, rtol=0)
            # PIL rounds its resize to uint8; the gpu path does not. Means agree much closer than pixels.
            assert abs(gpu_images.mean() - ref_images.mean()) < 0.01


# ---------------------------------------------------------------------------------------------
# Loaders: --rotate and --no-crop
# ---------------------------------------------------------------------------------------------

def pil_rotate(images, angles):
    """torchvision's RandomRotation step on the torch path: F.rotate of a PIL image (nearest, fill 0)."""
    return torch.stack([
        torch.from_numpy(np.array(TF.rotate(Image.fromarray(image.permute(1, 2, 0).numpy()), float(angle)))).permute(2, 0, 1)
        for image, angle in zip(images, angles, strict=True)])


def test_gpu_rotation_matches_torchvision():
    """_rotate equals torchvision's nearest rotation with zero fill of the same images by the same angles.

    Exactly at right angles and against v2's tensor rotate (also grid_sample). Against PIL's rotate, which
    the torch path uses, a tiny fraction of pixels may differ: PIL floors float64 source coordinates,
    grid_sample rounds float32 ones, so a sample point on (or within float error of) a pixel edge can
    take the neighbouring pixel (measured: about 1 pixel in 10,000 at 32 px, 1 in 1,000 at 224 px)."""
    generator = torch.Generator().manual_seed(0)
    for size, count in ((32, 64), (28, 16), (224, 4)):
        images = torch.randint(1, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
        angles = torch.empty(count).uniform_(-180, 180, generator=generator)
        ours = _rotate(images.float(), angles)
        assert torch.equal(ours, ours.round())  # nearest sampling copies pixels
        ours = ours.to(torch.uint8)
        pil = pil_rotate(images, angles)
        tensor_rotate = torch.stack([F2.rotate(image, float(angle)) for image, angle in zip(images, angles)])
        assert (pil == 0).all(1).float().mean() > 0.05  # the corners are filled black (no pixel was 0 before)
        assert (ours != pil).any(1).float().mean() < 2e-3, size
        assert (ours != tensor_rotate).any(1).float().mean() < 1e-4, size
    # Sign: positive angles turn counter-clockwise, like torch.rot90 from the rows' axis to the columns'.
    images = torch.randint(256, (4, 3, 32, 32), generator=generator).float()
    for angle, expected in ((90, torch.rot90(images, 1, (2, 3))), (-90, torch.rot90(images, -1, (2, 3))),
                            (180, images.flip(2, 3)), (0, images)):
        assert torch.equal(_rotate(images, torch.full((4,), float(angle))), expected), angle


@pytest.mark.parametrize("path", ["gpu", "torch"])
def test_default_crop_and_no_rotation_are_the_pipeline_without_these_flags(path):
    """--crop and --rotate 0 (the defaults) leave batches bit-identical to the pipeline before the flags: on
    the gpu path the epoch's crop offsets then flips, drawn here by hand from the augmentation stream; on the
    torch path RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize."""
    data = coded_data(96)
    seed, epoch = 4, 1
    train = make_loaders(data, batch_size=32, loader=path, device="cpu", workers=0, seed=seed)[0]
    train.set_epoch(epoch)
    if path == "gpu":
        generator = torch.Generator().manual_seed(mix_seed(seed, epoch, AUGMENT_STREAM))
        offsets = torch.randint(9, (96, 2), generator=generator)
        flips = torch.rand(96, generator=generator) < 0.5
        images = data.arrays["train"][0]
        for batch, labels in train:
            expected = torch.stack([torch.from_numpy(reference_crop_flip(
                images[i].numpy(), int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i])).copy()) for i in labels])
            assert torch.equal(batch, expected.float().mul_(train.scale).add_(train.shift))
        return
    info = data.info
    before = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    reference = TorchLoader(ArrayDataset(*data.arrays["train"], before), batch_size=32, train=True, drop_last=True,
                            device=torch.device("cpu"), workers=0, seed=seed, rank=0, world_size=1)
    assert same(epoch_batches(train, epoch), epoch_batches(reference, epoch))


@pytest.mark.parametrize("path", ["gpu", "torch"])
def test_no_crop_only_flips(path):
    """--no-crop: every training image is the stored image or its mirror, at rate 0.5 each."""
    data = coded_data(256, crop_padding=0)
    images = data.arrays["train"][0].long()
    train = make_loaders(data, batch_size=64, loader=path, device="cpu", workers=0, seed=2)[0]
    flips = []
    for epoch in range(2):  # 512 draws: the flip rate's sd is 0.022
        for batch, labels in epoch_batches(train, epoch):
            pixels, stored = to_pixels(batch, data.info), images[labels]
            flipped = (pixels != stored).flatten(1).any(1)
            assert torch.equal(pixels[flipped], stored[flipped].flip(-1))
            flips.append(flipped)
    assert abs(torch.cat(flips).float().mean().item() - 0.5) < 0.1


def test_crop_and_rotate_reach_the_data_info(tmp_path):
    """build_data's crop=False drops the in-memory crop; image folders refuse it in one line; rotate is carried."""
    info = build_data("fake", val_size=0, crop=False, rotate=15).info
    assert (info.crop_padding, info.hflip, info.rotate) == (0, True, 15.0)
    assert build_data("fake", val_size=0).info.crop_padding == 4 and build_data("fake", val_size=0).info.rotate == 0
    write_image_tree(tmp_path, ("train", "test"))
    assert build_data("imagefolder", tmp_path, img_size=16, rotate=10, download=False).info.rotate == 10
    with pytest.raises(DatasetError, match="--no-crop applies to in-memory data sets") as error:
        build_data("imagefolder", tmp_path, img_size=16, crop=False, download=False)
    assert "\n" not in str(error.value)
    for bad in (-1, 181, float("nan")):
        with pytest.raises(DatasetError, match=r"--rotate must be in \[0, 180\]"):
            build_data("fake", rotate=bad)


def rotation_angles(pixels):
    """The angle (degrees, counter-clockwise) each uncropped, unflipped coded image was turned by: the least-squares
    rotation from output to source coordinates (decoded from channels 0 and 1) over its non-black pixels."""
    centre = 15.5
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    inside = pixels[:, 0] > 0  # coded columns are >= 100, so 0 is the fill
    out_x, out_y = cols - centre, rows - centre
    src_x, src_y = (pixels[:, 0] - 100) / 4 - centre, (pixels[:, 1] - 100) / 4 - centre
    cross = ((out_x * src_y - out_y * src_x) * inside).sum((1, 2))
    dot = ((out_x * src_x + out_y * src_y) * inside).sum((1, 2))
    return torch.rad2deg(torch.atan2(cross, dot))


def test_both_paths_rotate_with_the_same_distribution():
    """--rotate 30: angles uniform in [-30, 30] on both paths (histograms and each other), corners exactly
    black before normalisation on both, and the same share of black pixels."""
    data = coded_data(256, hflip=False, crop_padding=0, rotate=30)
    angles, black = {}, {}
    for path in ("gpu", "torch"):
        train = make_loaders(data, batch_size=128, loader=path, device="cpu", workers=0, seed=7)[0]
        path_angles, path_black = [], []
        for epoch in range(8):  # 2048 draws
            for batch, _ in epoch_batches(train, epoch):
                pixels = to_pixels(batch, data.info)
                fill = pixels[:, 0] == 0
                assert torch.equal(fill[:, None].expand_as(pixels), pixels == 0)  # black in every channel, nowhere else
                path_angles.append(rotation_angles(pixels)), path_black.append(fill.float().mean((1, 2)))
        angles[path], black[path] = torch.cat(path_angles), torch.cat(path_black)
        # Each of 6 bins of 10 degrees holds Binomial(2048, 1/6): mean 341, sd 17; +-85 is 5 sd.
        counts = torch.histc(angles[path], bins=6, min=-30, max=30)
        assert angles[path].abs().max() < 31 and (counts - 2048 / 6).abs().max() < 85, (path, counts.tolist())
    # Two-sample Kolmogorov-Smirnov distance; 0.08 is above its 0.1% critical value (1.95 * sqrt(2 / 2048) = 0.061).
    grid = torch.linspace(-30, 30, 121)
    cdf = {path: (values[:, None] <= grid).float().mean(0) for path, values in angles.items()}
    assert (cdf["gpu"] - cdf["torch"]).abs().max() < 0.08
    assert abs(black["gpu"].mean() - black["torch"].mean()) < 0.005 and black["gpu"].mean() > 0.05


# ---------------------------------------------------------------------------------------------
# Loaders: determinism and sharding
# ---------------------------------------------------------------------------------------------

def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(batches) == len(loader)
    return batches


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True))


@pytest.mark.parametrize("path", ["gpu", "torch"])
@pytest.mark.parametrize("augment", [{}, dict(crop_padding=0, rotate=15)], ids=["crop-flip", "no-crop-rotate"])
def test_set_epoch_is_a_pure_function_of_seed_and_epoch(path, augment):
    data = coded_data(64, **augment)
    make = lambda **kw: make_loaders(data, batch_size=16, loader=path, device="cpu", workers=0, **kw)[0]  # noqa: E731
    train = make(seed=5)
    torch.manual_seed(1)
    epoch_1 = epoch_batches(train, 1)
    epoch_2 = epoch_batches(train, 2)
    torch.manual_seed(2)  # the training loop's own RNG use must not leak into the data
    assert same(epoch_batches(train, 1), epoch_1)
    assert same(epoch_batches(make(seed=5), 1), epoch_1)  # a fresh loader, as after a resume
    assert [y.tolist() for _, y in epoch_2] != [y.tolist() for _, y in epoch_1]
    assert [y.tolist() for _, y in epoch_batches(make(seed=6), 1)] != [y.tolist() for _, y in epoch_1]
    assert len(epoch_1) == 4 and sorted(torch.cat([y for _, y in epoch_1]).tolist()) == list(range(64))


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_loader_draws_are_a_cpu_generators_whatever_the_device(device, monkeypatch):
    """The gpu path draws each epoch's crops, flips and angles with a CPU generator and moves them to its
    device: the values of a CPU run (the same as before the draws moved to the CPU), so a run resumed on
    another device type continues the same augmentation. On the CPU the loader's device is the CPU."""
    data = coded_data(64, rotate=15)
    made = []
    generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda *args, **kwargs: made.append((args, kwargs)) or generator(*args, **kwargs))
    loader = make_loaders(data, batch_size=16, loader="gpu", device=device, seed=5, views=2)[0]
    loader.set_epoch(3)
    for view in (0, 1):
        legacy = generator(device="cpu").manual_seed(mix_seed(5, 3, AUGMENT_STREAM, *([view] if view else [])))
        offsets = torch.randint(9, (64, 2), generator=legacy, device="cpu")
        flips = torch.rand(64, generator=legacy, device="cpu") < 0.5
        angles = torch.empty(64, device="cpu").uniform_(-15, 15, generator=legacy)
        drawn = loader._draws(view)
        assert all(d.device.type == device for d in drawn)
        for got, expected in zip(drawn, (offsets, flips, angles), strict=True):
            assert torch.equal(got.cpu(), expected)
    epoch = list(loader)  # two views per batch
    # A device with no random generator of its own (meta) gets its draws too: they are never made there.
    meta = make_loaders(data, batch_size=16, loader="gpu", device="meta", seed=5)[0]
    assert [d.device.type for d in meta._draws(0)] == ["meta"] * 3
    assert made and all(not args and set(kwargs) <= {"device"} and kwargs.get("device", "cpu") == "cpu" for args, kwargs in made)
    crop_flip = coded_data(64)
    on_device = epoch_batches(make_loaders(crop_flip, batch_size=16, loader="gpu", device=device, seed=5)[0], 2)
    on_cpu = epoch_batches(make_loaders(crop_flip, batch_size=16, loader="gpu", device="cpu", seed=5)[0], 2)
    assert same([(x.cpu(), y.cpu()) for x, y in on_device], on_cpu) and len(epoch) == 4


def test_gpu_loader_upsamples_with_antialias_like_the_torch_path():
    """Upsampling, antialias changes no filter (the triangle of bilinear either way) but torch computes it
    PIL's way, and its values differ from antialias=False's in the last bits: the gpu path keeps it, so
    upsampled runs keep their numbers (and PIL's arithmetic, which the torch path uses)."""
    data = coded_data(16, img_size=48)
    images, _ = next(iter(make_loaders(data, batch_size=16, loader="gpu", device="cpu")[2]))
    raw = data.arrays["test"][0].float()
    scale = 1 / (255 * torch.tensor(data.info.std).view(1, -1, 1, 1))
    shift = -torch.tensor(data.info.mean).view(1, -1, 1, 1) / torch.tensor(data.info.std).view(1, -1, 1, 1)
    for antialias, equal in ((True, True), (False, False)):
        resized = torch.nn.functional.interpolate(raw, size=(48, 48), mode="bilinear", align_corners=False,
                                                  antialias=antialias)
        assert torch.equal(images, resized.mul_(scale).add_(shift)) == equal, antialias


def test_torch_path_does_not_depend_on_worker_count():
    """Per-item seeds: the same batches (cropped, flipped and rotated) from the main process and from two worker processes."""
    data = coded_data(48, rotate=15)
    in_process = make_loaders(data, batch_size=16, loader="torch", device="cpu", workers=0, seed=9)[0]
    with_workers = make_loaders(data, batch_size=16, loader="torch", device="cpu", workers=2, seed=9)[0]
    for epoch in (0, 1):
        assert same(epoch_batches(in_process, epoch), epoch_batches(with_workers, epoch))


def test_train_drop_last_and_eval_keeps_everything():
    data = coded_data(50, with_val=True)
    for path in ("gpu", "torch"):
        train, val, test = make_loaders(data, batch_size=16, loader=path, device="cpu", workers=0)
        assert len(train) == 3 and all(len(y) == 16 for _, y in train)
        assert len(test) == 2 and [len(y) for _, y in test] == [32, 18] and len(val) == 2
        assert torch.cat([y for _, y in test]).tolist() == list(range(50))  # eval order is the dataset's
        train, _, _ = make_loaders(data, batch_size=16, loader=path, device="cpu", workers=0, drop_last=False)
        assert [len(y) for _, y in train] == [16, 16, 16, 2]


@pytest.mark.parametrize("path", ["gpu", "torch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_sharding(path, world_size):
    data = coded_data(50, with_val=True)
    train_shards, test_shards = [], []
    for rank in range(world_size):
        train, _, test = make_loaders(data, batch_size=4, loader=path, device="cpu", workers=0, seed=1,
                                      drop_last=False, rank=rank, world_size=world_size)
        train_shards.append(torch.cat([y for _, y in epoch_batches(train, 3)]).tolist())
        test_shards.append(torch.cat([y for _, y in test]).tolist())
    # Train: equal, disjoint slices of one permutation (a few tail samples dropped to keep ranks in step).
    assert all(len(shard) == 50 // world_size for shard in train_shards)
    assert len(set().union(*train_shards)) == 50 // world_size * world_size
    # Eval: summing over ranks counts every sample exactly once.
    assert sorted(sum(test_shards, [])) == list(range(50))
    with pytest.raises(DatasetError):
        make_loaders(data, batch_size=4, loader=path, device="cpu", rank=world_size, world_size=world_size)


def test_loader_choice():
    data = coded_data(32)
    assert isinstance(make_loaders(data, batch_size=8, device="cpu")[0], GpuLoader)  # auto: in memory -> gpu
    train, val, test = make_loaders(data, batch_size=8, loader="torch", device="cpu", workers=0)
    assert isinstance(train, TorchLoader) and val is None and len(test) == 2  # eval batch = 2 x 8
    with pytest.raises(DatasetError, match="unknown loader"):
        make_loaders(data, batch_size=8, loader="dali", device="cpu")


# ---------------------------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in DATASETS if n != "fake"])
def test_missing_data_is_one_line_that_says_where_and_how(tmp_path, name):
    if name == "svhn" and not HAS_SCIPY:
        pytest.skip("without scipy SVHN stops earlier, at `pip install scipy`")
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as error:
        build_data(name, root, download=False)
    message = str(error.value)
    assert "\n" not in message and str(root) in message and "--dataset fake" in message
    hint = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
            "fashion-mnist": "apt-get install dataset-fashion-mnist", "mnist": "train-images-idx3-ubyte",
            "svhn": "train_32x32.mat", "imagenet": "val", "imagefolder": "test"}[name]
    assert hint in message
    assert not root.exists()


class FailingResponse:
    """Stands in for urlopen's response: sends a few bytes, then the connection drops."""

    def __init__(self, request):
        self.url = request.full_url if hasattr(request, "full_url") else request
        self.length = 10**6
        self.sent = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size=-1):
        if self.sent:
            raise ConnectionResetError("connection reset by peer")
        self.sent = True
        return b"\x1f\x8b partial archive"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion-mnist", "mnist", "svhn"])
@pytest.mark.parametrize("dir_exists", [True, False])
def test_failed_download_leaves_no_partial_files(tmp_path, monkeypatch, name, dir_exists):
    if name == "svhn" and not HAS_SCIPY:
        pytest.skip("needs scipy")
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, *args, **kwargs: FailingResponse(request))
    root = tmp_path / "data"
    if dir_exists:
        (root / "MNIST").mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="download failed .*connection reset") as error:
        build_data(name, root, download=True)
    assert "\n" not in str(error.value)
    if dir_exists:
        assert sorted(p.name for p in root.rglob("*")) == ["MNIST", "notes.txt"]
    else:
        assert not root.exists()


class ServedResponse:
    """Stands in for urlopen's response: the bytes the test publishes under the URL's file name (no network)."""

    def __init__(self, request, published):
        self.url = request.full_url if hasattr(request, "full_url") else request
        content = published[self.url.rsplit("/", 1)[-1]]
        self.length, self.content = len(content), io.BytesIO(content)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size=-1):
        return self.content.read(size)


def publish(name, folder):
    """Small files in the published formats, as (file name -> bytes, the arrays the hand parser read from them)."""
    if name == "cifar10":
        write_cifar10(folder)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            tar.add(folder / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        return {"cifar-10-python.tar.gz": archive.getvalue()}, reference_cifar(
            folder / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels")
    if name == "mnist":
        write_mnist_like(folder)
        return {path.name: path.read_bytes() for path in folder.glob("*.gz")}, reference_idx(folder)
    write_svhn(folder)
    return {path.name: path.read_bytes() for path in folder.glob("*.mat")}, reference_svhn(folder)


@pytest.mark.parametrize("name, landed", [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw"),
                                          pytest.param("svhn", ".", marks=pytest.mark.skipif(not HAS_SCIPY, reason="needs scipy"))])
def test_missing_files_are_downloaded_by_torchvision(tmp_path, monkeypatch, name, landed):
    """With download on, torchvision fetches what is missing into its own layout, and that is what is read
    (the published files' md5s, which torchvision checks, are the real ones': not checked here)."""
    published, expected = publish(name, tmp_path / "published")
    tv = sources.TORCHVISION_DATASETS[name]
    fields = {}  # SVHN's file md5s are off already (without_md5_checks)
    if name == "cifar10":
        fields = {"tgz_md5": None}
    elif name == "mnist":
        fields = {"resources": [(filename, None) for filename, _ in tv.resources]}
    monkeypatch.setitem(sources.TORCHVISION_DATASETS, name, type(tv.__name__, (tv,), fields))
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, *args, **kwargs: ServedResponse(request, published))
    root = tmp_path / "data"
    data = build_data(name, root, val_size=0, download=True)
    assert data.info.source == str(root / landed)
    for split in ("train", "test"):
        assert torch.equal(data.arrays[split][0], torch.from_numpy(expected[split][0]))
        assert torch.equal(data.arrays[split][1], torch.from_numpy(expected[split][1]))


def test_train_val_and_test_folders_each_play_their_role(tmp_path):
    write_image_tree(tmp_path, ("train", "val", "test"), per_class={"train": 5, "val": 2, "test": 3})
    data = build_data("imagefolder", tmp_path, img_size=16, download=False)
    assert (data.info.train_size, data.info.val_size, data.info.test_size) == (10, 4, 6)
    assert data.info.source == f"{tmp_path}: train/ (training), val/ (validation), test/ (test)"
    assert data.val.folder.root == str(tmp_path / "val") and data.test.folder.root == str(tmp_path / "test")
    with pytest.raises(DatasetError, match="holds val/, the validation set; --val-size 3 would hold out another"):
        build_data("imagefolder", tmp_path, img_size=16, val_size=3, download=False)


@pytest.mark.parametrize("splits, message", [
    (("train", "val"), "holds train/ and val/ but no test/: the test set needs a folder of its own (val/ is the validation set"),
    (("train",), "holds train/ but no test/"),
    ((), "holds no class folders")])
def test_a_tree_without_its_test_folder_says_what_it_found(tmp_path, splits, message):
    write_image_tree(tmp_path, splits)
    with pytest.raises(DatasetError, match=re.escape(message)):
        build_data("imagefolder", tmp_path, img_size=16, download=False)


def test_a_plain_tree_of_class_folders_is_split_by_fractions_within_each_class(tmp_path):
    write_image_tree(tmp_path, ("plain",), classes=("a", "b", "c"), per_class=10)
    root = tmp_path / "plain"
    for name in ("a", "b", "c"):  # the class folders directly in the root
        (root / name).rename(tmp_path / name)
    root.rmdir()
    with pytest.raises(DatasetError, match="holds class folders but no train/ or test/.*--folder-split TRAIN VAL TEST"):
        build_data("imagefolder", tmp_path, img_size=16, download=False)
    data = build_data("imagefolder", tmp_path, img_size=16, folder_split=(0.6, 0.2, 0.2), split_seed=3, download=False)
    assert (data.info.train_size, data.info.val_size, data.info.test_size) == (18, 6, 6)
    assert data.info.source == f"{tmp_path} split 60/20/20 % into training/validation/test, within each class (split seed 3)"
    labels = lambda split: sorted(split.folder.samples[int(i)][1] for i in split.indices)
    assert labels(data.train) == [0] * 6 + [1] * 6 + [2] * 6 and labels(data.test) == [0, 0, 1, 1, 2, 2]
    everything = sorted([*data.train.indices.tolist(), *data.val.indices.tolist(), *data.test.indices.tolist()])
    assert everything == list(range(30))  # a partition
    again = build_data("imagefolder", tmp_path, img_size=16, folder_split=(0.6, 0.2, 0.2), split_seed=3, download=False)
    assert again.test.indices.tolist() == data.test.indices.tolist()  # seeded
    with pytest.raises(DatasetError, match="three fractions TRAIN VAL TEST that add up to 1"):
        build_data("imagefolder", tmp_path, img_size=16, folder_split=(0.6, 0.2, 0.3), download=False)


def test_a_subset_of_a_class_sorted_folder_keeps_every_class(tmp_path):
    """An image folder is ordered by class: --train-subset chooses each class's share (seeded); the first N
    would be one class only. A subset that cannot hold every class is refused."""
    import dataclasses
    import utils
    from errors import UsageError
    write_image_tree(tmp_path, ("train", "test"), classes=("a", "b", "c"), per_class={"train": 20, "test": 2})
    data = build_data("imagefolder", tmp_path, img_size=16, download=False)
    kept = utils.train_subset(data, 30, seed=0)
    labels = [data.train.folder.samples[int(data.train.indices[i])][1] for i in kept.train.indices]
    assert sorted(labels) == [0] * 10 + [1] * 10 + [2] * 10
    assert kept.info.subset == "train subset: 30 images, each class its share from a seeded permutation (split seed 0); per class 10 / 10 / 10"
    assert utils.train_subset(data, 30, seed=0).train.indices == kept.train.indices  # seeded
    with pytest.raises(UsageError, match="--train-subset 2 has no image of class c"):
        utils.train_subset(data, 2, seed=0)
    # an in-memory set keeps its first N (the committed studies' rule), and says its class counts
    fake = build_data("fake", tmp_path, download=False)
    first = utils.train_subset(fake, 40, seed=0)
    assert torch.equal(first.arrays["train"][1], fake.arrays["train"][1][:40])
    assert first.info.subset.startswith("train subset: 40 images, the first of the training split; per class ")
    assert dataclasses.replace(first.info, subset="") == dataclasses.replace(fake.info, train_size=40)
