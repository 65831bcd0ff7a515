"""The package, the op library and the build report."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R


def test_build_info_reports_backends():
    info = qk.build_info()
    for key in ("version", "torch_version", "cuda", "cuda_archs", "cutlass_version", "kernels", "cuda_available", "gpu"):
        assert key in info
    assert info["version"] == qk.__version__
    assert set(info["kernels"]) == set(qk.OPS)
    assert all(k["cpu"] for k in info["kernels"].values()), "every op has a CPU kernel"
    if info["cuda"]:
        assert info["cuda_archs"] and info["cutlass_version"]
        assert info["kernels"]["hadamard_quant"]["cuda"] and info["kernels"]["hadamard_transform"]["cuda"]
    else:
        assert not any(k["cuda"] for k in info["kernels"].values())


def test_every_op_is_registered_under_torch_ops_qsvd():
    for op in qk.OPS:
        packet = getattr(torch.ops.qsvd, op)
        assert packet.default._schema.name == f"qsvd::{op}"


def test_frameworks_can_load_the_library_alone():
    """torch.ops.load_library on the .so registers the ops; no import of ours."""
    code = (
        "import torch, sys\n"
        f"torch.ops.load_library({qk._C.__file__!r})\n"
        "y = torch.ops.qsvd.hadamard_transform(torch.ones(2, 4), None)\n"
        "assert torch.allclose(y[0], torch.tensor([2.0, 0.0, 0.0, 0.0])), y\n"
        "assert 'qsvd_kernels' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_has_kernel_rejects_unknown_names():
    import pytest

    with pytest.raises(ValueError, match="unknown op"):
        qk.has_kernel("nope", "cpu")
    with pytest.raises(ValueError, match="device must be"):
        qk.has_kernel("quant_gemm", "tpu")


def test_reference_formats():
    # INT4 packing layout: element 2i in the low nibble, two's complement.
    codes = torch.tensor([[-1, 2, 7, -7, -8, 0]], dtype=torch.int8)
    packed = R.pack_int4(codes)
    assert packed.tolist() == [[0x2F, 0x97, 0x08]]
    assert torch.equal(R.unpack_int4(packed), codes)
    # Quantization: ties to even, symmetric clamp, zero rows.
    v = torch.tensor([[2.5, -2.5, 3.5, 127.0], [0.0, 0.0, 0.0, 0.0], [-1000.0, 1.0, 0.0, 0.0]])
    c, s = R.quantize_rows_ref(v, 8)
    assert c[0].tolist() == [2, -2, 4, 127] and s[0] == 1.0
    assert c[1].tolist() == [0, 0, 0, 0] and s[1] == 0.0
    assert c[2].min() == -127
    # RoPE tables: LLaMA's, the frequency table repeated twice.
    cos, sin = R.rope_tables(5, 8, base=10000.0)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(cos[3, :4], torch.cos(3 * inv)) and torch.equal(cos[:, :4], cos[:, 4:])
    assert torch.allclose(sin[2, 4:], torch.sin(2 * inv))
