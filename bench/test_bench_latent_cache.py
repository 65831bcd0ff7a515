"""latent_cache_append and latent_reconstruct_kv on CUDA.

Byte models (what each op must move, nothing else):
  append       read T r 2 (fp16 latent) + T 8 (int64 slots);
               write T r bits/8 (codes) + T 4 (scales).
  reconstruct  read T (r bits/8 + 4) (latent codes + scales) + 2 H_kv r d 2
               (fp16 W_uk, W_uv) + T d 4 2 (RoPE cos/sin rows);
               write 2 T H_kv d 2 (fp16 K and V).
Append is memory-bound: report GB/s and the HBM peak fraction. Reconstruct
does 2 T r (2 H_kv d) flops on tensor cores (fp16 inputs, fp32 sums); its
three-pass design (gather -> cuBLAS GEMM -> epilogue) also moves the dense
fp16 codes and the fp32 GEMM output through HBM, which the minimal model
above does not count, so its HBM fraction is a lower bound of the traffic.
Baselines in the same run: the torch reference (qsvd_kernels.reference) on
the same GPU.
"""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import code_format

from conftest import device_peaks, run_benchmark

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA benchmarks")

APPEND = [(32, 512), (32, 1536), (4096, 512), (4096, 1536)]  # (T, r): decode batch 32, prefill 4096
RECONSTRUCT_T, RECONSTRUCT_R, HEAD_DIM = 4096, 1536, 128


def _append_bytes(T, r, bits):
    return T * r * 2 + T * 8 + T * r * bits // 8 + T * 4


@pytest.mark.parametrize("T,r", APPEND, ids=[f"cuda-T{t}-r{r}" for t, r in APPEND])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("impl", ["qsvd", "torch_reference"])
def test_latent_cache_append(benchmark, T, r, bits, impl):
    block_size = 256
    num_blocks = (T + block_size - 1) // block_size + 1
    c = torch.randn(T, r, device="cuda", dtype=torch.float16)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:T]
    fmt = code_format(bits)
    cache = torch.zeros(num_blocks, block_size, fmt.row_bytes(r), device="cuda", dtype=fmt.dtype)
    scale = torch.zeros(num_blocks, block_size, device="cuda")
    op = qk.latent_cache_append if impl == "qsvd" else R.latent_cache_append_ref
    run_benchmark(benchmark, "cuda", lambda: op(c, slots, cache, scale, bits), bytes_moved=_append_bytes(T, r, bits),
                  T=T, r=r, bits=bits, impl=impl)


@pytest.mark.parametrize("H_kv", [8, 32], ids=lambda h: f"cuda-Hkv{h}")
@pytest.mark.parametrize("impl", ["qsvd", "torch_reference"])
def test_latent_reconstruct_kv(benchmark, H_kv, impl):
    T, r, d, bits, block_size = RECONSTRUCT_T, RECONSTRUCT_R, HEAD_DIM, 8, 256
    g = torch.Generator().manual_seed(0)
    n_blocks = T // block_size
    cache = torch.randint(-127, 128, (n_blocks, block_size, r), dtype=torch.int8, generator=g).cuda()
    cache_scale = (torch.rand(n_blocks, block_size, generator=g) / 127).cuda()
    block_table = torch.randperm(n_blocks, generator=g).to(torch.int32).view(1, -1).cuda()
    seq_lens = torch.tensor([T], dtype=torch.int32, device="cuda")
    w_uk = (torch.randn(H_kv, r, d, generator=g) / r**0.5).half().cuda()
    w_uv = (torch.randn(H_kv, r, d, generator=g) / r**0.5).half().cuda()
    cos, sin = R.rope_tables(T, d, device="cuda")
    args = (cache, cache_scale, block_table, seq_lens, w_uk, None, w_uv, None, bits, cos, sin)
    if impl == "qsvd":
        fn = lambda: qk.latent_reconstruct_kv(*args)  # noqa: E731
    else:
        fn = lambda: R.latent_reconstruct_kv_ref(*args, compute_dtype=torch.float32)  # noqa: E731
    bytes_moved = T * (r * bits // 8 + 4) + 2 * H_kv * r * d * 2 + T * d * 4 * 2 + 2 * T * H_kv * d * 2
    flops = 2 * T * r * 2 * H_kv * d
    run_benchmark(benchmark, "cuda", fn, bytes_moved=bytes_moved, flops=flops, T=T, r=r, H_kv=H_kv, d=d, bits=bits,
                  impl=impl)
    # The GEMM runs on fp16 tensor cores: its fraction of the fp16 peak, not the int8 one.
    peaks = device_peaks("cuda")
    benchmark.extra_info.pop("peak_int8_frac", None)
    if peaks:
        benchmark.extra_info["peak_fp16_frac"] = benchmark.extra_info["tops"] / peaks["fp16_tflops"]
