"""quant_gemm: exact integer sums, dequantized epilogue, all bit combinations."""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R

from conftest import require_kernel
from helpers import EPS, TINY

BITS = [(8, 8), (8, 4), (4, 8), (4, 4)]
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _operands(M, N, K, a_bits, b_bits, g):
    a = torch.randint(-(7 if a_bits == 4 else 127), (8 if a_bits == 4 else 128), (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-(7 if b_bits == 4 else 127), (8 if b_bits == 4 else 128), (N, K), dtype=torch.int8, generator=g)
    A = R.pack_int4(a) if a_bits == 4 else a
    B = R.pack_int4(b) if b_bits == 4 else b
    return a, b, A, B


def assert_dequant_close(got, a, b, sa, sb, bias, out_dtype):
    """Kernel: fp32 acc * sa * sb (+ bias), rounded to out_dtype. Error
    against the exact value: 3 fp32 roundings on the product and one on the
    bias sum, then the rounding to out_dtype (half an ulp, relative EPS/2 or
    a subnormal step), with a factor 2 of slack on the last."""
    acc = a.double() @ b.double().T
    prod = acc * sa.double()[:, None] * sb.double()[None, :]
    exact = prod + (bias.double()[None, :] if bias is not None else 0.0)
    mag = prod.abs() + (bias.double().abs()[None, :] if bias is not None else 0.0)
    bound = 4 * 2.0**-24 * mag + EPS[out_dtype] * exact.abs() + TINY[out_dtype]
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


@pytest.mark.parametrize("a_bits,b_bits", BITS)
@pytest.mark.parametrize("M,N,K", [(1, 1, 2), (1, 64, 128), (16, 48, 96), (37, 129, 200), (300, 7, 64), (5, 96, 4096)])
def test_matches_exact_product(device, a_bits, b_bits, M, N, K):
    require_kernel("quant_gemm", device)
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    a, b, A, B = _operands(M, N, K, a_bits, b_bits, g)
    sa = torch.rand(M, generator=g) * 0.02 + 1e-3
    sb = torch.rand(N, generator=g) * 0.02 + 1e-3
    for out_dtype in OUT_DTYPES:
        bias = torch.randn(N, generator=g).to(out_dtype)
        for use_bias in (False, True):
            args = (A.to(device), sa.to(device), B.to(device), sb.to(device), a_bits, b_bits, out_dtype,
                    bias.to(device) if use_bias else None)
            got = qk.quant_gemm(*args).cpu()
            assert got.dtype == out_dtype and got.shape == (M, N)
            assert_dequant_close(got, a, b, sa, sb, bias if use_bias else None, out_dtype)


@pytest.mark.parametrize("a_bits,b_bits", BITS)
def test_integer_sums_are_exact(device, a_bits, b_bits):
    """Unit scales, fp32 output and |sum| < 2^24: the output is the exact integer."""
    require_kernel("quant_gemm", device)
    g = torch.Generator().manual_seed(3)
    a, b, A, B = _operands(9, 33, 512, a_bits, b_bits, g)
    ones_m, ones_n = torch.ones(9), torch.ones(33)
    got = qk.quant_gemm(A.to(device), ones_m.to(device), B.to(device), ones_n.to(device), a_bits, b_bits, torch.float32)
    want = (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.float32)
    assert torch.equal(got.cpu(), want)


def test_int32_range_at_the_largest_k(device):
    """K = 131072 with every product at -127 * 127: the largest sums the
    contract allows, still exact in int32 (no overflow)."""
    require_kernel("quant_gemm", device)
    K = 131072
    a = torch.full((2, K), -127, dtype=torch.int8)
    b = torch.full((3, K), 127, dtype=torch.int8)
    b[1] = -127
    got = qk.quant_gemm(a.to(device), torch.ones(2, device=device), b.to(device), torch.ones(3, device=device), 8, 8,
                        torch.float32).cpu()
    want = torch.tensor([-127 * 127 * K, 127 * 127 * K, -127 * 127 * K], dtype=torch.float64)
    assert torch.equal(got.double(), want.expand(2, 3))


def test_empty_dims(device):
    require_kernel("quant_gemm", device)
    z = qk.quant_gemm(torch.empty(0, 16, dtype=torch.int8, device=device), torch.empty(0, device=device),
                      torch.ones(4, 16, dtype=torch.int8, device=device), torch.ones(4, device=device), 8, 8,
                      torch.float16)
    assert z.shape == (0, 4)
    z = qk.quant_gemm(torch.ones(3, 8, dtype=torch.uint8, device=device), torch.ones(3, device=device),
                      torch.empty(0, 16, dtype=torch.int8, device=device), torch.empty(0, device=device), 4, 8,
                      torch.float32)
    assert z.shape == (3, 0)
    # K = 0: an empty sum is 0; the bias still lands.
    bias = torch.arange(5, dtype=torch.float32, device=device)
    z = qk.quant_gemm(torch.empty(2, 0, dtype=torch.int8, device=device), torch.ones(2, device=device),
                      torch.empty(5, 0, dtype=torch.int8, device=device), torch.ones(5, device=device), 8, 8,
                      torch.float32, bias)
    assert torch.equal(z.cpu(), bias.cpu().expand(2, 5))


def test_noncontiguous_operands(device):
    require_kernel("quant_gemm", device)
    g = torch.Generator().manual_seed(5)
    a, b, A, B = _operands(8, 16, 64, 8, 8, g)
    At = A.t().contiguous().t()  # same values, column-major
    sa, sb = torch.rand(8, generator=g), torch.rand(16, generator=g)
    got = qk.quant_gemm(At.to(device), sa.to(device), B[::1].to(device), sb.to(device), 8, 8, torch.float32).cpu()
    want = qk.quant_gemm(A, sa, B, sb, 8, 8, torch.float32)
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("a_bits,b_bits", BITS)
def test_cuda_matches_cpu(a_bits, b_bits):
    require_kernel("quant_gemm", "cuda")
    g = torch.Generator().manual_seed(11)
    for M, N, K in [(1, 4096, 4096), (16, 1536, 4096), (333, 1000, 1024), (4096, 64, 512)]:
        _, _, A, B = _operands(M, N, K, a_bits, b_bits, g)
        sa, sb = torch.rand(M, generator=g) * 0.01, torch.rand(N, generator=g) * 0.01
        got = qk.quant_gemm(A.cuda(), sa.cuda(), B.cuda(), sb.cuda(), a_bits, b_bits, torch.float32).cpu()
        want = qk.quant_gemm(A, sa, B, sb, a_bits, b_bits, torch.float32)
        assert torch.allclose(got, want, rtol=4 * 2.0**-24 * 2, atol=0)
