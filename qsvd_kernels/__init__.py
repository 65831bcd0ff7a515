"""qsvd-kernels: kernels for QSVD, low-rank joint-QKV attention with a
quantized latent KV cache.

Importing this package loads the compiled ops (``torch.ops.qsvd.*``) and
their fake kernels. ``build_info()`` says what was built.
"""

from __future__ import annotations

import torch

from ._version import __version__

try:
    from . import _C
except ImportError as e:  # pragma: no cover - message for users
    raise ImportError(
        "qsvd_kernels._C is not built or does not match this torch "
        f"({torch.__version__}). Build it with: pip install --no-build-isolation -e .   ({e})"
    ) from e

from . import _fake, reference  # noqa: E402,F401  (_fake registers the fake kernels)
from . import ops as _ops  # noqa: E402
from .ops import (  # noqa: E402
    hadamard_quant,
    hadamard_transform,
    latent_attention,
    latent_cache_append,
    latent_reconstruct_kv,
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


def build_info() -> dict:
    """What this installation was built with and can run.

    Keys: version, torch_version (built against), cuda (CUDA sources
    compiled), cuda_version, cuda_archs, cutlass_version, max_hadamard_dim,
    kernels ({op: {"cpu": bool, "cuda": bool}}), cuda_available (a GPU is
    visible now), gpu (its name, or None).
    """
    info = dict(_C.build_info())
    info["kernels"] = {op: {dev: has_kernel(op, dev) for dev in _DISPATCH_KEYS} for op in OPS}
    info["cuda_available"] = torch.cuda.is_available()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


__all__ = ["__version__", "OPS", "build_info", "explain", "has_kernel", "reference", *OPS]

# Per-GPU tuning tables (docs/tuning.md): installed at import when a CUDA
# device is visible and a table folder holds any table (so a plain install,
# which ships none, never initialises CUDA here). QSVD_TUNING=off disables it.
tuning.install_if_tables()
