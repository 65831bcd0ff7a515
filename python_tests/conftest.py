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


# The CPU kernels' ISA levels, best first (qsvd/cpu/isa.h).
ISA_LEVELS = ["avx512", "avx2", "baseline"]


def isa_levels_to_test() -> list:
    """The ISA levels this CPU supports, best first, capped by QSVD_CPU_ISA
    when it is set (CI's forced-fallback pass sets avx2: then that pass
    tests avx2 and baseline)."""
    paths = qsvd_kernels._C.cpu_paths()
    forced = paths["knobs"]["QSVD_CPU_ISA"]
    top = ISA_LEVELS.index(forced) if forced in ISA_LEVELS else 0
    return [lvl for lvl in ISA_LEVELS[top:] if lvl in paths["isa_supported"]]


@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    """Runs the test with the CPU kernels at one ISA level (every level this
    CPU supports; the element-wise loops are compiled for each and must give
    the same bits), restoring the level afterwards. On CUDA the level changes
    nothing the test measures, so the test runs once there."""
    level = request.param
    paths = qsvd_kernels._C.cpu_paths()
    if level not in paths["isa_supported"]:
        pytest.skip(f"this CPU lacks the {level} ISA level (it has {', '.join(paths['isa_supported'])})")
    if level not in isa_levels_to_test():
        pytest.skip(f"QSVD_CPU_ISA={paths['knobs']['QSVD_CPU_ISA']} caps the levels this run tests")
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu" and level != paths["isa"]:
        pytest.skip("the ISA level only changes the CPU kernels: on CUDA the test runs at one level")
    with qsvd_kernels.cpu_isa(level):
        yield level


def require_kernel(op: str, device: str) -> None:
    """Skip (with the reason) when op has no kernel for device yet."""
    if not qsvd_kernels.has_kernel(op, device):
        pytest.skip(f"qsvd.{op} has no {device} kernel in this build")


@pytest.fixture(scope="module")
def tiny_llama_compressor():
    """The tiny random LLaMA (seed 0) and its Compressor on random token
    batches: the decoder tests' common start (they skip without transformers)."""
    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations import models as M

    model, _, _ = M.tiny_llama(seed=0)
    return model, qc.Compressor(model, M.random_token_batches(model.config.vocab_size, 32, 48, seed=0),
                                progress=False)
