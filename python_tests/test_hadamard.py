"""hadamard_transform / hadamard_quant against the bit-exact reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import code_format

from conftest import require_kernel

SUPPORTED_K = [K for K in range(1, R.MAX_HADAMARD_DIM + 1) if qk._C.is_supported_hadamard_dim(K)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_supported_sizes_match_reference_factorization():
    assert len(SUPPORTED_K) == 60
    for K in range(1, 4100):
        try:
            R.hadamard_factorize(K)
            ok = True
        except ValueError:
            ok = False
        assert ok == qk._C.is_supported_hadamard_dim(K), K
    # The sizes the op contract names.
    for K in (5120, 3072, 576, 4096, 1152, 40 * 128):
        assert K in SUPPORTED_K


def _random_signs(K, g):
    return torch.randint(0, 2, (K,), generator=g).float() * 2 - 1


# The every-size cases run at every ISA level (the `isa` fixture): their
# inputs and reference results are computed once per size.
@functools.lru_cache(maxsize=None)
def _transform_case(K):
    g = torch.Generator().manual_seed(K)
    rows = 3 if K >= 8192 else 5
    x = torch.randn(rows, K, generator=g)
    signs = _random_signs(K, g)
    return signs, [(x.to(dtype), R.hadamard_transform_ref(x.to(dtype), signs)) for dtype in DTYPES]


@functools.lru_cache(maxsize=None)
def _quant_case(K):
    g = torch.Generator().manual_seed(K + 1)
    x = torch.randn(3, K, generator=g, dtype=torch.float32).to(torch.bfloat16)
    signs = _random_signs(K, g)
    return x, signs, {bits: R.hadamard_quant_ref(x, bits, 0.9, signs) for bits in (8, 4) if bits == 8 or K % 2 == 0}


@pytest.mark.parametrize("K", SUPPORTED_K)
def test_transform_every_size_bit_exact(device, K, isa):
    require_kernel("hadamard_transform", device)
    signs, cases = _transform_case(K)
    for xd, want in cases:
        dtype = xd.dtype
        got = qk.hadamard_transform(xd.to(device), signs.to(device)).cpu()
        assert got.dtype == dtype and got.shape == xd.shape
        assert torch.equal(got, want), f"K={K} {dtype}: max diff {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("K", SUPPORTED_K)
def test_quant_every_size_bit_exact(device, K, isa):
    require_kernel("hadamard_quant", device)
    x, signs, wants = _quant_case(K)
    for bits in (8, 4):
        if bits == 4 and K % 2:
            continue
        want = wants[bits]
        got = qk.hadamard_quant(x.to(device), bits, 0.9, signs.to(device))
        assert torch.equal(got[0].cpu(), want[0]), f"K={K} bits={bits}: codes differ"
        assert torch.equal(got[1].cpu(), want[1]), f"K={K} bits={bits}: scales differ"


@pytest.mark.parametrize("K", [64, 576, 3072, 4096])
def test_reference_is_the_dense_orthogonal_matrix(K):
    """The bit-exact spec equals x @ H_K / sqrt(K) computed densely in fp64, to
    the error of log2(N) + m fp32 roundings on partial sums bounded by sum|x|."""
    H = R.hadamard_matrix(K)
    assert torch.allclose(H @ H.T, torch.eye(K, dtype=torch.float64), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, K, generator=g)
    signs = _random_signs(K, g)
    m, log_n = R.hadamard_factorize(K)
    dense = (x.double() * signs.double()) @ H
    got = R.hadamard_transform_ref(x, signs).double()
    bound = (log_n + m + 2) * 2.0**-24 * x.abs().sum(-1, keepdim=True).double() / math.sqrt(K)
    assert bool(((got - dense).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_noncontiguous_and_empty(device, dtype, isa):
    require_kernel("hadamard_transform", device)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 256, 3, generator=g).to(dtype)
    x = base.transpose(1, 2)  # [6, 3, 256], last dim strided
    assert not x.is_contiguous()
    want = R.hadamard_transform_ref(x.contiguous())
    got = qk.hadamard_transform(x.to(device)).cpu()
    assert got.shape == (6, 3, 256) and torch.equal(got, want)
    codes, scale = qk.hadamard_quant(x.to(device), 4)
    wc, ws = R.hadamard_quant_ref(x.contiguous(), 4)
    assert codes.shape == (6, 3, 128) and scale.shape == (6, 3)
    assert torch.equal(codes.cpu(), wc) and torch.equal(scale.cpu(), ws)
    # A row-strided 2-D view (every other row).
    y = torch.randn(8, 512, generator=g).to(dtype)[::2]
    assert torch.equal(qk.hadamard_transform(y.to(device)).cpu(), R.hadamard_transform_ref(y.contiguous()))
    # Zero rows.
    e = torch.empty(0, 128, dtype=dtype, device=device)
    assert qk.hadamard_transform(e).shape == (0, 128)
    c, s = qk.hadamard_quant(e, 8)
    assert c.shape == (0, 128) and s.shape == (0,)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_zero_rows_large_rows_and_nan(device, bits, isa):
    require_kernel("hadamard_quant", device)
    x = torch.randn(5, 1024)
    x[1] = 0.0  # all-zero row: scale 0, codes 0
    x[2] *= 1e30  # large magnitude: finite scale, codes use the full range
    x[3] = 3e38  # near float32 max (the rotation's sums may overflow: Inf)
    x[4, 7] = float("nan")  # NaN stays loud: NaN scale
    codes, scale = qk.hadamard_quant(x.to(device), bits)
    wc, ws = R.hadamard_quant_ref(x, bits)
    codes, scale = codes.cpu(), scale.cpu()
    assert torch.equal(codes, wc)
    assert torch.equal(scale.nan_to_num(nan=-1.0, posinf=-2.0), ws.nan_to_num(nan=-1.0, posinf=-2.0))
    assert scale[1] == 0 and bool((R.unpack_codes(codes[1:2], bits) == 0).all())
    assert math.isfinite(scale[2].item()) and scale[2] > 0
    qmax = code_format(bits).qmax
    assert R.unpack_codes(codes[2:3], bits).abs().max().item() == qmax
    assert math.isnan(scale[4].item())


def test_quant_dequantizes_to_the_rotation(device):
    """Dequantized codes are within half a step of the rotated row v: the
    code rounds q = fl(v / s) = (v / s)(1 + d), |d| <= u, to an integer (or
    clamps q <= qmax (1 + 2u) to qmax), so |code s - v| <= s / 2 + 2u |v|."""
    require_kernel("hadamard_quant", device)
    x = torch.randn(16, 5120, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    rot = R.hadamard_transform_ref(x.float()).double()
    for bits in (8, 4):
        codes, scale = qk.hadamard_quant(x.to(device), bits)
        deq = R.dequantize_rows_ref(codes.cpu(), scale.cpu(), bits)
        err = (deq - rot).abs()
        assert bool((err <= scale.double().unsqueeze(-1) / 2 + 2 * 2.0**-24 * rot.abs()).all())


def test_clip_ratio_saturates(device):
    require_kernel("hadamard_quant", device)
    x = torch.randn(4, 256)
    codes, scale = qk.hadamard_quant(x.to(device), 8, clip_ratio=0.5)
    full = R.hadamard_transform_ref(x)
    assert torch.allclose(scale.cpu(), 0.5 * full.abs().amax(-1) / 127, rtol=1e-6)
    assert int((codes.cpu().abs() == 127).sum()) > 4  # values beyond half the max saturate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu_bit_exact_random_batches():
    require_kernel("hadamard_quant", "cuda")
    g = torch.Generator().manual_seed(7)
    for K in (12, 96, 1152, 4096, 5120, 14336, 32768):
        for dtype in DTYPES:
            x = (torch.randn(33, K, generator=g) * 3).to(dtype)
            s = _random_signs(K, g)
            assert torch.equal(qk.hadamard_transform(x.cuda(), s.cuda()).cpu(), qk.hadamard_transform(x, s))
            for bits in (8, 4):
                a = qk.hadamard_quant(x.cuda(), bits, 0.95, s.cuda())
                b = qk.hadamard_quant(x, bits, 0.95, s)
                assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])
