"""Shared fixtures: every test runs on the CPU, and on CUDA when a GPU is
visible (tests of an op with no CUDA kernel yet skip there, saying so)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import qsvd_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Fuzz budget: QSVD_FUZZ_EXAMPLES overrides (CI keeps the default).
settings.register_profile(
    "qsvd",
    max_examples=int(os.environ.get("QSVD_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("qsvd")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def require_kernel(op: str, device: str) -> None:
    """Skip (with the reason) when op has no kernel for device yet."""
    if not qsvd_kernels.has_kernel(op, device):
        pytest.skip(f"qsvd.{op} has no {device} kernel in this build")
