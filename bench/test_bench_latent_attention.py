"""Decode attention over the quantized latent cache (latent_attention, CUDA)
against torch SDPA decode over an fp16 K/V cache of the same shape, in the
same session.

Every qsvd point also records the SDPA time at its shape
(time_ratio_vs_sdpa < 1: the latent kernel is faster), achieved GB/s of
the byte model against the HBM peak (conftest), and for RoPE the rebuild's
TOPS against the INT8 tensor-core peak.

Shapes: H = 32 query heads of d = 128, H_kv in {32, 8}, rank r in {512, 1536},
batch {1, 8, 32}, context {1K, 4K, 16K, 32K}, INT8 and INT4 latents, RoPE
(K rebuilt per cached token) and no RoPE (K absorbed). QSVD_BENCH_QUICK=1
runs a subset.

Byte model of one latent_attention call (B sequences of L tokens, l latent
bits, fp16 weights, fp16 q/out), what the kernels must read or write:
  codes   B L r l / 8        latent rows, read once per head tile
  scales  4 B L               one fp32 scale per token
  weights 2 H_kv r d 2        W_uk and W_uv (fp16)
  q, out  2 B H d 2
SDPA's: 2 B H_kv L d 2 (K and V, fp16) + q/out. The KV bytes ratio is
(codes + scales) / fp16 K+V = (r l / 8 + 4) / (4 H_kv d).
Op model of the RoPE path's K rebuild: 2 r d H_kv L B (the codes x W_uk
product for every cached token); its TOPS are reported against the
device's INT8 tensor-core peak (the roofline of method sec. 5). The
kernels also spend 4 r H L B on scores and accumulation, not counted.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import device_peaks, run_benchmark

H, D = 32, 128
QUICK = os.environ.get("QSVD_BENCH_QUICK") == "1"
BLOCK = 256

GRID = list(itertools.product([32, 8], [512, 1536], [1, 8, 32], [1024, 4096, 16384, 32768], [8, 4], [True, False]))
if QUICK:
    GRID = list(itertools.product([8], [512, 1536], [8], [4096, 32768], [8, 4], [True, False]))


def byte_model(H_kv, r, B, L, bits):
    codes = B * L * r * bits / 8
    scales = 4 * B * L
    weights = 2 * H_kv * r * D * 2
    q_out = 2 * B * H * D * 2
    sdpa = 2 * B * H_kv * L * D * 2 + q_out
    return codes + scales + weights + q_out, sdpa, (codes + scales) / (2 * B * H_kv * L * D * 2)


def _cases():
    if not torch.cuda.is_available():
        return
    for H_kv, r, B, L, bits, rope in GRID:
        tag = f"Hkv{H_kv}-r{r}-B{B}-L{L}-int{bits}-{'rope' if rope else 'norope'}"
        yield pytest.param(H_kv, r, B, L, bits, rope, "qsvd", id=f"cuda-qsvd-{tag}")
        if bits == 8 and rope:  # one SDPA point per (H_kv, B, L); r and the latent format do not change it
            if r == 512:
                yield pytest.param(H_kv, r, B, L, bits, rope, "sdpa_fp16", id=f"cuda-sdpa-Hkv{H_kv}-B{B}-L{L}")


def _latent_inputs(H_kv, r, B, L, bits, rope):
    from qsvd_kernels import reference as R
    from qsvd_kernels.testing import random_codes

    dev = "cuda"
    blocks = math.ceil(L / BLOCK)
    num_blocks = B * blocks
    cache = random_codes(bits, (num_blocks, BLOCK, r), device=dev)[1]
    scale = torch.rand(num_blocks, BLOCK, device=dev) / 127
    table = torch.randperm(num_blocks, device=dev, dtype=torch.int32).reshape(B, blocks)
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    w_uk = (torch.randn(H_kv, r, D, device=dev) / math.sqrt(r)).half()
    w_uv = (torch.randn(H_kv, r, D, device=dev) / math.sqrt(r)).half()
    q = torch.randn(B, H, D, device=dev).half()
    cos, sin = R.rope_tables(L, D, device=dev) if rope else (None, None)
    return q, cache, scale, table, lens, w_uk, w_uv, cos, sin


_SDPA_SECONDS: dict = {}


def _sdpa_inputs(H_kv, B, L):
    q = torch.randn(B, H, 1, D, device="cuda").half()
    k = torch.randn(B, H_kv, L, D, device="cuda").half()
    v = torch.randn(B, H_kv, L, D, device="cuda").half()
    return lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=H_kv != H)


def sdpa_seconds(H_kv, B, L, reps=20):
    """Median SDPA decode time at this shape (CUDA events), measured once per session."""
    key = (H_kv, B, L)
    if key not in _SDPA_SECONDS:
        from qsvd_kernels.tuning.tune_ops import median_cuda_seconds

        _SDPA_SECONDS[key] = median_cuda_seconds(_sdpa_inputs(H_kv, B, L), reps, warmup=3)
    return _SDPA_SECONDS[key]


@pytest.mark.parametrize("H_kv,r,B,L,bits,rope,impl", list(_cases()))
def test_latent_attention_decode(benchmark, H_kv, r, B, L, bits, rope, impl):
    import qsvd_kernels as qk

    qsvd_bytes, sdpa_bytes, kv_ratio = byte_model(H_kv, r, B, L, bits)
    flops = 2 * r * D * H_kv * L * B if rope else 0
    try:
        if impl == "qsvd":
            q, cache, scale, table, lens, w_uk, w_uv, cos, sin = _latent_inputs(H_kv, r, B, L, bits, rope)

            def fn():
                return qk.latent_attention(q, cache, scale, table, lens, w_uk, None, w_uv, None, bits, D**-0.5,
                                           cos, sin)
        else:
            fn = _sdpa_inputs(H_kv, B, L)
    except torch.OutOfMemoryError:
        pytest.skip("out of device memory at this shape")
    run_benchmark(benchmark, "cuda", fn, bytes_moved=qsvd_bytes if impl == "qsvd" else sdpa_bytes,
                  flops=flops if impl == "qsvd" else 0, impl=impl, H=H, H_kv=H_kv, d=D, rank=r, batch=B,
                  context=L, latent_bits=bits, rope=rope, kv_bytes_ratio=kv_ratio)
    if impl == "qsvd":
        t = benchmark.stats.stats.median
        try:
            benchmark.extra_info["sdpa_fp16_median_s"] = sdpa_seconds(H_kv, B, L)
            benchmark.extra_info["time_ratio_vs_sdpa"] = t / benchmark.extra_info["sdpa_fp16_median_s"]
        except torch.OutOfMemoryError:
            benchmark.extra_info["sdpa_fp16_median_s"] = None
        peaks = device_peaks("cuda")
        if rope and peaks:
            benchmark.extra_info["rebuild_tops_frac_int8_peak"] = flops / t / 1e12 / peaks["int8_tops"]
