"""Suite-wide fixtures."""
import pytest
import torch


@pytest.fixture(autouse=True)
def restore_determinism():
    """A script run in-process with --deterministic switches torch to deterministic kernels for the
    whole process; switch back after each test so later tests run as they would alone."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]
