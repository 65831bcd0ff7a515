"""hadamard_quant: the fused rotation + per-token quantization.

Byte model (what the op must move, nothing else): read rows*K elements of
x, write rows*K*bits/8 bytes of codes and rows*4 bytes of scales. Memory-
bound, so the report is GB/s and its fraction of HBM peak. Baselines in the
same run: what users compose today from torch ops, (1) a dense fp16 matmul
with the Hadamard matrix plus per-row quantization in torch, and (2) the
reference (radix-2 butterflies in torch) plus quantization.
"""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R

from conftest import run_benchmark

SHAPES = [(1, 4096), (16, 4096), (4096, 4096), (4096, 5120), (4096, 14336), (256, 32768)]


def _bytes(rows, K, dtype, bits):
    return rows * K * torch.tensor([], dtype=dtype).element_size() + rows * K * bits // 8 + rows * 4


@pytest.mark.parametrize("rows,K", SHAPES, ids=[f"{r}x{k}" for r, k in SHAPES])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("impl", ["qsvd", "torch_dense_matmul", "torch_reference"])
def test_hadamard_quant(benchmark, device, rows, K, bits, impl):
    if device == "cpu" and rows * K > 4096 * 4096:
        pytest.skip("CPU: the large shapes only on a GPU")
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(rows, K, device=device, dtype=dtype)
    signs = (torch.randint(0, 2, (K,), device=device) * 2 - 1).float()
    if impl == "qsvd":
        fn = lambda: qk.hadamard_quant(x, bits, 1.0, signs)  # noqa: E731
    elif impl == "torch_dense_matmul":
        if K > 16384:
            pytest.skip("dense Hadamard matrix too large")
        H = R.hadamard_matrix(K, dtype=dtype, device=device)
        fn = lambda: R.quantize_rows_ref(((x * signs.to(dtype)) @ H).float(), bits)  # noqa: E731
    else:
        fn = lambda: R.hadamard_quant_ref(x, bits, 1.0, signs)  # noqa: E731
    run_benchmark(benchmark, device, fn, bytes_moved=_bytes(rows, K, dtype, bits), rows=rows, K=K, bits=bits,
                  impl=impl, dtype=str(dtype))
