"""The loaders that feed a built dataset (datasets/sources.py) to the training loop.

`make_loaders(data, ...)` turns a `Data` into three loaders, by one of two paths:
- "torch": a torch.utils.data.DataLoader over PIL-based torchvision transforms, i.e. the authors'
  pipeline; it is the reference the fast path is checked against.
- "gpu": the whole uint8 split lives on the device and a batch is cut, cropped, flipped, resized,
  rotated and normalised by a handful of batched tensor ops (as in KellerJordan/cifar10-airbench). Same
  augmentation distribution as the torch path, without worker processes or host round trips.
Both paths are a pure function of (seed, epoch), whatever the device (every draw is a CPU generator's):
`loader.set_epoch(epoch)` before iterating makes an epoch's order and augmentation reproducible, which
is what exact resume needs."""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .sources import AUGMENT_STREAM, ORDER_STREAM, WORKERS_STREAM, DatasetError, mix_seed


# ----------------------------------------------------------------------------------------------
# One epoch's indices, shared by both paths
# ----------------------------------------------------------------------------------------------
def _epoch_indices(size, *, shuffle, seed, epoch, rank, world_size):
    """This rank's dataset indices for one epoch (CPU int64); the same for both loader paths."""
    if not shuffle:
        return torch.arange(rank, size, world_size)  # eval: strided, disjoint, every sample exactly once
    order = torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, ORDER_STREAM)))
    usable = size - size % world_size  # equal counts per rank keep data-parallel steps in lockstep
    return order[rank:usable:world_size]


# ----------------------------------------------------------------------------------------------
# The torch path: a DataLoader over the PIL-transform Datasets
# ----------------------------------------------------------------------------------------------
def _view_seed(seed, epoch, view):
    """The seed of view `view`'s augmentation draws in `epoch`: view 0 is the single view's stream."""
    return mix_seed(seed, epoch, AUGMENT_STREAM) if view == 0 else mix_seed(seed, epoch, AUGMENT_STREAM, view)


class _EpochSampler(Sampler):
    """Indices from _epoch_indices; with item_seeds, (index, seed) pairs that seed each item's augmentation
    ((index, (seed of view 0, seed of view 1, ...)) with several views)."""

    def __init__(self, size, *, shuffle, seed, rank, world_size, item_seeds, views=1):
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.item_seeds, self.views = item_seeds, views
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch whose indices (and item seeds) the next iteration yields."""
        self.epoch = epoch

    def __len__(self):
        if self.shuffle:
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        indices = _epoch_indices(self.size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                 rank=self.rank, world_size=self.world_size)
        if not self.item_seeds:
            return iter(indices.tolist())
        # Drawn for the whole dataset and looked up by index: sample i's augmentation in an epoch does
        # not depend on the rank count, the worker count or which worker fetches it.
        seeds = [torch.randint(2**62, (self.size,), generator=torch.Generator().manual_seed(
            _view_seed(self.seed, self.epoch, view)))[indices].tolist() for view in range(self.views)]
        return iter(zip(indices.tolist(), seeds[0] if self.views == 1 else zip(*seeds), strict=True))


class _SeededItems(Dataset):
    """Fetches dataset[index] for an (index, seed) key with the torch RNG seeded by `seed`, then restored."""

    def __init__(self, dataset):
        self.dataset = dataset

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
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class TorchLoader:
    """A DataLoader over the PIL-transform Datasets (the reference pipeline), reproducible per (seed, epoch).
    With views > 1 (training only) a batch's images are a list: `views` independently augmented copies."""

    def __init__(self, dataset, *, batch_size, train, drop_last, device, workers, seed, rank, world_size, views=1):
        self.device, self.seed = device, seed
        self.sampler = _EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size,
                                     item_seeds=train, views=views)
        # The generator only sets the workers' base seed (our sampler does not use it); reseeded per
        # epoch anyway so that nothing in a worker depends on history.
        self.generator = torch.Generator()
        self.loader = DataLoader(_SeededItems(dataset) if train else dataset, batch_size=batch_size,
                                 sampler=self.sampler, num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0, drop_last=drop_last and train,
                                 generator=self.generator)
        self.set_epoch(0)

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
                 drop_last=True, rank=0, world_size=1, views=1):
    """(train, val, test) loaders of batches on `device` ("auto": gpu path when in memory); val None without a split.
    views > 1: each training batch holds `views` independently augmented copies of its images (a list)."""
    device = torch.device(device)
    if loader == "auto":
        loader = "gpu" if data.info.in_memory else "torch"
    if loader not in ("gpu", "torch"):
        raise DatasetError(f"unknown loader {loader!r}; choose auto, gpu or torch")
    if loader == "gpu" and not data.info.in_memory:
        raise DatasetError(f"--loader gpu needs an in-memory dataset; {data.info.name} is read from image files: "
                           "use --loader torch")
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
        return TorchLoader(dataset, batch_size=size, train=train, workers=workers, views=count, **common)

    return build("train", data.train, True), build("val", data.val, False), build("test", data.test, False)
