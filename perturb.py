"""Stochastic perturbation ("mutation") of one network's batch: Shi et al. 2025, section 3.2.

Every `--perturb-every` steps one network, drawn at random, trains on a perturbed copy of the batch.
The operations act in [0,1] pixel space (the authors jittered and clamped normalised tensors, which
destroyed half the signal), run batched on the batch's device, and take all their randomness from a
seeded torch.Generator so that a run, and a resumed run, is reproducible.
"""
import contextlib
import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

PERTURBATIONS = ("mixup", "gaussian_noise", "color_jitter_blur", "hflip", "vflip", "rotation")

# Values of the authors' code (section 3.2).
NOISE_STD = 0.25                  # in [0,1] pixel units: the authors' N(0, 1) on CIFAR-normalised images (std ~0.25)
BRIGHTNESS = (0.75, 1.25)         # ColorJitter(brightness=0.25)
CONTRAST = (0.85, 1.15)           # ColorJitter(contrast=0.15)
SATURATION = (0.85, 1.15)         # ColorJitter(saturation=0.15)
HUE = (-0.15, 0.15)               # ColorJitter(hue=0.15)
BLUR_KERNEL = (7, 9)              # GaussianBlur(kernel_size=(7, 9)): (width, height) in torchvision
BLUR_SIGMA = (0.1, 2.0)
MAX_ROTATION = 30.0               # degrees, either way

# Both host generators are mt19937; different seeds keep their streams unrelated.
_PARAM_SEED_OFFSET = 2 * 0x5EED


def _check_op(op):
    if op not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {op!r}; choose from {', '.join(PERTURBATIONS)}")


def _uniform(generator, ranges):
    """One uniform draw per (low, high) pair, returned as Python floats (torchvision takes floats)."""
    u = torch.rand(len(ranges), generator=generator, device=generator.device).tolist()
    return [low + (high - low) * x for (low, high), x in zip(ranges, u)]


def add_perturbation_flags(add, *, every, every_help):
    """The perturbation flags of the group scripts (`add`: an argument group's add_argument)."""
    add("--perturb-every", type=int, default=every, valid=(lambda v: v >= 0, ">= 0 (0 disables perturbation)"), help=every_help)
    add("--perturbations", nargs="+", default=list(PERTURBATIONS), choices=PERTURBATIONS,
        help="operations drawn uniformly for the perturbed network")
    add("--update-bn-on-perturbed", action="store_true",
        help="let a perturbed batch update its network's BatchNorm running statistics, as the authors' code did "
             "(default: they skip it, so evaluations normalise with statistics of clean data only)")


@contextlib.contextmanager
def bn_statistics_kept(net):
    """Run the block without changing `net`'s normalisation running statistics (None: no network):
    BatchNorm's, and those of any norm that keeps them (InstanceNorm with track_running_stats, which
    tv:/timm: networks can contain; both derive from torch's _NormBase).

    A perturbed batch is a deliberate outlier: it should move the perturbed network's weights,
    not the statistics that every later evaluation normalises with. The buffers are restored in
    place, so a captured CUDA graph and a compiled or DDP-wrapped network keep their addresses.
    """
    buffers = [] if net is None else [
        buffer for module in net.modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats
        and module.running_mean is not None
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)]
    saved = [buffer.clone() for buffer in buffers]
    yield
    if buffers and hasattr(torch, "_foreach_copy_"):  # one call (fused launches on a GPU) for every buffer
        torch._foreach_copy_(buffers, saved)
    else:
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


@functools.lru_cache(maxsize=32)
def _constants(mean, std, device, dtype):
    """mean and std as (C, 1, 1) tensors on `device`: built once, since a tensor made from Python
    numbers on a GPU is a blocking host-to-device copy."""
    return (torch.tensor(mean, dtype=dtype, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=dtype, device=device).view(-1, 1, 1))


@functools.lru_cache(maxsize=32)
def _rotation_basis(height, width, device, dtype):
    """A (2, 2, 3) tensor [B0, B1] with cos(a) B0 + sin(a) B1 = F.affine_grid's theta of a rotation by
    `a` about the image centre (normalised coordinates, align_corners=False; the h/w factors undo
    the different normalisation of x and y on a non-square image)."""
    return torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                         [[0.0, -height / width, 0.0], [width / height, 0.0, 0.0]]], dtype=dtype, device=device)


@contextlib.contextmanager
def exact_matmul():
    """TF32 matrix products off for the block (utils.setup_runtime turns them on for CUDA): F.affine_grid
    builds a rotation's sampling grid with a matrix product, and at TF32's 10-bit mantissa nearest sampling
    can read other pixels than a CPU run does, which would break the promise that a GPU run perturbs as a
    CPU one. A no-op on the CPU, which has no TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _rotate(x, degrees, fill):
    """Rotate a float batch counter-clockwise by `degrees`, nearest sampling (the authors'
    RandomRotation's default), filling uncovered pixels with `fill`.

    torchvision's rotate(x, degrees, NEAREST, fill=...) but for float rounding at exact ties of the
    sampling grid: uncovered pixels are found through a sampled mask channel, as torchvision does;
    the affine matrix is built on the device from cached constants, where torchvision makes three
    small tensors from Python numbers (three blocking host-to-device copies on a GPU).
    """
    batch, channels, height, width = x.shape
    basis = _rotation_basis(height, width, x.device, x.dtype)
    angle = math.radians(degrees)
    theta = (basis[0] * math.cos(angle) + basis[1] * math.sin(angle)).expand(batch, 2, 3)
    with exact_matmul():
        grid = F.affine_grid(theta, [batch, channels + 1, height, width], align_corners=False)
    with_mask = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    sampled = F.grid_sample(with_mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    rotated, mask = sampled[:, :channels], sampled[:, channels:]
    return (rotated - fill) * mask + fill


def _color_jitter_blur(x, param_generator):
    """ColorJitter(0.25, 0.15, 0.15, 0.15) then GaussianBlur((7, 9), (0.1, 2.0)) on a [0,1] float batch,
    one draw of the factors for the whole batch."""
    brightness, contrast, saturation, hue, sigma = _uniform(
        param_generator, (BRIGHTNESS, CONTRAST, SATURATION, HUE, BLUR_SIGMA))
    x = TF.adjust_brightness(x, brightness)
    x = TF.adjust_contrast(x, contrast)
    if x.shape[-3] == 3:  # saturation and hue do not exist for grey images
        x = TF.adjust_saturation(x, saturation)
        x = TF.adjust_hue(x, hue)
    # A kernel wider than 2*size-1 cannot be reflect-padded; only tiny test images need this.
    height, width = x.shape[-2:]
    kernel = [min(BLUR_KERNEL[0], 2 * width - 1), min(BLUR_KERNEL[1], 2 * height - 1)]
    return TF.gaussian_blur(x, kernel, [sigma, sigma])


def _drawn(make, size, *, generator, device, **kwargs):
    """make(size, ...) drawn by `generator` on its own device, then moved to `device`. From the CPU to a
    GPU the values are drawn into pinned memory and copied without waiting (no host synchronisation),
    so a CPU generator gives the same values whatever device the batch is on."""
    pinned = generator.device.type == "cpu" and device.type == "cuda"
    values = make(size, generator=generator, device=generator.device, pin_memory=pinned, **kwargs)
    return values.to(device, non_blocking=True)


def perturb(images, labels, op, *, mean, std, generator, param_generator=None):
    """Apply perturbation `op` to a normalised batch; return (images, labels_perm, lam).

    generator draws the per-pixel randomness: noise, the mixup weight and partner permutation,
    on its own device (a CPU generator's values are moved to the images' device, so they do not
    depend on it). param_generator (default: generator) draws the few scalars torchvision takes as
    Python floats (jitter factors, blur sigma, rotation angle); a CPU generator there keeps a GPU
    step free of host synchronisation.
    """
    param_generator = generator if param_generator is None else param_generator
    _check_op(op)
    if not images.is_floating_point():
        raise ValueError(f"perturb expects normalised float images, got dtype {images.dtype}")
    device, channels = images.device, images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries but the images have {channels} channels")
    lam = torch.ones((), dtype=torch.float32, device=device)

    # Flips commute with per-channel normalisation: flip the normalised batch, exactly.
    if op == "hflip":
        return TF.horizontal_flip(images), labels, lam
    if op == "vflip":
        return TF.vertical_flip(images), labels, lam

    # torchvision's colour and geometry kernels want float32; half precision would also round
    # the noise and the mixing weights.
    work_dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    mean_t, std_t = _constants(tuple(map(float, mean)), tuple(map(float, std)), device, work_dtype)
    x = images.to(work_dtype) * std_t + mean_t

    if op == "mixup":
        # lam ~ Beta(1, 1) = U(0, 1); one lam and one partner permutation for the whole batch.
        lam = _drawn(torch.rand, (), generator=generator, device=device, dtype=torch.float32)
        perm = _drawn(torch.randperm, images.shape[0], generator=generator, device=device)
        lam_w = lam.to(work_dtype)
        x = lam_w * x + (1 - lam_w) * x[perm]
        labels = labels[perm]
    elif op == "gaussian_noise":
        x = x + NOISE_STD * _drawn(torch.randn, x.shape, generator=generator, device=device, dtype=work_dtype)
    elif op == "color_jitter_blur":
        x = _color_jitter_blur(x, param_generator)
    elif op == "rotation":
        (angle,) = _uniform(param_generator, [(-MAX_ROTATION, MAX_ROTATION)])
        # Corners that rotate in from outside get the dataset's mean colour, i.e. 0 once normalised.
        x = _rotate(x, angle, fill=mean_t)

    x = ((x.clamp(0, 1) - mean_t) / std_t).to(images.dtype)
    return x, labels, lam


class PerturbedBatch(NamedTuple):
    """One step's inputs for a group: inputs[i] is network i's batch (the perturbed network's
    differs), lams (num_nets,) on the device the mixup weight of each network's loss (1 for a clean
    batch), labels_perm the mixup partners' labels (the labels themselves otherwise), net the
    perturbed network's index (a host int; -1 when the step is clean)."""
    inputs: list
    labels_perm: torch.Tensor
    lams: torch.Tensor
    net: int


class Perturber:
    """Choose the perturbed step and network and perturb that network's batch (section 3.2).

    At the run's global steps `step` (counted over the whole run, not within the epoch) with
    `step % every == 0`, one network index is drawn uniformly from range(num_nets) and one
    operation uniformly from `ops`; on every other step, and always when `every == 0`, nothing is
    perturbed and the network index is -1. One step in `every` is perturbed whatever the epoch's
    length (the authors counted within the epoch, the same rate only for long epochs).

    The randomness, all derived from `seed`:
    - a host (CPU) generator draws the network and the operation. Those draws never depend on
      tensor values and cost no device synchronisation, and with the same seed every data-parallel
      rank perturbs the same network with the same operation;
    - a second host generator draws the operation's scalar parameters (jitter factors, blur
      sigma, angle), which torchvision takes as Python floats: no device read-back for them, and
      the same values on every rank;
    - a third host generator supplies the per-pixel randomness (mixup lambda and permutation,
      noise), whose values are moved to the batch's device (on a GPU from pinned memory, without
      waiting); a generator on the GPU would draw other values than a CPU run's. It is reseeded at
      every perturbed step from (seed, rank, perturbed-step count), so each data-parallel rank draws
      its own noise fields and mixup partners for its own shard, as independent augmentation per
      process requires, while the state to save stays the same on every rank.
    `rank` defaults to this process's rank in the default process group (0 without one); `device`,
    the batches' device, changes none of the values drawn.
    `state_dict()` holds the two host generator states, the seed and the step count, so a resumed run
    continues exactly, on the same device or another one: every draw is a CPU generator's.

    Calling it returns a PerturbedBatch: network i trains on inputs[i] with the loss
    losses.mixed_cross_entropy(logits_i, labels, labels_perm, lams[i]), which is plain CE unless
    network i got a mixup batch. Unperturbed steps return the batch itself for every network.
    """

    def __init__(self, *, every, ops, num_nets, seed, mean, std, device, rank=None):
        if every < 0:
            raise ValueError(f"--perturb-every must be >= 0 (0 disables perturbation), got {every}")
        if num_nets < 1:
            raise ValueError(f"perturbation needs at least one network, got {num_nets}")
        ops = tuple(ops)
        for op in ops:
            _check_op(op)
        if every > 0 and not ops:
            raise ValueError("--perturbations is empty; name at least one operation or use --perturb-every 0")
        self.every, self.ops, self.num_nets = every, ops, num_nets
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = rank
        self.perturbed_steps = 0
        self.host_generator = torch.Generator().manual_seed(seed)
        self.param_generator = torch.Generator().manual_seed(seed + _PARAM_SEED_OFFSET)
        # CPU (mt19937) whatever `device` is, as in a CPU run: the same noise on any device, so a run
        # resumed on another device type continues the same perturbations.
        self.pixel_generator = torch.Generator()

    def choose(self, step):
        """Return (net, op) to perturb at `step`, or (-1, None) when this step is not perturbed."""
        if self.every == 0 or step % self.every != 0:
            return -1, None
        net = int(torch.randint(self.num_nets, (), generator=self.host_generator))
        op = self.ops[int(torch.randint(len(self.ops), (), generator=self.host_generator))]
        return net, op

    def _reseed_pixel_generator(self):
        """Seed the pixel generator for this perturbed step of this rank (a host-side call, no sync)."""
        # NumPy's SeedSequence turns (seed; rank, step) into well-mixed, independent seeds: the
        # spawn key is its way of keying child streams (numpy.random.SeedSequence, NEP 19).
        words = np.random.SeedSequence(self.seed % 2**64, spawn_key=(self.rank, self.perturbed_steps)
                                       ).generate_state(2, np.uint32)
        self.pixel_generator.manual_seed((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))
        self.perturbed_steps += 1

    def __call__(self, step, images, labels):
        """The group's inputs at step `step`: a PerturbedBatch (no host synchronisation). `images` is
        the batch, or a list of one view of it per network (--views independent)."""
        inputs = list(images) if isinstance(images, (list, tuple)) else [images] * self.num_nets
        net, op = self.choose(step)
        lams = torch.ones(self.num_nets, device=inputs[0].device)
        if op is None:
            return PerturbedBatch(inputs, labels, lams, -1)
        self._reseed_pixel_generator()
        inputs[net], labels_perm, lams[net] = perturb(inputs[net], labels, op, mean=self.mean, std=self.std,
                                                      generator=self.pixel_generator, param_generator=self.param_generator)
        return PerturbedBatch(inputs, labels_perm, lams, net)

    def state_dict(self):
        """The two host generator states (CPU uint8 tensors), and the seed and step count that key the
        pixel generator."""
        return {"host_generator": self.host_generator.get_state(),
                "param_generator": self.param_generator.get_state(),
                "seed": self.seed, "perturbed_steps": self.perturbed_steps}

    def load_state_dict(self, state):
        """Restore what state_dict() saved, whichever device wrote it."""
        # A checkpoint may have been loaded with map_location onto the device; set_state wants CPU.
        self.host_generator.set_state(state["host_generator"].cpu())
        self.param_generator.set_state(state["param_generator"].cpu())
        self.seed, self.perturbed_steps = int(state["seed"]), int(state["perturbed_steps"])
