"""One attention layer's decode step: QSVD on the qsvd ops against the
uncompressed layer, on whatever device is present (``python -m qsvd_kernels bench``).

QSVD step (per new token of each sequence): hadamard_quant -> quant_gemm
(x -> c) -> latent_cache_append -> quant_gemm (c -> q) -> RoPE ->
latent_attention -> o_proj. Baseline step: one [E, E + 2 E_kv] GEMM -> K/V
written to a preallocated cache -> RoPE -> SDPA -> o_proj, in fp16 on a GPU
(fp32 on the CPU, which has no fast fp16 GEMM). Weights are random: timing
does not depend on them. The CPU kernels accumulate in float64 for
accuracy, so CPU times say nothing about GPU kernel speed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import reference as R
from .compress import QuantConfig
from .compress.layer import CompressedQKV
from .compress.svd import JointSVD
from .compress.whitening import Whitening
from .model.dims import LayerDims


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, steps, device):
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def make_decode_steps(hidden=1024, heads=16, kv_heads=16, rank=384, context=512, batch=1, quant="W8A8",
                      device="cpu", max_steps=64):
    """Two step functions over a context of ``context`` tokens per sequence:
    (qsvd_step, baseline_step, meta). Each call decodes one more token."""
    from . import has_kernel
    from .integrations.core import Projection
    from .integrations.hf import OpsProjector

    for name in ("quant_gemm", "latent_cache_append", "latent_attention", "hadamard_quant"):
        if not has_kernel(name, device):
            raise NotImplementedError(f"qsvd.{name} has no {device} kernel in this build: the {device} layer bench "
                                      "needs every op of the decode step")
    dims = LayerDims(hidden, heads, kv_heads, hidden // heads)
    d, H, H_kv = dims.head_dim, heads, kv_heads
    q_cfg = QuantConfig.parse(quant)
    g = torch.Generator().manual_seed(0)
    # Random orthonormal factors stand in for an SVD (timing does not depend
    # on the values, and a 7B-sized SVD would dominate the setup).
    U, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(dims.out_dim, rank, generator=g, dtype=torch.float64))
    svd = JointSVD(dims, Whitening("none"), U, torch.ones(rank, dtype=torch.float64), V.T.contiguous(), None, None)
    layer = CompressedQKV.build(svd, rank, 0.5, q_cfg, seed=0)
    W = [U @ V.T[:, lo:hi] for lo, hi in ((0, dims.q_dim), (dims.q_dim, dims.q_dim + dims.kv_dim),
                                         (dims.q_dim + dims.kv_dim, dims.out_dim))]
    W_o = torch.randn(dims.q_dim, hidden, generator=g) / hidden**0.5
    proj = OpsProjector(layer).to(device)
    total = context + max_steps + 1
    cos, sin = R.rope_tables(total, d, device=device)
    # Sequence b owns blocks [b * blocks, (b + 1) * blocks) of the paged pool.
    block_size = 16
    blocks = -(-total // block_size)
    cache = proj.cache_view(proj.new_pool(batch * blocks, block_size, device))
    block_table = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks)
    filled = {"t": 0}

    def append(p, n):  # p: the projection of n new tokens per sequence (c [batch * n, r])
        t0 = filled["t"]
        t = torch.arange(t0, t0 + n, device=device)
        slots = (block_table[:, t // block_size].long() * block_size + t % block_size).reshape(-1)
        rows = proj.core.store(p, slots, cache)
        filled["t"] = t0 + n
        return rows

    for s in range(0, context, 1024):  # the context, written as prefill chunks (random latents)
        n = min(1024, context - s)
        append(Projection(torch.randn(batch * n, rank, device=device), None, None), n)
    x = torch.randn(batch, hidden, device=device)
    dt = torch.float16 if device == "cuda" else torch.float32
    W_o_q = W_o.to(device, dt)

    def qsvd_step():
        t = filled["t"]
        p = proj.latent(x)
        rows = append(p, 1)
        q = R.apply_rope_ref(proj.queries(p, rows).view(batch, H, d), cos[t], sin[t])
        seq_lens = torch.full((batch,), t + 1, dtype=torch.int32, device=device)
        o = proj.core.decode(q.to(dt), cache, block_table, seq_lens, cos[: t + 1], sin[: t + 1], d**-0.5)
        return o.reshape(batch, -1).to(dt) @ W_o_q

    W_qkv = torch.cat(W, 1).to(device, dt)  # the uncompressed layer
    kv = torch.zeros(2, batch, H_kv, total, d, device=device, dtype=dt)
    xb = x.to(dt)
    state = {"t": context}

    def base_step():
        t = state["t"]
        y = xb @ W_qkv
        q = y[:, : dims.q_dim].view(batch, H, 1, d)
        k = y[:, dims.q_dim : dims.q_dim + dims.kv_dim].view(batch, H_kv, 1, d)
        c_, s_ = cos[t].to(dt), sin[t].to(dt)
        rot = lambda z: R.apply_rope_ref(z, c_, s_)  # noqa: E731
        kv[0, :, :, t : t + 1] = rot(k)
        kv[1, :, :, t : t + 1] = y[:, dims.q_dim + dims.kv_dim :].view(batch, H_kv, 1, d)
        state["t"] = t + 1
        o = F.scaled_dot_product_attention(rot(q), kv[0, :, :, : t + 1], kv[1, :, :, : t + 1], enable_gqa=H != H_kv)
        return o.reshape(batch, -1) @ W_o_q

    meta = {"dims": dims, "quant": q_cfg, "baseline_dtype": str(dt),
            "kv_bytes_per_token_qsvd": float(q_cfg.latent_format.row_bytes(rank)) + 4,
            "kv_bytes_per_token_fp16": 2 * dims.kv_dim * 2}
    return qsvd_step, base_step, meta


def bench_decode_layer(hidden=1024, heads=16, kv_heads=16, rank=384, context=512, batch=1, quant="W8A8",
                       device="cpu", steps=5, warmup=2) -> dict:
    qsvd_step, base_step, meta = make_decode_steps(hidden, heads, kv_heads, rank, context, batch, quant, device,
                                                   max_steps=2 * (steps + warmup))
    for _ in range(warmup):
        qsvd_step()
        base_step()
    t_qsvd = _median_time(qsvd_step, steps, device)
    t_base = _median_time(base_step, steps, device)
    dims = meta["dims"]
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "shape": {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": dims.head_dim, "rank": rank,
                  "context": context, "batch": batch, "quant": meta["quant"].name},
        "qsvd_step_ms": t_qsvd * 1e3,
        "baseline_step_ms": t_base * 1e3,
        "baseline_dtype": meta["baseline_dtype"],
        "time_ratio_qsvd_over_baseline": t_qsvd / t_base,
        "kv_bytes_per_token_qsvd": meta["kv_bytes_per_token_qsvd"],
        "kv_bytes_per_token_fp16": meta["kv_bytes_per_token_fp16"],
        "kv_bytes_ratio": meta["kv_bytes_per_token_qsvd"] / meta["kv_bytes_per_token_fp16"],
        "note": "CPU kernels accumulate in float64 (accuracy first); CPU times are not a GPU speed claim"
        if device == "cpu" else "",
    }
