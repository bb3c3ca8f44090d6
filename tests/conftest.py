"""Suite-wide fixtures."""
import os

import pytest
import torch

# Under pytest-xdist (`pytest -n auto`, the README's test command) each worker gets its share of the
# cores, as torch threads and as OMP_NUM_THREADS for the scripts it starts: more threads than cores
# make OpenMP's waiting threads spin against each other (a pair of ResNet-20s at batch 4 measured
# 70 times slower with 2 threads each beside 2 other busy processes on 2 cores than with 1).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def restore_determinism():
    """A script run in-process with --deterministic switches torch to deterministic kernels for the
    whole process; switch back after each test so later tests run as they would alone."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]
