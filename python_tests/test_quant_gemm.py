"""quant_gemm: exact integer sums, dequantized epilogue, all bit combinations."""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels.formats import code_format

from conftest import require_kernel
from helpers import EPS, TINY, random_codes

BITS = [(8, 8), (8, 4), (4, 8), (4, 4)]
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _operands(M, N, K, a_bits, b_bits, g):
    (a, A), (b, B) = random_codes(a_bits, (M, K), g), random_codes(b_bits, (N, K), g)
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
def test_integer_sums_are_exact(device, a_bits, b_bits, isa):
    """Unit scales, fp32 output and |sum| < 2^24: the output is the exact
    integer, at every ISA level (INT4 unpacked by each level's loop)."""
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


def _brgemm_available():
    """Whether torch's int8 brgemm serves here now (an AMX CPU, oneDNN
    enabled), whatever QSVD_CPU_QUANT_GEMM says: the capability, not the
    path the knob picks."""
    return qk._C.cpu_paths()["int8_brgemm"]


def _full_range_operands(M, N, K, a_bits, b_bits, g):
    """Codes over the whole of their type: -128..127, and -8..7 for INT4."""
    lo = {8: -128, 4: -8}
    a = torch.randint(lo[a_bits], -lo[a_bits], (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(lo[b_bits], -lo[b_bits], (N, K), dtype=torch.int8, generator=g)
    return a, b, code_format(a_bits).pack(a), code_format(b_bits).pack(b)


# M over brgemm's padded column counts (1, 16, 17, 33, 48, 64) and just past
# them (65: at::_int_mm); K: one slice, a multiple of 4 or not (zero
# padding), 126 past a 128-code unpack chunk, several 512-code slices with
# a tail that is not whole chunks (1100, 642: a later slice of whole chunks
# and a tail), a 2-code last slice (4098); N not a multiple of the 64-row
# chunks. Odd K (INT8 only): K < 4 takes the exact scalar loop.
_CPU_PATH_SHAPES = [(1, 129, 2), (1, 200, 130), (3, 65, 254), (16, 64, 1100), (17, 3, 4098), (33, 70, 512),
                    (48, 40, 638), (2, 64, 642), (64, 129, 1026), (5, 96, 4096), (65, 33, 300)]
_CPU_PATH_SHAPES_ODD_K = [(1, 7, 1), (4, 9, 3), (16, 70, 5), (20, 33, 1023), (65, 10, 1), (100, 5, 1)]


def _cases():
    for a_bits, b_bits in BITS:
        for shape in _CPU_PATH_SHAPES:
            yield a_bits, b_bits, *shape
    for shape in _CPU_PATH_SHAPES_ODD_K:
        yield 8, 8, *shape


@pytest.mark.parametrize("a_bits,b_bits,M,N,K", list(_cases()))
def test_cpu_gemm_paths_agree_bit_for_bit(monkeypatch, a_bits, b_bits, M, N, K, isa):
    """The CPU kernel's two paths for M <= 64 (brgemm with b as the row
    operand, INT4 unpacked per K slice in the unpack's order of K; and
    at::_int_mm) take the path the knob names and give the same bits: both
    sums are exact int32 and the epilogue is the same. With unit scales and
    an fp32 output both equal the exact integer product. Codes cover their
    whole range (-128, and -8 for INT4). At every ISA level: the INT4
    unpack for brgemm is a table lookup at avx512 and avx2, a scalar loop
    at baseline."""
    if not _brgemm_available():
        pytest.skip("no int8 brgemm here (it needs an AMX CPU and oneDNN enabled): every M takes at::_int_mm, "
                    "which test_matches_exact_product covers")
    g = torch.Generator().manual_seed(M * 7919 + N * 31 + K)
    a, b, A, B = _full_range_operands(M, N, K, a_bits, b_bits, g)
    sa = torch.rand(M, generator=g) * 0.02 + 1e-3
    sb = torch.rand(N, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    outs = {}
    for path in ("onednn", "brgemm"):
        monkeypatch.setenv("QSVD_CPU_QUANT_GEMM", path)
        want_path = "scalar" if K < 4 else ("onednn" if M > 64 else path)
        assert qk._C.quant_gemm_cpu_path(M, K) == want_path
        outs[path] = (qk.quant_gemm(A, sa, B, sb, a_bits, b_bits, torch.bfloat16, bias),
                      qk.quant_gemm(A, torch.ones(M), B, torch.ones(N), a_bits, b_bits, torch.float32))
    assert torch.equal(outs["onednn"][0], outs["brgemm"][0])
    want = (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.float32)  # |sum| < 2^24 here
    assert torch.equal(outs["brgemm"][1], want) and torch.equal(outs["onednn"][1], want)


@pytest.mark.parametrize("a_bits,b_bits,M,N,K", list(_cases()) + [(8, 4, 300, 20, 4098), (4, 4, 300, 20, 1026)])
def test_cpu_onednn_path_is_exact(monkeypatch, a_bits, b_bits, M, N, K, isa):
    """The at::_int_mm path on every CPU (forced for M <= 64), full-range
    codes, at every ISA level: with unit scales and an fp32 output, the
    output is the exact int32 sum rounded once to fp32. With an INT4 b both
    operands go in the chunk-deinterleaved order of K (each level's unpack,
    an INT8 a copied into that order): the K shapes cover whole 128-code
    chunks, tails, and no whole chunk."""
    monkeypatch.setenv("QSVD_CPU_QUANT_GEMM", "onednn")
    g = torch.Generator().manual_seed(M * 7919 + N * 31 + K)
    a, b, A, B = _full_range_operands(M, N, K, a_bits, b_bits, g)
    assert qk._C.quant_gemm_cpu_path(M, K) in (("scalar",) if K < 4 else ("onednn", "scalar"))
    got = qk.quant_gemm(A, torch.ones(M), B, torch.ones(N), a_bits, b_bits, torch.float32)
    assert torch.equal(got, (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.float32))


@pytest.mark.parametrize("M", [1, 65, 300])
def test_cpu_k_of_one_is_exact(M):
    """K = 1, where torch 2.14's at::_int_mm returns wrong sums: the kernel
    takes its exact scalar loop for K < 4."""
    g = torch.Generator().manual_seed(M)
    a, b, A, B = _full_range_operands(M, 17, 1, 8, 8, g)
    assert qk._C.quant_gemm_cpu_path(M, 1) == "scalar"
    got = qk.quant_gemm(A, torch.ones(M), B, torch.ones(17), 8, 8, torch.float32)
    assert torch.equal(got, (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.float32))


def test_cpu_gemm_with_onednn_switched_off(monkeypatch):
    """torch.backends.mkldnn switched off after a call on the brgemm path
    (where there is one): the next call takes at::_int_mm (brgemm is asked
    per call; the scalar loop where oneDNN's int8 GEMM is not exact, as for
    M > 64), still exact; a forced brgemm is then an error naming the knob,
    and works again once oneDNN is back, where brgemm serves at all."""
    g = torch.Generator().manual_seed(11)
    a, b, A, B = _full_range_operands(2, 70, 640, 4, 4, g)
    want = (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.float32)
    run = lambda: qk.quant_gemm(A, torch.ones(2), B, torch.ones(70), 4, 4, torch.float32)  # noqa: E731
    assert torch.equal(run(), want)
    with torch.backends.mkldnn.flags(enabled=False):
        assert qk._C.quant_gemm_cpu_path(2, 640) == qk._C.quant_gemm_cpu_path(65, 640) != "brgemm"
        assert torch.equal(run(), want)
        monkeypatch.setenv("QSVD_CPU_QUANT_GEMM", "brgemm")
        with pytest.raises(RuntimeError, match="QSVD_CPU_QUANT_GEMM=brgemm, but"):
            run()
    if _brgemm_available():
        assert qk._C.quant_gemm_cpu_path(2, 640) == "brgemm"
        assert torch.equal(run(), want)
    else:  # no AMX: a forced brgemm stays an error
        with pytest.raises(RuntimeError, match="QSVD_CPU_QUANT_GEMM=brgemm, but"):
            run()


def test_cpu_gemm_knob_is_checked(monkeypatch):
    """A bad value is an error naming the knob, on every path (K = 0 and
    K < 4 too)."""
    monkeypatch.setenv("QSVD_CPU_QUANT_GEMM", "fast")
    for K in (4, 2, 0):
        with pytest.raises(RuntimeError, match="QSVD_CPU_QUANT_GEMM must be onednn, brgemm or auto"):
            qk.quant_gemm(torch.ones(1, K, dtype=torch.int8), torch.ones(1), torch.ones(2, K, dtype=torch.int8),
                          torch.ones(2), 8, 8, torch.float32)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (M, N, K): M over the decode and prefill buckets of both architectures
# (sm80: decode M <= 32; sm90 W8A8: decode M <= 64), N >> M and M >> N, N
# never a multiple of 8 (the padded-output path) but one aligned case per
# M-bucket, and K off the kernels' 16-byte row granularity (K odd for INT8,
# K = 2 mod 4 for INT4: the zero-padding path) or aligned (the direct path).
_CUDA_SHAPES_8 = [(1, 4099, 1023), (7, 1000, 4096), (16, 2050, 333), (33, 333, 1023), (64, 520, 4096),
                  (65, 130, 255), (256, 96, 4097), (1000, 24, 999), (300, 7, 64), (16, 4096, 4096)]
_CUDA_SHAPES_4 = [(1, 4099, 1026), (7, 1000, 4096), (16, 2050, 334), (33, 333, 1026), (64, 520, 4096),
                  (65, 130, 258), (256, 96, 4098), (1000, 24, 998), (300, 7, 64), (16, 4096, 4096)]


def _cuda_vs_cpu(A, sa, B, sb, a_bits, b_bits, out_dtype, bias):
    got = qk.quant_gemm(A.cuda(), sa.cuda(), B.cuda(), sb.cuda(), a_bits, b_bits, out_dtype,
                        None if bias is None else bias.cuda())
    want = qk.quant_gemm(A, sa, B, sb, a_bits, b_bits, out_dtype, bias)
    return got, want


@needs_gpu
@pytest.mark.parametrize("a_bits,b_bits", BITS)
@pytest.mark.parametrize("shape", range(len(_CUDA_SHAPES_8)))
def test_cuda_matches_cpu(a_bits, b_bits, shape):
    """CUDA == CPU bit for bit, for every output dtype, with and without bias.

    Why equality and not a tolerance: both backends sum the integer products
    exactly in int32 (K <= 131072), then evaluate ((float)acc * a_scale) *
    b_scale (+ bias) in fp32 with each operation rounded to nearest and none
    fused (__fmul_rn / __fadd_rn on the GPU, -ffp-contract=off on the host),
    so the fp32 value is the same; the single rounding to fp16/bf16 is
    round-to-nearest-even on both. Without a bias the CUDA epilogue adds -0.0,
    which leaves every fp32 value unchanged."""
    require_kernel("quant_gemm", "cuda")
    M, N, K = (_CUDA_SHAPES_4 if 4 in (a_bits, b_bits) else _CUDA_SHAPES_8)[shape]
    g = torch.Generator().manual_seed(1000 * shape + 10 * a_bits + b_bits)
    _, _, A, B = _operands(M, N, K, a_bits, b_bits, g)
    sa = torch.rand(M, generator=g) * 0.02 + 1e-3
    sb = torch.rand(N, generator=g) * 0.02 + 1e-3
    for out_dtype in OUT_DTYPES:
        bias = (torch.randn(N, generator=g) * 4).to(out_dtype)
        for b_ in (None, bias):
            got, want = _cuda_vs_cpu(A, sa, B, sb, a_bits, b_bits, out_dtype, b_)
            assert got.dtype == out_dtype and got.shape == (M, N) and got.is_contiguous()
            assert torch.equal(got.cpu(), want), \
                f"{out_dtype}, bias={b_ is not None}: max diff {(got.cpu().double() - want.double()).abs().max()}"


@needs_gpu
@pytest.mark.parametrize("a_bits,b_bits", BITS)
def test_cuda_noncontiguous_and_misaligned(a_bits, b_bits):
    """Strided operands, strided scales and bias, and views at an address
    off the kernels' 16-byte alignment: the same result as contiguous
    copies on the CPU, bit for bit."""
    require_kernel("quant_gemm", "cuda")
    M, N, K = 37, 203, 258
    g = torch.Generator().manual_seed(17)
    _, _, A, B = _operands(M, N, K, a_bits, b_bits, g)
    sa = torch.rand(M, generator=g) * 0.02 + 1e-3
    sb = torch.rand(N, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    dev = "cuda"
    A_t = A.to(dev).t().contiguous().t()                     # column-major
    B_wide = torch.zeros(N, 2 * B.shape[1], dtype=B.dtype, device=dev)
    B_wide[:, 1:1 + B.shape[1]] = B.to(dev)
    B_s = B_wide[:, 1:1 + B.shape[1]]                        # row stride 2x, odd byte offset
    sa_s = torch.zeros(2 * M, device=dev)
    sa_s[::2] = sa.to(dev)
    sb_off = torch.zeros(N + 1, device=dev)
    sb_off[1:] = sb.to(dev)                                  # 4 bytes off alignment
    bias_s = torch.zeros(2 * N, dtype=torch.bfloat16, device=dev)
    bias_s[::2] = bias.to(dev)
    assert not A_t.is_contiguous() and not B_s.is_contiguous() and not bias_s[::2].is_contiguous()
    got = qk.quant_gemm(A_t, sa_s[::2], B_s, sb_off[1:], a_bits, b_bits, torch.bfloat16, bias_s[::2])
    want = qk.quant_gemm(A, sa, B, sb, a_bits, b_bits, torch.bfloat16, bias)
    assert torch.equal(got.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("a_bits,b_bits", BITS)
def test_cuda_stream_k_shapes(a_bits, b_bits):
    """Few output tiles and a long K (decode down-projection, K splits
    across SMs) and a grid of many tiles with a ragged last wave: the
    stream-K partial sums are int32 and exact, so still bit-identical."""
    require_kernel("quant_gemm", "cuda")
    g = torch.Generator().manual_seed(23)
    for M, N, K in [(1, 64, 32768), (3, 1024, 16384), (48, 200, 8192), (700, 1100, 512)]:
        _, _, A, B = _operands(M, N, K, a_bits, b_bits, g)
        sa, sb = torch.rand(M, generator=g) * 0.01, torch.rand(N, generator=g) * 0.01
        got, want = _cuda_vs_cpu(A, sa, B, sb, a_bits, b_bits, torch.float32, None)
        assert torch.equal(got.cpu(), want), (M, N, K)


@needs_gpu
@pytest.mark.parametrize("a_bits,b_bits", [(8, 8), (8, 4), (4, 8)])
def test_cuda_large_sums_round_like_cpu(a_bits, b_bits):
    """Sums above 2^24 (spacing 4 in fp32), low bits varied: (float)acc is
    inexact, and the kernels' int32 -> fp32 conversion must round to nearest
    even like the CPU's static_cast (a truncating conversion, or CUTLASS's
    magic-number FastNumericArrayConverter, would fail). The other tests keep
    |acc| < 2^24, where every conversion is exact. W4A4 cannot get there
    (7 * 7 * 131072 < 2^24)."""
    require_kernel("quant_gemm", "cuda")
    K = 4096 if (a_bits, b_bits) == (8, 8) else 65536
    M, N = 4, 40
    qa, qb = code_format(a_bits).qmax, code_format(b_bits).qmax
    g = torch.Generator().manual_seed(29)
    a = torch.full((M, K), qa, dtype=torch.int8)
    b = torch.full((N, K), qb, dtype=torch.int8)
    a[:, :64] = torch.randint(-qa, qa + 1, (M, 64), dtype=torch.int8, generator=g)
    b[:, :64] = torch.randint(-qb, qb + 1, (N, 64), dtype=torch.int8, generator=g)
    acc = a.to(torch.int64) @ b.to(torch.int64).T
    assert bool((acc >= 2**25).all()) and bool((acc.float().to(torch.int64) != acc).any())
    A, B = code_format(a_bits).pack(a), code_format(b_bits).pack(b)
    got, want = _cuda_vs_cpu(A, torch.ones(M), B, torch.ones(N), a_bits, b_bits, torch.float32, None)
    assert torch.equal(want, acc.float())
    assert torch.equal(got.cpu(), want)


@needs_gpu
def test_cuda_config_depends_on_m():
    """The decode configuration serves M = 1, the prefill one M = 4096; on
    Hopper W8A8 runs the CUTLASS 3.x kernels and the INT4 pairs the 2.x ones."""
    require_kernel("quant_gemm", "cuda")
    config = qk._C.quant_gemm_config
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for a_bits, b_bits in BITS:
        small, large = config(1, a_bits, b_bits), config(4096, a_bits, b_bits)
        assert small != large and "decode" in small and "prefill" in large
        arch = "sm90" if hopper and (a_bits, b_bits) == (8, 8) else "sm80"
        assert small.startswith(arch) and large.startswith(arch)
