"""``python -m qsvd_kernels demo``: one compressed attention layer, decoded
token by token on the qsvd ops, offline, on the CPU.

The layer is a toy (random weights with a decaying spectrum, so a low rank
captures most of it); the point is to show the whole decode path running on
the kernels and what it saves:

    x --hadamard_quant--> x_q --quant_gemm(W_d)--> c --latent_cache_append--> cache
    c --quant_gemm(W_uq)--> q --RoPE--> latent_attention(cache, W_uk, W_uv) --> out

and to compare ``out`` with the uncompressed fp32 layer.
"""

from __future__ import annotations

import math
import time

import torch

from . import build_info, ops
from . import reference as R


def _random_layer(E, E_kv, g):
    """W_q, W_k, W_v with a decaying singular spectrum (like trained weights)."""
    def mat(n_out):
        U, _ = torch.linalg.qr(torch.randn(E, E, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))
        k = min(E, n_out)
        s = torch.exp(-torch.arange(k, dtype=torch.float64) / (k / 6))
        return (U[:, :k] * s) @ V[:, :k].T / math.sqrt(E) * 4
    return mat(E), mat(E_kv), mat(E_kv)


def _quantize_weight(w_t):
    """Per-output-channel INT8 of a [N, K] weight: codes, scales."""
    codes, scale = R.quantize_rows_ref(w_t.float(), 8)
    return codes, scale


def run_demo(E=512, H=8, H_kv=2, r=192, steps=96, seed=0, out=print):
    d = E // H
    E_kv = H_kv * d
    g = torch.Generator().manual_seed(seed)
    info = build_info()
    out(f"qsvd-kernels {info['version']} (torch {torch.__version__})")
    backends = "CPU" + (f" + CUDA ({info['cuda_archs']})" if info["cuda"] else "")
    out(f"  kernels built: {backends}; GPU visible: {info['gpu'] or 'none'}; running on: cpu")
    out(f"\nLayer: E={E}, H={H} query heads, H_kv={H_kv} kv heads, d={d}, RoPE; latent rank r={r}; W8A8, INT8 latent")

    W_q, W_k, W_v = _random_layer(E, E_kv, g)
    # Joint SVD of [W_q | W_k | W_v]: one shared down-projection (beta = 0.5).
    U, S, Vh = torch.linalg.svd(torch.cat([W_q, W_k, W_v], dim=1), full_matrices=False)
    W_d = U[:, :r] * S[:r].sqrt()                     # [E, r]
    W_u = S[:r].sqrt()[:, None] * Vh[:r]              # [r, E + 2 E_kv]
    W_uq, W_uk, W_uv = W_u[:, :E], W_u[:, E:E + E_kv], W_u[:, E + E_kv:]
    energy = float((S[:r] ** 2).sum() / (S**2).sum())

    # H1: randomised Hadamard on x, folded into W_d: x W_d = (x s) H  H^T diag(s) W_d.
    signs = (torch.randint(0, 2, (E,), generator=g) * 2 - 1).float()
    W_d_rot = R.hadamard_matrix(E).T @ (signs.double()[:, None] * W_d)
    wd_codes, wd_scale = _quantize_weight(W_d_rot.T)  # b operand [r, E]
    wq_codes, wq_scale = _quantize_weight(W_uq.T)     # [E, r]
    # Per kv head [H_kv, r, d] int8 with per-(head, channel) scales.
    def head_weights(W):
        w = W.reshape(r, H_kv, d).permute(1, 0, 2)                # [H_kv, r, d]
        s = w.abs().amax(dim=1) / 127
        return torch.round(w / s[:, None, :]).clamp(-127, 127).to(torch.int8), s.float()
    wk_codes, wk_scale = head_weights(W_uk)
    wv_codes, wv_scale = head_weights(W_uv)

    block_size = 16
    cache = torch.zeros(steps // block_size + 2, block_size, r, dtype=torch.int8)
    cache_scale = torch.zeros(cache.shape[:2])
    block_table = torch.arange(cache.shape[0], dtype=torch.int32)[None]
    cos, sin = R.rope_tables(steps, d)
    sm_scale = d**-0.5

    xs = torch.randn(steps, E, generator=g)
    outs = []
    t0 = time.perf_counter()
    for t in range(steps):
        x = xs[t : t + 1]
        x_codes, x_scale = ops.hadamard_quant(x, 8, 1.0, signs)
        c = ops.quant_gemm(x_codes, x_scale, wd_codes, wd_scale, 8, 8, torch.float32)  # latent [1, r]
        ops.latent_cache_append(c, torch.tensor([t]), cache, cache_scale, 8)
        c_codes, c_scale = R.quantize_rows_ref(c, 8)
        q = ops.quant_gemm(c_codes, c_scale, wq_codes, wq_scale, 8, 8, torch.float32).view(1, H, d)
        q = R.apply_rope_ref(q, cos[t], sin[t])
        o, _ = ops.latent_attention(q, cache, cache_scale, block_table, torch.tensor([t + 1], dtype=torch.int32),
                                    wk_codes, wk_scale, wv_codes, wv_scale, 8, sm_scale, cos, sin)
        outs.append(o)
    elapsed = time.perf_counter() - t0
    got = torch.cat(outs).double()  # [steps, H, d]

    # The uncompressed fp32 layer: causal attention with explicit K, V.
    def dense(Wq, Wk, Wv):
        X = xs.double()
        Q = (X @ Wq).view(steps, H, d)
        K = (X @ Wk).view(steps, H_kv, d)
        V = (X @ Wv).view(steps, H_kv, d)
        pos_cos, pos_sin = cos.double()[:, None], sin.double()[:, None]
        Q, K = R.apply_rope_ref(Q, pos_cos, pos_sin), R.apply_rope_ref(K, pos_cos, pos_sin)
        K = K.repeat_interleave(H // H_kv, 1)
        V = V.repeat_interleave(H // H_kv, 1)
        scores = torch.einsum("qhd,khd->hqk", Q, K) * sm_scale
        scores = scores.masked_fill(torch.ones(steps, steps, dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), V)

    ref_full = dense(W_q, W_k, W_v)
    ref_lowrank = dense(W_d @ W_uq, W_d @ W_uk, W_d @ W_uv)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def cos_sim(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())

    fp16_kv = 2 * E_kv * 2
    latent = r * 1 + 4
    R1 = (r * (E + E + 2 * E_kv)) / (E * (E + 2 * E_kv))
    out(f"  joint SVD keeps {energy:.1%} of [W_q|W_k|W_v]'s energy at r={r}")
    out(f"\nDecoded {steps} tokens one at a time in {elapsed:.2f} s (CPU kernels).")
    out("  output vs the uncompressed fp32 layer:")
    out(f"    rank-{r} fp32 (no quantization):  rel. error {rel(ref_lowrank, ref_full):.4f}, "
        f"cosine {cos_sim(ref_lowrank, ref_full):.5f}")
    out(f"    qsvd kernels (W8A8, INT8 latent): rel. error {rel(got, ref_full):.4f}, cosine {cos_sim(got, ref_full):.5f}")
    out(f"    quantization alone (vs rank-{r} fp32): rel. error {rel(got, ref_lowrank):.4f}")
    out("  memory per token per layer:")
    out(f"    KV cache: {latent} B (r INT8 codes + fp32 scale) vs fp16 K/V {fp16_kv} B -> {latent / fp16_kv:.1%}")
    out(f"    QKV weights (fp16 equivalent): R1 = {R1:.1%} of the original; at INT8 {R1 / 2:.1%}")
    return {"rel_error": rel(got, ref_full), "cache_ratio": latent / fp16_kv}
