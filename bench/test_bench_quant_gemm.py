"""quant_gemm on CUDA: the two low-rank projections of a QSVD attention layer.

Shapes (LLaMA-7B E = 4096 with rank r in {1024, 1536, 3072}; LLaMA-13B E =
5120 with r = 0.375 E rounded to 64 = 1920), M tokens in {1, 16, 256, 4096}:
  down  [M, E] x [E, r]    x -> latent c          (GEMM M x N=r  x K=E)
  up    [M, r] x [r, 3E]   c -> Q, K, V           (GEMM M x N=3E x K=r)
W8A8 and W4A4 at every M; the mixed pairs (W4A8: a_bits 8, b_bits 4; W8A4:
a_bits 4, b_bits 8) at M = 1 and 4096. Output fp16, no bias.

Byte model (what the op must move at least, once each):
  bytes = M K a_bits/8 (A) + N K b_bits/8 (B) + 4 (M + N) (scales) + 2 M N (out)
Op model: ops = 2 M N K (one multiply and one add per product).
Reported per point: achieved GB/s and TOPS from the median time, their
fractions of the device's HBM and dense INT8 tensor-core peaks (conftest
PEAKS), and the ratio against the baselines, timed in the same process:
  fp16_qkv  torch.matmul of [M, E] x [E, 3E] in fp16: the uncompressed QKV
            projection the two low-rank GEMMs replace;
  int_mm    torch._int_mm of the same INT8 GEMM + a separate dequantization
            (x * a_scale * b_scale in fp32, then fp16); recorded as skipped
            where _int_mm's shape rules (M > 16, K and N multiples of 8)
            reject the shape, and for INT4 operands (no INT4 _int_mm).
Decode (M <= 16) is bound by reading B: compare GB/s with the HBM peak;
prefill (M = 4096) by the tensor cores: compare TOPS with the INT8 peak.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels.testing import random_codes
from qsvd_kernels.tuning.tune_ops import median_cuda_seconds

from conftest import run_benchmark

MODELS = [(4096, 1024), (4096, 1536), (4096, 3072), (5120, 1920)]  # (E, r); 1920 = round(0.375 * 5120 / 64) * 64
TOKENS = [1, 16, 256, 4096]
QUANTS = {"W8A8": (8, 8), "W4A4": (4, 4), "W4A8": (8, 4), "W8A4": (4, 8)}  # name: (a_bits, b_bits)
MIXED_TOKENS = [1, 4096]


def _cases():
    if not torch.cuda.is_available():
        return [pytest.param(None, None, None, None, None, marks=pytest.mark.skip(reason="needs a GPU"),
                             id="no-gpu")]
    cases = []
    for (E, r), M, proj, quant in itertools.product(MODELS, TOKENS, ("down", "up"), QUANTS):
        if quant in ("W4A8", "W8A4") and M not in MIXED_TOKENS:
            continue
        cases.append(pytest.param(E, r, M, proj, quant, id=f"cuda-E{E}-r{r}-M{M}-{proj}-{quant}"))
    return cases


def _gemm_shape(E, r, M, proj):
    return (M, r, E) if proj == "down" else (M, 3 * E, r)  # (M, N, K)


def _codes(rows, K, bits, device):
    return random_codes(bits, (rows, K), device=device)[1]


def _median_seconds(fn, iters=20):
    """Median of CUDA-event times of fn (after a warm-up), in seconds."""
    return median_cuda_seconds(fn, iters, warmup=3)


_BASELINES: dict = {}


def _baselines(E, M, N, K):
    """Baseline medians (seconds) for this point, measured once per process."""
    key = (E, M, N, K)
    if key in _BASELINES:
        return _BASELINES[key]
    x = torch.randn(M, E, device="cuda", dtype=torch.float16)
    w = torch.randn(E, 3 * E, device="cuda", dtype=torch.float16)
    out = {"fp16_qkv_s": _median_seconds(lambda: torch.matmul(x, w))}
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    bt = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda").t()  # [K, N], column-major
    sa, sb = torch.rand(M, device="cuda"), torch.rand(N, device="cuda")

    def int_mm():
        acc = torch._int_mm(a, bt)
        return (acc.float() * sa[:, None] * sb[None, :]).half()

    try:
        int_mm()
        out["int_mm_s"] = _median_seconds(int_mm)
    except RuntimeError as e:  # _int_mm's shape rules
        out["int_mm_s"] = None
        out["int_mm_skipped"] = str(e).splitlines()[0][:160]
    _BASELINES[key] = out
    return out


@pytest.mark.parametrize("E,r,M,proj,quant", _cases())
def test_quant_gemm(benchmark, E, r, M, proj, quant):
    a_bits, b_bits = QUANTS[quant]
    M, N, K = _gemm_shape(E, r, M, proj)
    torch.manual_seed(0)
    A, B = _codes(M, K, a_bits, "cuda"), _codes(N, K, b_bits, "cuda")
    sa, sb = torch.rand(M, device="cuda") * 0.01, torch.rand(N, device="cuda") * 0.01
    fn = lambda: qk.quant_gemm(A, sa, B, sb, a_bits, b_bits, torch.float16)  # noqa: E731
    bytes_moved = M * K * a_bits // 8 + N * K * b_bits // 8 + 4 * (M + N) + 2 * M * N
    flops = 2 * M * N * K
    base = _baselines(E, M, N, K)
    run_benchmark(benchmark, "cuda", fn, bytes_moved=bytes_moved, flops=flops, impl="qsvd", quant=quant,
                  a_bits=a_bits, b_bits=b_bits, E=E, r=r, M=M, N=N, K=K, proj=proj,
                  config=qk._C.quant_gemm_config(M, a_bits, b_bits, torch.cuda.current_device()), **base)
    t = benchmark.stats.stats.median
    benchmark.extra_info["speedup_vs_fp16_qkv"] = base["fp16_qkv_s"] / t
    benchmark.extra_info["speedup_vs_int_mm"] = (
        base["int_mm_s"] / t if base["int_mm_s"] is not None and quant == "W8A8" else None)
