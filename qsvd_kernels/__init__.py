"""qsvd-kernels: kernels for QSVD, low-rank joint-QKV attention with a
quantized latent KV cache.

Importing this package loads the compiled ops (``torch.ops.qsvd.*``) and
their fake kernels. ``build_info()`` says what was built.
"""

from __future__ import annotations

import contextlib
import platform

import torch

from ._version import __version__

try:
    from . import _C
except ImportError as e:  # pragma: no cover - message for users
    raise ImportError(
        "qsvd_kernels._C is not built or does not match this torch "
        f"({torch.__version__}). Build it with: pip install --no-build-isolation -e .   ({e})"
    ) from e

# QSVD_CPU_ISA is read when _C loads; a value it cannot honour (not a level,
# or one this CPU lacks) is an error here, not ignored.
_C.cpu_isa()

from . import _fake, reference  # noqa: E402,F401  (_fake registers the fake kernels)
from . import ops as _ops  # noqa: E402
from .ops import (  # noqa: E402
    describe_latent_attention_plan,
    hadamard_quant,
    hadamard_transform,
    latent_attention,
    latent_attention_plan,
    latent_cache_append,
    latent_reconstruct_kv,
    latent_rope_keys_append,
    quant_gemm,
)

from . import tuning  # noqa: E402
from .tuning import explain  # noqa: E402

OPS = tuple(_ops.__all__)  # the list of ops, written once (ops.py)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device: str) -> bool:
    """Whether ``torch.ops.qsvd.<op>`` has a kernel for ``device`` ('cpu' or 'cuda')."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if device not in _DISPATCH_KEYS:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"qsvd::{op}", _DISPATCH_KEYS[device])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info() -> dict:
    """What this installation was built with and can run.

    Keys: version, torch_version (built against), cuda (CUDA sources
    compiled), cuda_version, cuda_archs, cutlass_version, max_hadamard_dim,
    kernels ({op: {"cpu": bool, "cuda": bool}}), cuda_available (a GPU is
    visible now), gpu (its name, or None), cpu (the CPU kernels' paths on
    this machine now: ``_C.cpu_paths()`` plus "model", the CPU's name).
    """
    info = dict(_C.build_info())
    info["kernels"] = {op: {dev: has_kernel(op, dev) for dev in _DISPATCH_KEYS} for op in OPS}
    info["cuda_available"] = torch.cuda.is_available()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["cpu"] = {"model": _cpu_model(), **_C.cpu_paths()}
    return info


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the CPU kernels at ISA level ``name`` ("avx512", "avx2" or
    "baseline", one this CPU supports) inside the ``with`` block, for the
    whole process; the previous level is restored on exit. Every level
    gives the same bits, except latent_attention's weight-streaming
    products (avx512 only), which sum in another order within the same
    bound. ``_C.cpu_isa()`` names the level now, ``_C.cpu_paths()`` says
    what each CPU path takes."""
    before = _C.set_cpu_isa(name)
    try:
        yield name
    finally:
        _C.set_cpu_isa(before)


__all__ = ["__version__", "OPS", "build_info", "cpu_isa", "explain", "has_kernel", "reference", *OPS]

# Per-GPU tuning tables (docs/tuning.md): installed at import when a CUDA
# device is visible and a table folder holds any table (so a plain install,
# which ships none, never initialises CUDA here). QSVD_TUNING=off disables it.
tuning.install_if_tables()
