"""Helpers shared by the test files that run the scripts: paths, subprocess environment, run outputs."""
import csv
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(**extra):
    """Environment of a subprocess that must not see any GPU (plus `extra` variables)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, **extra)


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
