"""Shared fixtures: seeding, the CPU backends to test, the `slow` marker."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `from tolerances import ...` from any test file

import tiedkernels  # noqa: E402
from _cpu_backends import BACKENDS_CPU  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large shapes (64-bit offsets); seconds to a minute each")
    if os.environ.get("TIEDKERNELS_TEST_NAN_EMPTY") == "1":
        # Every torch.empty / at::empty (the kernels' own allocations too) is filled with NaN (integers:
        # their maximum), so a result that reads memory nobody wrote fails instead of passing by luck.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it
    (TIEDKERNELS_TEST_SEED picks another one, to check that no result depends on the draw)."""
    torch.manual_seed(int(os.environ.get("TIEDKERNELS_TEST_SEED", "0")))
    yield


@pytest.fixture(params=BACKENDS_CPU)
def backend(request):
    return request.param


@pytest.fixture
def backends_cpu():
    return list(BACKENDS_CPU)


__all__ = ["BACKENDS_CPU", "tiedkernels"]
