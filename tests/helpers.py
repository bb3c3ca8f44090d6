"""Helpers shared by the test files: paths, subprocess environment, run outputs, data sets written
in their real on-disk formats."""
import contextlib
import csv
import gzip
import os
import signal
import struct
import types

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The devices of a test whose subject needs CUDA: its body runs on the CPU too, with the CUDA-only part
# switched off (a CUDA graph replaced by the same code run eagerly, a GPU batch by a CPU one), so a
# change that breaks it fails here and not first on a GPU; the CUDA run is marked `cuda` (what
# benchmarks/gpu_check.sh runs) and skipped without a GPU. A whole test is never skipped for want of CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA run of a test whose body also ran on the CPU")])]


def cpu_env(**extra):
    """Environment of a subprocess that must not see any GPU (plus `extra` variables)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, **extra)


def step_run(nets, optimizers, scaler, args, rt):
    """What a paradigm's step reads of its run (lifecycle.RunState): the networks, their optimizers, the
    gradient scaler, the flags and the runtime; for calling a step directly."""
    return types.SimpleNamespace(nets=nets, optimizers=optimizers, scaler=scaler, args=args, rt=rt)


def read_rows(run_dir):
    """metrics.csv of a run as dicts."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def weights(path):
    """The networks' state dicts in a checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True)["nets"]


def assert_same_weights(a, b):
    """Two lists of state dicts are identical, bit for bit."""
    assert len(a) == len(b)
    for state_a, state_b in zip(a, b):
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key


def write_idx(path, array, compress):
    """An IDX file: 0, 0, 0x08 (unsigned byte), ndim, big-endian sizes, then the bytes."""
    content = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)


def write_mnist_like(folder, train=30, test=10, compress=True, high=256):
    """The four MNIST-format files, pixels drawn from 0..high-1 (147: mean 0.286 like Fashion-MNIST's);
    returns the images and labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, high, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


def write_image_tree(root, splits, classes=("cat", "dog"), per_class=3):
    """root/<split>/<class>/<i>.png, images of assorted sizes (the loader must resize them); per_class images
    of each class, or {split: count}."""
    for split in splits:
        count = per_class[split] if isinstance(per_class, dict) else per_class
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((20 + 3 * i, 26, 3), 40 * (label + 1) + i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def write_broken_image_tree(root):
    """A two-class image folder whose train/ also holds a truncated PNG and a text file named .png;
    returns those two paths."""
    write_image_tree(root, ("train", "test"))
    png = (root / "train" / "cat" / "2.png").read_bytes()
    truncated, text = root / "train" / "cat" / "2_truncated.png", root / "train" / "dog" / "2_notes.png"
    truncated.write_bytes(png[: len(png) // 2])
    text.write_text("not an image")
    return truncated, text


@contextlib.contextmanager
def sigterm_after_step(calls):
    """Within the block, the training loop's stop check behaves as if SIGTERM arrived during training
    step number `calls` (counted over the whole invocation, from 1), so the run saves last.pt after
    that step and exits with 143: an exact mid-epoch interruption without timing a real signal."""
    import stopping
    count, requested = {"n": 0}, stopping.StopRequest.requested

    def checked(self, step=None):
        if step is not None:
            count["n"] += 1
            if count["n"] == calls:
                self.signal = signal.SIGTERM
        return requested(self, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stopping.StopRequest, "requested", checked)
        yield
