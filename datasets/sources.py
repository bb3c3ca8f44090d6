"""Datasets by name, and a validation split held out of the training set.

`build_data(name, data_dir)` returns a `Data`: torch Datasets for train / val / test plus, for the
sets small enough to live in memory (CIFAR, MNIST-likes, SVHN, fake), the raw uint8 arrays.
The Datasets apply the authors' PIL-based torchvision transforms; datasets/loaders.py feeds them."""
import http.client
import importlib.util
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from . import augment

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist", "svhn", "imagenet", "imagefolder", "fake")

# Where Debian's `dataset-fashion-mnist` package puts the four IDX files (tests monkeypatch this).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FAKE_TRAIN_SIZE, FAKE_TEST_SIZE = 2048, 512

# Independent random streams derived from one user seed (see mix_seed); the loaders use the last three.
SPLIT_STREAM, ORDER_STREAM, AUGMENT_STREAM, WORKERS_STREAM, SUBSET_STREAM = 0, 1, 2, 3, 4


def mix_seed(*values):
    """A 63-bit seed hashed from all values (NumPy's SeedSequence), so (seed, epoch) pairs give unrelated streams."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


class DatasetError(Exception):
    """A user-facing, one-line problem with the data (missing files, bad split size, ...)."""


@dataclass(frozen=True)
class DataInfo:
    """What a script needs to know about a dataset: geometry, statistics, sizes and provenance."""
    name: str
    num_classes: int
    in_chans: int
    img_size: int  # the size fed to the model
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    classes: tuple[str, ...]
    synthetic: bool  # True for `fake`: results on it say nothing about any real task
    in_memory: bool  # images held as uint8 arrays (Data.arrays); the gpu loader needs this
    train_size: int
    val_size: int
    test_size: int
    native_size: int  # stored image size of in-memory sets (== img_size for image folders)
    crop_padding: int  # train RandomCrop padding of in-memory sets (0: no crop; image folders use RandomResizedCrop)
    hflip: bool  # train augmentation flips horizontally
    rotate: float = 0.0  # train random rotation by an angle uniform in [-rotate, rotate] degrees (0: none)
    rand_augment: str = ""  # train RandAugment config in timm's syntax ("": none; datasets/augment.py)
    rand_augment_impl: str = ""  # the library that runs it: "timm" or "torchvision"
    erase_prob: float = 0.0  # train random erasing probability, after normalisation (0: none)
    source: str = ""  # the directory the images were read from ("" for generated data); the startup line shows it
    subset: str = ""  # what --train-subset kept, in words (its rule and class counts); "" for the whole split
    eval_subset: str = ""  # what --eval-subset kept of the validation and test splits, in words; "" for the whole splits


@dataclass(frozen=True)
class Data:
    """A built dataset: info, the three splits as torch Datasets, and the uint8 arrays when in memory."""
    info: DataInfo
    train: Dataset
    val: Dataset | None  # None when info.val_size == 0
    test: Dataset
    arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] | None  # split -> (uint8 N,C,H,W, int64 N)


@dataclass(frozen=True)
class _Spec:
    """Fixed facts of one dataset: its title, stored geometry, published statistics and train augmentation."""
    title: str
    native_size: int  # for image folders: the default img_size
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool
    default_val_size: int


# Published per-dataset statistics (the authors used ImageNet's everywhere).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_SPECS = {
    "cifar10": _Spec("CIFAR-10", 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, 5000),
    "cifar100": _Spec("CIFAR-100", 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True, 5000),
    "fashion-mnist": _Spec("Fashion-MNIST", 28, 1, (0.2860,), (0.3530,), 2, True, 5000),
    "mnist": _Spec("MNIST", 28, 1, (0.1307,), (0.3081,), 2, False, 5000),
    # Digits are not mirror-symmetric, so neither digit set is flipped.
    "svhn": _Spec("SVHN", 32, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False, 5000),
    "imagenet": _Spec("ImageNet", 224, 3, _IMAGENET_MEAN, _IMAGENET_STD, 0, True, 0),
    "imagefolder": _Spec("image folder", 224, 3, _IMAGENET_MEAN, _IMAGENET_STD, 0, True, 0),
    # fake stands in for CIFAR: stored at 32 px, resized like CIFAR when --img-size differs; its
    # statistics are measured from the generated images (these placeholders are unused).
    "fake": _Spec("fake", 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4, True, 0),
}

_FOLDER_SETS = ("imagenet", "imagefolder")


# ----------------------------------------------------------------------------------------------
# Building a dataset
# ----------------------------------------------------------------------------------------------
def build_data(name, data_dir="./data", *, img_size=None, val_size=None, split_seed=0, download=True,
               num_classes=None, skip_bad_images=True, crop=True, rotate=0.0, rand_augment="none",
               rand_augment_impl="auto", erase_prob=0.0, folder_split=None):
    """Load dataset `name` (one of DATASETS) and hold a seeded validation split out of its training set.

    skip_bad_images (image folders): an unreadable image file is replaced by the next image of its
    split, with a warning naming it; False makes it an error (see _FolderSplit).
    crop=False (in-memory sets only) trains on whole images; rotate > 0 adds a random rotation by up
    to `rotate` degrees either way; rand_augment (a timm config string, by rand_augment_impl) and
    erase_prob > 0 add the transformer recipe's RandAugment and random erasing (datasets/augment.py),
    which only the torch loader applies (see _transforms). folder_split (image folders): (train, val, test)
    fractions of a plain tree of class folders (see _folder_data)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if img_size is not None and img_size < 1:
        raise DatasetError(f"--img-size must be positive, got {img_size}")
    if not 0 <= rotate <= 180:  # also refuses NaN
        raise DatasetError(f"--rotate must be in [0, 180] (degrees), got {rotate}")
    if not 0 <= erase_prob <= 1:
        raise DatasetError(f"--reprob must be in [0, 1], got {erase_prob}")
    try:
        recipe = dict(rand_augment="" if augment.parse_rand_augment(rand_augment) is None else rand_augment,
                      rand_augment_impl="" if rand_augment == "none" else augment.resolve_implementation(rand_augment_impl),
                      erase_prob=float(erase_prob))
    except ValueError as error:
        raise DatasetError(str(error)) from None
    spec = _SPECS[name]
    root = Path(data_dir).expanduser()
    if name != "fake" and root.exists() and not root.is_dir():  # never fall back to other files unnoticed
        raise DatasetError(f"--data-dir {root} is not a directory; pass the directory that holds the {spec.title} files")
    val_size = spec.default_val_size if val_size is None else val_size
    augmentation = dict(crop_padding=spec.crop_padding if crop else 0, hflip=spec.hflip, rotate=float(rotate), **recipe)
    if name in _FOLDER_SETS:
        if not crop:  # RandomResizedCrop is how image folders reach their input size; no plain alternative here
            raise DatasetError(f"--no-crop applies to in-memory data sets (CIFAR, MNIST-likes, SVHN, fake); "
                               f"{spec.title} always trains on RandomResizedCrop")
        return _folder_data(name, root, img_size or spec.native_size, val_size, split_seed, num_classes,
                            skip_bad_images, rotate=augmentation["rotate"], recipe=recipe, folder_split=folder_split)
    if folder_split is not None:
        raise DatasetError(f"--folder-split splits an image folder (--dataset imagefolder); {spec.title} has its own splits")
    if name == "fake":
        arrays, classes = _make_fake(spec.native_size, 10 if num_classes is None else num_classes)
        mean, std = _channel_stats(arrays["train"][0])
        source = ""
    else:
        arrays, classes, source = _IN_MEMORY_SOURCES[name](root, download)
        mean, std = spec.mean, spec.std
    _check_num_classes(spec.title, len(classes), num_classes)
    return _in_memory_data(name, arrays, classes, mean, std, img_size or spec.native_size, val_size, split_seed,
                           source, augmentation)


def _in_memory_data(name, arrays, classes, mean, std, img_size, val_size, split_seed, source, augmentation):
    """Hold the validation split out of arrays["train"] and wrap the uint8 splits as a Data."""
    spec = _SPECS[name]
    train_images, train_labels = arrays.pop("train")
    train_index, val_index = _hold_out(spec.title, len(train_labels), val_size, split_seed)
    arrays = {
        "train": (train_images[train_index], train_labels[train_index]),
        **({"val": (train_images[val_index], train_labels[val_index])} if val_size else {}),
        "test": arrays["test"],
    }
    info = DataInfo(name=name, num_classes=len(classes), in_chans=spec.in_chans, img_size=img_size, mean=mean,
                    std=std, classes=tuple(classes), synthetic=name == "fake", in_memory=True,
                    train_size=len(train_index), val_size=len(val_index), test_size=len(arrays["test"][1]),
                    native_size=spec.native_size, source=str(source), **augmentation)
    return data_from_arrays(info, arrays)


def data_from_arrays(info, arrays):
    """Wrap in-memory uint8 splits ("train", optional "val", "test") as a Data with PIL-transform Datasets."""
    train_tf, eval_tf = _transforms(info)
    datasets = {split: ArrayDataset(images, labels, train_tf if split == "train" else eval_tf)
                for split, (images, labels) in arrays.items()}
    return Data(info, datasets["train"], datasets.get("val"), datasets["test"], arrays)


def _check_num_classes(title, actual, requested):
    """Refuse a --num-classes that contradicts the dataset's own class count."""
    if requested is not None and requested != actual:
        raise DatasetError(f"{title} has {actual} classes but --num-classes {requested} was given")


def _hold_out(title, size, val_size, split_seed):
    """(train, val) indices: a permutation seeded by split_seed alone, so the split never moves with --seed."""
    if not 0 <= val_size < size:
        raise DatasetError(f"--val-size {val_size} is invalid: the {title} training set has {size} images, "
                           f"so it must be between 0 and {size - 1}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(split_seed, SPLIT_STREAM)))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _transforms(info):
    """(train, eval) PIL transforms: the authors' torchvision pipeline, which the gpu path mirrors, plus
    the transformer recipe's per-image steps when asked for (which the gpu path refuses)."""
    finish = [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    # RandomRotation's defaults (nearest, about the centre, fill 0 = black before Normalize), last of
    # the geometric steps so that it acts at the input size: the authors' CIFAR-10 order (crop, flip,
    # rotate) and CIFAR-100 order (Resize to 224, flip, rotate).
    rotate = [transforms.RandomRotation(info.rotate)] if info.rotate else []
    # Where timm's create_transform puts them for DeiT and CeiT: RandAugment on the PIL image at the
    # input size after the crop and flip; random erasing on the normalised tensor, last.
    recipe = [augment.rand_augment(info.rand_augment, info.rand_augment_impl, img_size=info.img_size, mean=info.mean)
              ] if info.rand_augment else []
    erase = [augment.random_erasing(info.erase_prob)] if info.erase_prob else []
    if not info.in_memory:
        resize = round(info.img_size * 8 / 7)  # the usual 256 -> 224 centre crop ratio
        train = [transforms.RandomResizedCrop(info.img_size), transforms.RandomHorizontalFlip()]
        evaluation = [transforms.Resize(resize), transforms.CenterCrop(info.img_size)]
        return transforms.Compose(train + rotate + recipe + finish + erase), transforms.Compose(evaluation + finish)
    # Resize after crop and flip, so that crop padding stays in native pixels (4 px on CIFAR at any --img-size).
    resize = []
    if info.img_size != info.native_size:
        size = (info.img_size, info.img_size)
        resize = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)]
    train = [transforms.RandomCrop(info.native_size, padding=info.crop_padding)] if info.crop_padding else []
    if info.hflip:
        train.append(transforms.RandomHorizontalFlip())
    return (transforms.Compose(train + resize + rotate + recipe + finish + erase),
            transforms.Compose(resize + finish))


class ArrayDataset(Dataset):
    """(transformed image, int label) pairs from uint8 (N, C, H, W) images, through PIL like torchvision's CIFAR10."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        # A 2-D array becomes mode "L", an H x W x 3 array mode "RGB".
        pixels = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(pixels)), int(self.labels[index])


# ----------------------------------------------------------------------------------------------
# The in-memory sources: each returns ({"train": (uint8 N,C,H,W, int64 N), "test": ...}, class names,
# the directory read). torchvision reads the files and downloads missing ones.
# ----------------------------------------------------------------------------------------------
# The torchvision datasets behind each name. CIFAR and SVHN check every file's md5 on each load, so the
# tests put subclasses without that check here for their small files in the same formats.
TORCHVISION_DATASETS = {
    "cifar10": torchvision.datasets.CIFAR10,
    "cifar100": torchvision.datasets.CIFAR100,
    "fashion-mnist": torchvision.datasets.FashionMNIST,
    "mnist": torchvision.datasets.MNIST,
    "svhn": torchvision.datasets.SVHN,
}

# Torchvision's mirrors can fail in several ways (DNS, HTTP, truncated or corrupt archive, md5).
_DOWNLOAD_ERRORS = (OSError, RuntimeError, EOFError, tarfile.TarError, zlib.error, http.client.HTTPException)


def _download(root, fetch):
    """Run a torchvision download; on failure delete whatever it wrote under root and return why, on one line."""
    existed = root.exists()
    before = set(root.rglob("*")) if existed else set()
    try:
        fetch()
        return None
    except BaseException as error:  # also Ctrl-C: never leave a half-written archive behind
        for path in sorted(set(root.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # new directories hold only new files, already removed (deepest first)
            else:
                path.unlink()
        if not existed and root.exists() and not any(root.iterdir()):
            root.rmdir()
        if not isinstance(error, _DOWNLOAD_ERRORS):
            raise
        reason = " ".join(str(error).split()) or type(error).__name__
        return reason if len(reason) <= 200 else reason[:197] + "..."


def _unavailable(title, problem, download, reason, how):
    """The one-line error for a dataset whose files are missing or corrupt and could not be downloaded."""
    why = "download disabled" if not download else f"download failed ({reason})"
    return DatasetError(f"{title} {problem}; {why}; {how}, or use --dataset fake for synthetic data")


def _problem(folder, filenames):
    """What is wrong with the files torchvision refused: some are missing, or (all there) they fail its md5 check."""
    missing = [name for name in filenames if not (folder / name).is_file()]
    if missing:
        return f"not found (looked for {', '.join(missing)} in {folder})"
    return f"files in {folder} are corrupt (torchvision's md5 check failed)"


def _torchvision_splits(name, root, download, splits, problem, how):
    """torchvision's dataset `name` for each split (constructor kwargs), read from root; files that are
    missing or fail the md5 check are downloaded first when download is on, else a one-line DatasetError."""
    tv = TORCHVISION_DATASETS[name]

    def build(**extra):
        return {split: tv(str(root), **kwargs, **extra) for split, kwargs in splits.items()}

    try:
        return build()
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        built = {}
    reason = _download(root, lambda: built.update(build(download=True))) if download else None
    if download and reason is None:
        return built
    raise _unavailable(_SPECS[name].title, problem, download, reason, how)


def _load_cifar(name, root, download):
    """CIFAR-10/100 read by torchvision from its extracted python batches in data_dir (downloaded when missing)."""
    tv = TORCHVISION_DATASETS[name]
    folder = root / tv.base_folder
    files = [filename for filename, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
    how = f"extract {tv.filename} from https://www.cs.toronto.edu/~kriz/cifar.html into {root}"
    splits = _torchvision_splits(name, root, download, {"train": dict(train=True), "test": dict(train=False)},
                                 _problem(folder, files), how)
    # torchvision holds the images as (N, H, W, C); the batches store them channel-major, as used here.
    arrays = {split: (torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))),
                      torch.as_tensor(dataset.targets, dtype=torch.int64))
              for split, dataset in splits.items()}
    return arrays, [str(c) for c in splits["train"].classes], folder


def _load_svhn(root, download):
    """SVHN train/test read by torchvision from its .mat files in data_dir (with scipy; `extra` is unused)."""
    if importlib.util.find_spec("scipy") is None:
        raise DatasetError("SVHN is stored as MATLAB .mat files, which need scipy: pip install scipy")
    tv = TORCHVISION_DATASETS["svhn"]
    files = [tv.split_list[split][1] for split in ("train", "test")]
    how = f"place train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ in {root}"
    splits = _torchvision_splits("svhn", root, download, {"train": dict(split="train"), "test": dict(split="test")},
                                 _problem(root, files), how)
    # torchvision has already turned the label 10 (SVHN's digit 0) into 0 and the images into (N, C, H, W).
    arrays = {split: (torch.from_numpy(np.ascontiguousarray(dataset.data)),
                      torch.from_numpy(dataset.labels.reshape(-1)))
              for split, dataset in splits.items()}
    return arrays, [str(digit) for digit in range(10)], root


_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# torchvision's Fashion-MNIST names; its MNIST names are "0 - zero", ..., here just the digits.
_IDX_CLASSES = {"fashion-mnist": tuple(torchvision.datasets.FashionMNIST.classes),
                "mnist": tuple(str(digit) for digit in range(10))}
# What torchvision's IDX reader and gunzip raise on a file that is not (a whole) IDX file of bytes.
_IDX_ERRORS = (AssertionError, KeyError, TypeError, ValueError, RuntimeError, OSError, EOFError, zlib.error)


def _idx_file(directory, stem):
    """The IDX file `stem` in directory, uncompressed or gzipped, if present."""
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx(path, reader):
    """One IDX file read by torchvision's MNIST `reader` (read_image_file or read_label_file).

    That reader takes an uncompressed file, as torchvision's own download leaves in <Class>/raw; a
    gzipped one (Debian ships only those) is decompressed by torchvision into a temporary directory."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.TemporaryDirectory() as scratch:
            return reader(extract_archive(str(path), scratch))
    except _IDX_ERRORS as error:
        why = " ".join(str(error).split()) or type(error).__name__
        raise DatasetError(f"cannot read {path} as an IDX file of unsigned bytes ({why[:120]}); "
                           "delete it and fetch it again") from None


def _load_idx_set(name, root, download):
    """MNIST or Fashion-MNIST from data_dir (torchvision's layout, data_dir/<name>, or the four files in
    data_dir itself), then Debian's package, then a torchvision download."""
    tv = TORCHVISION_DATASETS[name]
    candidates = [root / tv.__name__ / "raw", root / name, root]  # the first is where torchvision downloads to
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    stems = [stem for pair in _IDX_STEMS.values() for stem in pair]

    def find():
        return next((d for d in candidates if all(_idx_file(d, s) for s in stems)), None)

    directory, reason = find(), None
    if directory is None and download:
        reason = _download(root, lambda: tv(str(root), train=True, download=True))
        directory = find()
    if directory is None:
        looked = f"looked for {', '.join(s + '[.gz]' for s in stems)} in {', '.join(map(str, candidates))}"
        how = f"place the four files in {root / name}"
        if name == "fashion-mnist":
            how = f"install them with `apt-get install dataset-fashion-mnist` (into {DEBIAN_FASHION_MNIST}) or {how}"
        raise _unavailable(_SPECS[name].title, f"not found ({looked})", download, reason, how)

    arrays = {}
    for split, (image_stem, label_stem) in _IDX_STEMS.items():
        images = _read_idx(_idx_file(directory, image_stem), read_image_file)
        labels = _read_idx(_idx_file(directory, label_stem), read_label_file)
        if labels.shape != images.shape[:1]:
            shapes = f"{tuple(images.shape)} images, {tuple(labels.shape)} labels"
            raise DatasetError(f"{directory}: {split} files do not match ({shapes})")
        arrays[split] = (images.unsqueeze(1), labels)
    if directory == root:
        _check_idx_set(name, directory, arrays["train"][0])
    return arrays, list(_IDX_CLASSES[name]), directory


def _check_idx_set(name, directory, images):
    """MNIST and Fashion-MNIST share file names, so files found in a bare directory could be either:
    their mean pixels (0.131 and 0.286) tell them apart."""
    mean, expected = images.float().mean().item() / 255, _SPECS[name].mean[0]
    if abs(mean - expected) > 0.05:
        other = _SPECS["mnist" if name == "fashion-mnist" else "fashion-mnist"]
        looks = f"they look like {other.title}'s" if abs(mean - other.mean[0]) <= 0.05 else "they are another data set's"
        raise DatasetError(f"the IDX files in {directory} have mean pixel {mean:.3f}, {_SPECS[name].title}'s is {expected:.3f}: "
                           f"{looks} (MNIST and Fashion-MNIST share file names); put {_SPECS[name].title}'s files "
                           f"in {directory / name}")


_IN_MEMORY_SOURCES = {
    "cifar10": partial(_load_cifar, "cifar10"),
    "cifar100": partial(_load_cifar, "cifar100"),
    "fashion-mnist": partial(_load_idx_set, "fashion-mnist"),
    "mnist": partial(_load_idx_set, "mnist"),
    "svhn": _load_svhn,
}


def _make_fake(size, num_classes, seed=0):
    """Synthetic RGB images from a fixed generator: a smooth per-class colour pattern plus noise, so it is learnable."""
    if num_classes < 2:
        raise DatasetError(f"--num-classes must be at least 2, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=generator), size=(size, size), mode="bilinear")

    def draw(count):
        labels = torch.randint(num_classes, (count,), generator=generator)
        noise = 0.15 * torch.randn(count, 3, size, size, generator=generator)
        pixels = (0.2 + 0.6 * patterns[labels] + noise).clamp(0, 1)
        return pixels.mul(255).round().to(torch.uint8), labels

    arrays = {"train": draw(FAKE_TRAIN_SIZE), "test": draw(FAKE_TEST_SIZE)}
    return arrays, [f"class_{i}" for i in range(num_classes)]


def _channel_stats(images):
    """Per-channel mean and std in [0, 1] units."""
    pixels = images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(round(v, 4) for v in pixels.mean(1).tolist()), tuple(round(v, 4) for v in pixels.std(1).tolist())


# ----------------------------------------------------------------------------------------------
# Image folders (ImageNet and user trees), read from disk per item
# ----------------------------------------------------------------------------------------------
def _folder_data(name, root, img_size, val_size, split_seed, num_classes, skip_bad_images, *, rotate, recipe,
                 folder_split=None):
    """ImageNet (train/ + val/, its validation set the test set by convention, as ImageNet results are
    reported) or an image-folder tree: train/, val/ and test/ each in its own role (without val/,
    --val-size holds a validation split out of train/), or a plain tree of class folders split into
    train, validation and test by the `folder_split` fractions (seeded by split_seed, stratified by class)."""
    spec = _SPECS[name]
    splits, where = _folder_splits(name, root, val_size, split_seed, folder_split)
    train_folder, train_index = splits["train"]
    test_folder, test_index = splits["test"]
    if len(train_folder.classes) < 2:  # one class would train to a meaningless 100%
        raise DatasetError(f"{train_folder.root} has {len(train_folder.classes)} class folder "
                           f"({', '.join(train_folder.classes)}); a classifier needs at least 2")
    for role, (folder, _) in splits.items():
        if folder is not None and folder.classes != train_folder.classes:
            raise DatasetError(f"{spec.title}: the class folders of {folder.root} ({role}) are not those of "
                               f"{train_folder.root} ({', '.join(train_folder.classes)})")
    _check_num_classes(spec.title, len(train_folder.classes), num_classes)
    val_folder, val_index = splits.get("val") or (None, np.arange(0))
    info = DataInfo(name=name, num_classes=len(train_folder.classes), in_chans=3, img_size=img_size, mean=spec.mean,
                    std=spec.std, classes=tuple(train_folder.classes), synthetic=False, in_memory=False,
                    train_size=len(train_index), val_size=len(val_index), test_size=len(test_index),
                    native_size=img_size, crop_padding=0, hflip=True, rotate=rotate, source=where, **recipe)
    train_tf, eval_tf = _transforms(info)
    bad = {id(folder): torch.zeros(len(folder), dtype=torch.uint8).share_memory_()
           for folder, _ in splits.values() if folder is not None}
    split = partial(_FolderSplit, skip_bad_images=skip_bad_images)
    train = split(train_folder, train_index, train_tf, bad[id(train_folder)])
    val = split(val_folder, val_index, eval_tf, bad[id(val_folder)]) if len(val_index) else None
    test = split(test_folder, test_index, eval_tf, bad[id(test_folder)])
    return Data(info, train, val, test, None)


def _image_folder(directory, title, how):
    """torchvision's ImageFolder of `directory`; DatasetError in one line when it holds no class folder of images."""
    try:
        return torchvision.datasets.ImageFolder(str(directory))
    except FileNotFoundError as error:  # a class folder without images, or no class folders at all
        raise DatasetError(f"{title} in {directory}: {' '.join(str(error).split())}; {how}") from None


def _folder_splits(name, root, val_size, split_seed, folder_split):
    """({"train": (ImageFolder, indices), "val": ... or absent, "test": ...}, the start-up words saying which
    folder or fraction plays which role); DatasetError naming what was found and what is expected."""
    title = _SPECS[name].title
    found = {d: (root / d).is_dir() for d in ("train", "val", "test")}
    if name == "imagenet":
        how = "download ILSVRC-2012 from https://image-net.org, sort val/ into class folders, point --data-dir at it"
        if not (found["train"] and found["val"]):
            raise DatasetError(f"{title} not found: {root} should hold train/ and val/ of class folders; {how}, "
                               f"or use --dataset fake for synthetic data")
        train, test = _image_folder(root / "train", title, how), _image_folder(root / "val", title, how)
        train_index, val_index = _hold_out(title, len(train), val_size, split_seed)
        return ({"train": (train, train_index.numpy()), "val": (train, val_index.numpy()), "test": (test, np.arange(len(test)))},
                f"{root}: train/ (training{f', {val_size} held out for validation' if val_size else ''}), "
                f"val/ (test: ImageNet's validation set, the usual test set)")
    how = "sort the class folders into train/, val/ (optional) and test/, or keep them in one folder and split them with --folder-split TRAIN VAL TEST (fractions)"
    if folder_split is not None:
        if found["train"] or found["test"]:
            raise DatasetError(f"--folder-split splits a plain tree of class folders, but {root} holds "
                               f"{' and '.join(d + '/' for d in ('train', 'val', 'test') if found[d])}: drop --folder-split "
                               f"to use those folders")
        folder = _image_folder(root, title, how)
        indices = _stratified_split(title, np.array([label for _, label in folder.samples]), folder.classes, folder_split,
                                    split_seed)
        fractions = "/".join(f"{100 * f:g}" for f in folder_split)
        return ({role: (folder, index) for role, index in zip(("train", "val", "test"), indices) if role != "val" or len(index)},
                f"{root} split {fractions} % into training/validation/test, within each class (split seed {split_seed})")
    if not found["train"]:
        what = ("nothing (it does not exist)" if not root.is_dir() else
                "class folders but no train/ or test/" if any(p.is_dir() for p in root.iterdir()) else "no class folders")
        raise DatasetError(f"{title}: {root} holds {what}; {how}, or use --dataset fake for synthetic data")
    if not found["test"]:
        also = " and val/" if found["val"] else ""
        raise DatasetError(f"{title}: {root} holds train/{also} but no test/: the test set needs a folder of its own "
                           f"({'val/ is the validation set; ' if found['val'] else ''}{how})")
    if found["val"] and val_size:
        raise DatasetError(f"{title}: {root} holds val/, the validation set; --val-size {val_size} would hold out another "
                           f"from train/: give --val-size 0, or remove val/")
    train, test = _image_folder(root / "train", title, how), _image_folder(root / "test", title, how)
    if found["val"]:
        val = _image_folder(root / "val", title, how)
        return ({"train": (train, np.arange(len(train))), "val": (val, np.arange(len(val))), "test": (test, np.arange(len(test)))},
                f"{root}: train/ (training), val/ (validation), test/ (test)")
    train_index, val_index = _hold_out(title, len(train), val_size, split_seed)
    held = f", {val_size} held out for validation" if val_size else ", no validation split"
    return ({"train": (train, train_index.numpy()), "val": (train, val_index.numpy()), "test": (test, np.arange(len(test)))},
            f"{root}: train/ (training{held}), test/ (test)")


def _stratified_split(title, labels, classes, fractions, seed):
    """Indices of each fraction of `labels` (train, val, test), within each class: a seeded permutation of the
    class's images cut by its largest-remainder share of each fraction; DatasetError for a class too small to
    give every non-empty fraction an image."""
    if len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or not fractions[0] or not fractions[2]:
        raise DatasetError(f"--folder-split takes three fractions TRAIN VAL TEST that add up to 1, TRAIN and TEST above 0 "
                           f"(e.g. 0.8 0.1 0.1), got {' '.join(map(str, fractions))}")
    generator = torch.Generator().manual_seed(mix_seed(seed, SPLIT_STREAM))
    parts = [[], [], []]
    for c, name in enumerate(classes):
        members = np.flatnonzero(labels == c)
        order = members[torch.randperm(len(members), generator=generator).numpy()]
        counts = _largest_remainder(len(members), fractions)
        if any(count == 0 and fraction > 0 for count, fraction in zip(counts, fractions)):
            raise DatasetError(f"{title}: class {name} has {len(members)} images, too few to put one in each part of "
                               f"--folder-split {' '.join(map(str, fractions))}")
        edges = np.cumsum([0, *counts])
        for part, start, stop in zip(parts, edges[:-1], edges[1:]):
            part.extend(order[start:stop].tolist())
    return [np.sort(np.array(part, dtype=np.int64)) for part in parts]


def _largest_remainder(total, fractions):
    """Integer shares of `total` proportional to `fractions` that add up to `total` (the largest remainders round up)."""
    exact = [total * f for f in fractions]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


def subset(labels, size, classes, *, stratified, seed, flag="--train-subset", split="training"):
    """Indices of a training subset of `size` images out of `labels` and what it is in words. stratified=False:
    the first `size` (for sources whose order mixes the classes: CIFAR, MNIST-likes, SVHN, fake); True: per class
    its largest-remainder share, from a seeded permutation of its images (for image folders, ordered by class).
    DatasetError for a subset without an image of some class."""
    if stratified:
        generator = torch.Generator().manual_seed(mix_seed(seed, SUBSET_STREAM))
        counts = _largest_remainder(size, np.bincount(labels, minlength=len(classes)) / len(labels))
        chosen = [np.flatnonzero(labels == c)[torch.randperm(int((labels == c).sum()), generator=generator).numpy()[:count]]
                  for c, count in enumerate(counts)]
        index = np.sort(np.concatenate(chosen))
        rule = f"each class its share from a seeded permutation (split seed {seed})"
    else:
        index, rule = np.arange(size), f"the first of the {split} split"
    per_class = np.bincount(labels[index], minlength=len(classes))
    missing = [name for name, count in zip(classes, per_class) if count == 0]
    if missing:
        raise DatasetError(f"{flag} {size} has no image of class {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} ({rule}); a subset must hold every class: give a larger N")
    counts = " / ".join(str(int(count)) for count in per_class)
    return index, f"train subset: {size} images, {rule}; per class {counts}"


# What PIL raises for a truncated file or one that is not an image (UnidentifiedImageError is an
# OSError; some decoders raise SyntaxError, ValueError or EOFError on broken data).
_BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# As in timm's ImageDataset: this many unreadable files in a row mean a broken tree, not a bad file.
_MAX_BAD_IN_A_ROW = 50


class _FolderSplit(Dataset):
    """(transformed image, label) for the images `indices` of an ImageFolder (train and val share one scan).

    One unreadable file (truncated, or not an image) among ImageNet's 1.3 million should not end a
    multi-day run mid-epoch. With skip_bad_images its place goes to the next readable image of the
    split, as in timm's ImageDataset, so batches keep their size and every process of a data-parallel
    run its step count; each such file is named in one warning with the count so far (`bad` flags
    the folder's files in shared memory, since DataLoader workers are separate processes).
    Without it, the first one is a DatasetError naming the file.
    """

    def __init__(self, folder, indices, transform, bad, *, skip_bad_images):
        self.folder, self.indices, self.transform, self.bad = folder, indices, transform, bad
        self.skip_bad_images = skip_bad_images

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        for attempt in range(min(len(self.indices), _MAX_BAD_IN_A_ROW)):
            index = int(self.indices[(position + attempt) % len(self.indices)])
            path, label = self.folder.samples[index]
            try:
                image = self.folder.loader(path)
            except _BAD_IMAGE_ERRORS as error:
                self._skip(index, path, error)
                continue
            return self.transform(image), label
        raise DatasetError(f"{attempt + 1} image files in a row are unreadable in {self.folder.root} (the last is {path}); "
                           "check that the data set was copied completely")

    def _skip(self, index, path, error):
        """Raise, or warn the first time (in any process) that the file at `index` is found unreadable."""
        why = "not an image file" if isinstance(error, UnidentifiedImageError) else " ".join(str(error).split())[:120]
        if not self.skip_bad_images:
            raise DatasetError(f"unreadable image {path} ({why or type(error).__name__}); remove or replace it "
                               "(or drop --no-skip-bad-images: such files are then skipped with a warning)")
        if self.bad[index]:
            return
        self.bad[index] = 1
        print(f"warning: skipped unreadable image {path} ({why or type(error).__name__}), the next image takes its "
              f"place; {int(self.bad.sum())} unreadable in {self.folder.root} so far", file=sys.stderr, flush=True)
