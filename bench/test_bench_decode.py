"""End-to-end decode step of one LLaMA-7B-shaped attention layer (E = 4096,
H = 32, d = 128): QSVD on the qsvd ops against the fp16 layer.

QSVD step: hadamard_quant -> quant_gemm (x -> c) -> latent_cache_append ->
quant_gemm (c -> q) -> RoPE -> latent_attention (K rebuilt per cached token,
V absorbed) -> o_proj (fp16). fp16 step: QKV GEMM -> K/V cache write -> RoPE ->
SDPA -> o_proj. (qsvd_kernels/bench_layer.py builds both.)

Byte and op model per step (B sequences, L cached tokens, w/a/l bits):
  QSVD bytes  = W_d r E w/8 + W_uq E r w/8 + W_uk,W_uv 2 r E_kv + scales 4 (r + E + 2 E_kv)
                + W_o 2 E^2 + B (L + 1) (r l/8 + 4)                  [latent read + write]
  fp16 bytes  = 2 E (E + 2 E_kv) + 2 E^2 + B (L + 1) 4 E_kv           [K and V read + write]
  QSVD ops    = 2 B (E r + r E + (L + 1) r E_kv + H (L + 1) (d + r) + H r d + E^2)
  fp16 ops    = 2 B (E (E + 2 E_kv) + 2 H (L + 1) d + E^2)
The QSVD rebuild term 2 r E_kv per token is the RoPE price (docs: method sec. 5).

On a CPU only a smoke configuration runs (the CPU kernels accumulate in
float64; their times are no GPU claim); the GPU grid is rank {256, 512,
1024, 1536} x context {1K, 4K, 16K, 32K} x batch {1, 8, 64} x {W8A8, W8A4}.
``bench/summarize.py`` reports the rank where QSVD stops beating fp16.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from conftest import run_benchmark
from qsvd_kernels.bench_layer import make_decode_steps

E, H, D = 4096, 32, 128
QUICK = os.environ.get("QSVD_BENCH_QUICK") == "1"

GPU_GRID = list(itertools.product([256, 512, 1024, 1536], [1024, 4096, 16384, 32768], [1, 8, 64], ["W8A8", "W8A4"]))
if QUICK:
    GPU_GRID = list(itertools.product([512, 1536], [4096, 32768], [8], ["W8A8"]))
CPU_GRID = [(256, 1024, 1, "W8A8")]


def byte_op_model(rank, context, batch, quant, kv_heads=H):
    from qsvd_kernels.compress import QuantConfig

    q = QuantConfig.parse(quant)
    E_kv = kv_heads * D
    L1 = context + 1
    qsvd_bytes = (rank * E * q.w_bits / 8 * 2 + 2 * rank * E_kv + 4 * (rank + E + 2 * E_kv) + 2 * E * E
                  + batch * L1 * (rank * q.latent_bits / 8 + 4))
    fp16_bytes = 2 * E * (E + 2 * E_kv) + 2 * E * E + batch * L1 * 4 * E_kv
    qsvd_ops = 2 * batch * (2 * E * rank + L1 * rank * E_kv + H * L1 * (D + rank) + H * rank * D + E * E)
    fp16_ops = 2 * batch * (E * (E + 2 * E_kv) + 2 * H * L1 * D + E * E)
    return qsvd_bytes, qsvd_ops, fp16_bytes, fp16_ops


def _cases():
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for rank, context, batch, quant in (GPU_GRID if dev == "cuda" else CPU_GRID):
            for impl in ("qsvd", "torch_fp16"):
                yield pytest.param(dev, rank, context, batch, quant, impl,
                                   id=f"{dev}-{impl}-r{rank}-L{context}-B{batch}-{quant}")


@pytest.mark.parametrize("dev,rank,context,batch,quant,impl", list(_cases()))
def test_decode_step(benchmark, dev, rank, context, batch, quant, impl):
    rounds = 10
    try:
        qsvd_step, base_step, meta = make_decode_steps(E, H, H, rank, context, batch, quant, dev,
                                                       max_steps=rounds + 8)
    except NotImplementedError as e:
        pytest.skip(str(e))
    except torch.OutOfMemoryError:
        pytest.skip("out of device memory at this shape")
    qb, qo, fb, fo = byte_op_model(rank, context, batch, quant)
    fn = qsvd_step if impl == "qsvd" else base_step
    run_benchmark(benchmark, dev, fn, bytes_moved=qb if impl == "qsvd" else fb, flops=qo if impl == "qsvd" else fo,
                  rounds=rounds, impl=impl, rank=rank, context=context, batch=batch, quant=quant,
                  kv_bytes_per_token=meta["kv_bytes_per_token_qsvd"] if impl == "qsvd" else meta["kv_bytes_per_token_fp16"],
                  baseline_dtype=meta["baseline_dtype"])
