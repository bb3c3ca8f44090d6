"""The loaders that feed a built dataset (datasets/sources.py) to the training loop.

`make_loaders(data, ...)` turns a `Data` into three loaders, by one of two paths:
- "torch": a torch.utils.data.DataLoader over PIL-based torchvision transforms, i.e. the authors'
  pipeline; it is the reference the fast path is checked against.
- "gpu": the whole uint8 split lives on the device and a batch is cut, cropped, flipped, resized,
  rotated and normalised by a handful of batched tensor ops (as in KellerJordan/cifar10-airbench). Same
  augmentation distribution as the torch path, without worker processes or host round trips.
Both paths are a pure function of (seed, epoch), whatever the device (every draw is a CPU generator's):
`loader.set_epoch(epoch)` before iterating makes an epoch's order and augmentation reproducible, which
is what exact resume needs. The torch path also runs the transformer recipe's per-image augmentations
(datasets/augment.py) and DeiT's repeated augmentation, which the gpu path does not do."""
import math
import random
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from perturb import exact_matmul

from .augment import uses_host_random
from .sources import AUGMENT_STREAM, ORDER_STREAM, WORKERS_STREAM, DatasetError, mix_seed


# ----------------------------------------------------------------------------------------------
# One epoch's indices, shared by both paths
# ----------------------------------------------------------------------------------------------
def _epoch_indices(size, *, shuffle, seed, epoch, rank, world_size):
    """This rank's dataset indices for one epoch (CPU int64); the same for both loader paths."""
    if not shuffle:
        return torch.arange(rank, size, world_size)  # eval: strided, disjoint, every sample exactly once
    order = _epoch_order(size, seed, epoch)
    usable = size - size % world_size  # equal counts per rank keep data-parallel steps in lockstep
    return order[rank:usable:world_size]


def _epoch_order(size, seed, epoch):
    """The epoch's shuffled order of all dataset indices (CPU int64)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, ORDER_STREAM)))


# DeiT rounds an epoch of repeated augmentation down to a multiple of 256 images (samplers.py).
REPEATED_EPOCH_ROUND = 256


def repeated_epoch_length(size, world_size):
    """Images per rank and epoch with repeated augmentation: DeiT's floor(N // 256 * 256 / world_size), so all
    ranks together take about the data set's size, not `repeats` times it. A set under 256 images, which
    that rounding would leave empty, keeps floor(N / world_size) (timm's RepeatAugSampler without rounding)."""
    multiple = REPEATED_EPOCH_ROUND if size >= REPEATED_EPOCH_ROUND else 1
    return size // multiple * multiple // world_size


def _repeated_epoch_indices(size, *, repeats, seed, epoch, rank, world_size):
    """This rank's (dataset indices, copy numbers) for one epoch of repeated augmentation (Hoffer et al.
    2020; Berman et al. 2019), as DeiT's RASampler draws them (github.com/facebookresearch/deit samplers.py).

    The epoch's shuffled order with each index written `repeats` times in a row is dealt to the ranks
    like cards: rank r takes positions r, r + world_size, r + 2 world_size, ..., and only its first
    repeated_epoch_length() of them. So the copies of an index go to consecutive positions (different
    ranks when world_size >= repeats, the same batch in one process), and each index that is drawn is
    drawn `repeats` times in all, except perhaps the last one, cut at the epoch's end. Copy c of an index
    is its c-th occurrence, which seeds its own augmentation (_EpochSampler). DeiT pads the repeated
    sequence with its beginning to a multiple of world_size; the epoch never reaches that padding.
    """
    positions = torch.arange(rank, repeated_epoch_length(size, world_size) * world_size, world_size)
    return _epoch_order(size, seed, epoch)[positions // repeats], positions % repeats


# ----------------------------------------------------------------------------------------------
# The torch path: a DataLoader over the PIL-transform Datasets
# ----------------------------------------------------------------------------------------------
def _view_seed(seed, epoch, view, copy=0):
    """The seed of view `view`'s augmentation draws in `epoch`: view 0 is the single view's stream. Copy
    `copy` > 0 of a repeated index (repeated augmentation) has a stream of its own."""
    if copy:
        return mix_seed(seed, epoch, AUGMENT_STREAM, view, copy)
    return mix_seed(seed, epoch, AUGMENT_STREAM) if view == 0 else mix_seed(seed, epoch, AUGMENT_STREAM, view)


class _EpochSampler(Sampler):
    """Indices from _epoch_indices (with repeats > 1 and shuffle, _repeated_epoch_indices); with item_seeds,
    (index, seed) pairs that seed each item's augmentation ((index, (seed of view 0, seed of view 1, ...))
    with several views)."""

    def __init__(self, size, *, shuffle, seed, rank, world_size, item_seeds, views=1, repeats=1):
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.item_seeds, self.views, self.repeats = item_seeds, views, repeats
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch whose indices (and item seeds) the next iteration yields."""
        self.epoch = epoch

    @property
    def repeated(self):
        """True when the epoch is one of repeated augmentation."""
        return self.shuffle and self.repeats > 1

    def __len__(self):
        if self.repeated:
            return repeated_epoch_length(self.size, self.world_size)
        if self.shuffle:
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        where = dict(seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        if self.repeated:
            indices, copies = _repeated_epoch_indices(self.size, repeats=self.repeats, **where)
        else:
            indices = _epoch_indices(self.size, shuffle=self.shuffle, **where)
            copies = torch.zeros_like(indices)
        if not self.item_seeds:
            return iter(indices.tolist())
        # Drawn for the whole dataset and looked up by index (and copy): sample i's augmentation in an
        # epoch does not depend on the rank count, the worker count or which worker fetches it.
        seeds = []
        for view in range(self.views):
            tables = torch.stack([torch.randint(2**62, (self.size,), generator=torch.Generator().manual_seed(
                _view_seed(self.seed, self.epoch, view, copy))) for copy in range(self.repeats if self.repeated else 1)])
            seeds.append(tables[copies, indices].tolist())
        return iter(zip(indices.tolist(), seeds[0] if self.views == 1 else zip(*seeds), strict=True))


class _SeededItems(Dataset):
    """Fetches dataset[index] for an (index, seed) key with the torch RNG seeded by `seed`, then restored;
    with host_random, Python's random module and NumPy's global generator too (timm's RandAugment)."""

    def __init__(self, dataset, host_random=False):
        self.dataset, self.host_random = dataset, host_random

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if isinstance(seed, tuple):  # several views: one augmented copy per seed, one label
            views = [self._fetch(index, view_seed) for view_seed in seed]
            return tuple(image for image, _ in views), views[0][1]
        return self._fetch(index, seed)

    def _fetch(self, index, seed):
        # torchvision's random transforms draw from the global CPU generator. Seeding it per item makes
        # augmentation independent of workers and of the training loop's own RNG use; restoring it keeps
        # the main process's stream untouched when workers=0. (torch.manual_seed would also reseed CUDA
        # and is ~100x slower.)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        if self.host_random:
            host_state = random.getstate(), np.random.get_state()
            random.seed(seed)
            np.random.seed(seed % 2**32)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)
            if self.host_random:
                random.setstate(host_state[0])
                np.random.set_state(host_state[1])


# The TorchLoaders alive in this process, so that a run's end can stop their workers (close_workers).
_LOADERS = weakref.WeakSet()


def close_workers():
    """Stop the worker processes of every TorchLoader of this process now, at a run's end. Left to the
    garbage collector, an iterator in a reference cycle with its queues can lose its stop message to a
    queue's finalizer and then waits 5 s (torch's MP_STATUS_CHECK_INTERVAL) for each worker."""
    for loader in list(_LOADERS):
        iterator = getattr(loader.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader.loader._iterator = None


class TorchLoader:
    """A DataLoader over the PIL-transform Datasets (the reference pipeline), reproducible per (seed, epoch).
    With views > 1 (training only) a batch's images are a list: `views` independently augmented copies.
    With repeats > 1 (training only) an epoch is one of DeiT's repeated augmentation (_repeated_epoch_indices);
    host_random seeds Python's and NumPy's generators per image too (transforms that draw from them)."""

    def __init__(self, dataset, *, batch_size, train, drop_last, device, workers, seed, rank, world_size, views=1,
                 repeats=1, host_random=False):
        self.device, self.seed = device, seed
        self.sampler = _EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size,
                                     item_seeds=train, views=views, repeats=repeats)
        # The generator only sets the workers' base seed (our sampler does not use it); reseeded per
        # epoch anyway so that nothing in a worker depends on history.
        self.generator = torch.Generator()
        self.loader = DataLoader(_SeededItems(dataset, host_random) if train else dataset, batch_size=batch_size,
                                 sampler=self.sampler, num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0, drop_last=drop_last and train,
                                 generator=self.generator)
        self.set_epoch(0)
        _LOADERS.add(self)

    def set_epoch(self, epoch):
        """Fix this epoch's order and augmentation to a function of (seed, epoch)."""
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(mix_seed(self.seed, epoch, WORKERS_STREAM))

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        try:
            for images, labels in self.loader:
                images = ([view.to(self.device, non_blocking=True) for view in images] if isinstance(images, list)
                          else images.to(self.device, non_blocking=True))
                yield images, labels.to(self.device, non_blocking=True)
        except DatasetError as error:
            # Raised in a worker process, it is re-raised here with the worker's traceback in its
            # message, whose last line ends with the error's own one line.
            lines = str(error).strip().splitlines()
            if len(lines) > 1:
                raise DatasetError(lines[-1].split(": ", 1)[-1]) from None
            raise


# ----------------------------------------------------------------------------------------------
# The gpu path: the uint8 split on the device, batched crop, flip, resize, rotation and normalisation
# ----------------------------------------------------------------------------------------------
def _crop_flip(images, offsets, flips, pad):
    """Per-sample crop of the zero-padded batch at offsets (B, 2) in 0..2*pad, then optional per-sample h-flip."""
    batch, chans, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    padded_width = width + 2 * pad
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
    cols = torch.arange(width, device=images.device).expand(batch, width)
    if flips is not None:
        cols = torch.where(flips[:, None], width - 1 - cols, cols)  # flipping the crop = reading it backwards
    cols = cols + offsets[:, 1:]  # (B, W)
    # One gather over flattened pixels (2.5x faster on CPU than gathering rows, then columns).
    pixels = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    cropped = padded.flatten(2).gather(2, pixels.expand(batch, chans, height * width))
    return cropped.view(batch, chans, height, width)


def _rotate(images, angles):
    """Per-sample rotation of float (B, C, H, W) by `angles` degrees (counter-clockwise) about the image centre,
    nearest sampling, zeros outside: torchvision's rotate (v2.functional.rotate) for a batch."""
    batch, _, height, width = images.shape
    radians = torch.deg2rad(angles.float())
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    # affine_grid maps each output pixel to the input point it reads, in coordinates normalised to [-1, 1]
    # per axis (y pointing down): the inverse rotation, with the aspect ratio folded into the sine terms.
    theta = torch.stack([torch.stack([cos, -sin * height / width, zero], 1),
                         torch.stack([sin * width / height, cos, zero], 1)], 1)
    with exact_matmul():  # the grid in full float32, as on the CPU (TF32 could move a nearest sample)
        grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augmentation_draws(size, info, *, seed, epoch, view):
    """One view's augmentation for an epoch, one draw per dataset index (looked up by index, as on the
    torch path): (crop offsets, flips or None, angles or None), CPU tensors. Drawn by a CPU (mt19937)
    generator whatever the loader's device, as a CPU run draws them: a generator on a GPU would draw
    other values, and a run resumed on another device type would not continue the same augmentation.
    (Once per epoch and view: about 1 MB to copy to the device for 50,000 images.)"""
    pad = info.crop_padding
    generator = torch.Generator().manual_seed(_view_seed(seed, epoch, view))
    if pad:
        offsets = torch.randint(2 * pad + 1, (size, 2), generator=generator)
    else:  # --no-crop: the whole image (read in place, flipped or not)
        offsets = torch.zeros((size, 2), dtype=torch.long)
    flips = torch.rand(size, generator=generator) < 0.5 if info.hflip else None
    angles = None
    if info.rotate:  # uniform in [-rotate, rotate], as torchvision's RandomRotation draws it
        angles = torch.empty(size).uniform_(-info.rotate, info.rotate, generator=generator)
    return offsets, flips, angles


class GpuLoader:
    """Batches cut from a uint8 split held on `device`, augmented and normalised by batched tensor ops.
    With views > 1 (training only) a batch's images are a list: `views` independently augmented copies."""

    def __init__(self, images, labels, info, *, batch_size, train, drop_last, device, seed, rank, world_size, views=1):
        self.images, self.labels = images.to(device), labels.to(device)
        self.info, self.batch_size, self.train, self.device, self.seed = info, batch_size, train, device, seed
        self.drop_last, self.rank, self.world_size, self.views = drop_last and train, rank, world_size, views
        # Fold ToTensor's 1/255 into Normalize: x_norm = x * scale + shift.
        std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        self.scale = 1 / (255 * std)
        self.shift = -torch.tensor(info.mean, device=device).view(1, -1, 1, 1) / std
        self.epoch = 0

    def set_epoch(self, epoch):
        """Fix this epoch's order and augmentation to a function of (seed, epoch)."""
        self.epoch = epoch

    def _samples(self):
        """This rank's sample count per epoch (the torch path's sampler length)."""
        size = len(self.labels)
        return size // self.world_size if self.train else len(range(self.rank, size, self.world_size))

    def __len__(self):
        count = self._samples()
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def _draws(self, view):
        """One view's augmentation for the epoch on the device: augmentation_draws, moved there."""
        draws = augmentation_draws(len(self.labels), self.info, seed=self.seed, epoch=self.epoch, view=view)
        return tuple(None if draw is None else draw.to(self.device) for draw in draws)

    def _batch(self, batch, draws):
        """The images of dataset indices `batch`, augmented by `draws` (None: evaluation), normalised."""
        images, pad = self.images[batch], self.info.crop_padding
        offsets, flips, angles = draws if draws is not None else (None, None, None)
        if draws is not None and (pad or flips is not None):
            images = _crop_flip(images, offsets[batch], None if flips is None else flips[batch], pad)
        images = images.float()
        if self.info.img_size != self.info.native_size:
            size_out = (self.info.img_size, self.info.img_size)
            # antialias also when upsampling: there it is the same triangle filter as plain bilinear, but
            # computed as PIL computes it (the torch path's Resize on PIL images), and its values differ
            # from antialias=False's in the last bits (tests/test_datasets.py), so dropping it would
            # change every upsampled run's numbers.
            images = F.interpolate(images, size=size_out, mode="bilinear", align_corners=False, antialias=True)
        if angles is not None:  # after the resize (the torch path's order), before Normalize: fill 0 is black
            images = _rotate(images, angles[batch])
        return images.mul_(self.scale).add_(self.shift)

    def __iter__(self):
        indices = _epoch_indices(len(self.labels), shuffle=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                 world_size=self.world_size).to(self.device)
        draws = [self._draws(view) for view in range(self.views)] if self.train else [None]
        for batch_number in range(len(self)):
            batch = indices[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
            views = [self._batch(batch, view_draws) for view_draws in draws]
            yield views if len(views) > 1 else views[0], self.labels[batch]


# ----------------------------------------------------------------------------------------------
# Choosing a path
# ----------------------------------------------------------------------------------------------
def make_loaders(data, *, batch_size, eval_batch_size=None, loader="auto", device, workers=2, seed=0,
                 drop_last=True, rank=0, world_size=1, views=1, repeats=1):
    """(train, val, test) loaders of batches on `device` ("auto": gpu path when in memory and the gpu path
    can augment it); val None without a split. views > 1: each training batch holds `views` independently
    augmented copies of its images (a list). repeats > 1: DeiT's repeated augmentation (torch path only)."""
    device = torch.device(device)
    per_image = per_image_steps(data.info, repeats)
    if loader == "auto":
        loader = "gpu" if data.info.in_memory and not per_image else "torch"
    if loader not in ("gpu", "torch"):
        raise DatasetError(f"unknown loader {loader!r}; choose auto, gpu or torch")
    if loader == "gpu" and not data.info.in_memory:
        raise DatasetError(f"--loader gpu needs an in-memory dataset; {data.info.name} is read from image files: "
                           "use --loader torch")
    if loader == "gpu" and per_image:
        raise DatasetError(f"--loader gpu cannot apply {' and '.join(per_image)} (per-image steps of the torch "
                           "loader); use --loader torch")
    if not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is outside 0..{world_size - 1}")
    eval_batch_size = eval_batch_size or 2 * batch_size
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)

    def build(split, dataset, train):
        if dataset is None:
            return None
        size, count = (batch_size, views) if train else (eval_batch_size, 1)
        if loader == "gpu":
            images, labels = data.arrays[split]
            return GpuLoader(images, labels, data.info, batch_size=size, train=train, views=count, **common)
        return TorchLoader(dataset, batch_size=size, train=train, workers=workers, views=count,
                           repeats=repeats if train else 1, host_random=uses_host_random(data.info), **common)

    return build("train", data.train, True), build("val", data.val, False), build("test", data.test, False)


def per_image_steps(info, repeats=1):
    """The training steps of DataInfo `info` (and `repeats`) that only the torch path runs, in words."""
    return [name for name, wanted in (("RandAugment", info.rand_augment), ("random erasing", info.erase_prob),
                                      ("repeated augmentation", repeats > 1)) if wanted]
