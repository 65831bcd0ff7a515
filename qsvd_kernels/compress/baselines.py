"""Baselines QSVD is measured against.

- The per-matrix baseline (ASVD / SVD-LLM style): K and V each get their
  own whitened SVD and their own latent; Q is left alone. At the same KV
  budget the cache holds r_k + r_v values per token (against QSVD's single
  r), and Q costs its full E x E_q weight. This is what QSVD's joint
  factorisation is compared with.
- Plain KV-cache quantization (``KVQuant``): no SVD, K and V quantized per
  token and head: what a latent must beat at the same bytes per token.
"""

from __future__ import annotations

import torch

from .. import reference as R
from ..model.dims import LayerDims
from .budget import Budget
from .quant import fake_quant_rows
from .whitening import Whitening


class PerMatrixKV:
    """Low-rank W_k ~ A_k B_k and W_v ~ A_v B_v (whitened SVD each), exact W_q."""

    def __init__(self, W_q, W_k, W_v, bias, dims: LayerDims, whitening: Whitening, rank_k: int, rank_v: int):
        self.dims = dims
        self.W_q = W_q.to(torch.float64)
        self.bias = bias.to(torch.float64) if bias is not None else None
        self.factors = []
        for W, r in ((W_k, rank_k), (W_v, rank_v)):
            W = W.to(torch.float64)
            U, s, Vh = torch.linalg.svd(whitening.apply(W), full_matrices=False)
            r = min(r, s.numel())
            self.factors.append((whitening.solve(U[:, :r] * s[:r]), Vh[:r]))
        self.ranks = (rank_k, rank_v)

    def project(self, x):
        x64 = x.to(torch.float64)
        q = x64 @ self.W_q
        k = (x64 @ self.factors[0][0]) @ self.factors[0][1]
        v = (x64 @ self.factors[1][0]) @ self.factors[1][1]
        y = torch.cat([q, k, v], dim=-1)
        if self.bias is not None:
            y = y + self.bias
        d = self.dims
        y = y.to(x.dtype)
        return y[..., : d.q_dim], y[..., d.q_dim : d.q_dim + d.kv_dim], y[..., d.q_dim + d.kv_dim :]


def per_matrix_kv_baseline(compressor, budget: Budget, whitening: str = "cholesky", align: int = 16) -> list:
    """Projectors for every layer of ``compressor`` (a pipeline.Compressor),
    with r_k = r_v chosen uniformly so that sum(r_k + r_v) meets the R2 budget
    (the cache stores both latents)."""
    if budget.kind != "r2":
        raise ValueError("the per-matrix K/V baseline is defined for an R2 (KV cache) budget")
    dims = compressor.dims
    per_layer_values = budget.value * sum(2 * d.kv_dim for d in dims) * 16 / budget.latent_bits / len(dims)
    r_each = max(align, int(per_layer_values / 2 // align) * align)
    out = []
    for s, svd in zip(compressor.sites, compressor.svds(whitening)):
        W_q, W_k, W_v, bias = s.weights()
        out.append(PerMatrixKV(W_q, W_k, W_v, bias, s.dims, svd.whitening, r_each, r_each))
    return out


class KVQuant:
    """Plain KV-cache quantization, no SVD: q, k and v from the original
    weights, then k (before RoPE, as KVQuant quantizes keys) and v quantized
    per token and per KV head to ``bits`` (symmetric, round half to even,
    fp32 scale per head and token), optionally after a Hadamard rotation of
    each head's d values (QuaRot-style outlier spreading; undone after
    dequantization, so attention sees the rotated-back values). What the
    cache would hold: 2 E_kv codes and 2 H_kv fp32 scales per token."""

    def __init__(self, W_q, W_k, W_v, bias, dims: LayerDims, bits: int, rotate: bool = False):
        self.dims, self.bits, self.rotate = dims, bits, rotate
        self.W = torch.cat([W_q, W_k, W_v], dim=1).to(torch.float64)
        self.bias = bias.to(torch.float64) if bias is not None else None
        self.H = R.hadamard_matrix(dims.head_dim) if rotate else None

    def token_nbytes(self) -> float:
        d = self.dims
        return 2 * d.kv_dim * self.bits / 8 + 2 * d.num_kv_heads * 4

    def _fake_quant(self, t):
        d = self.dims
        heads = t.reshape(*t.shape[:-1], d.num_kv_heads, d.head_dim)
        if self.H is not None:
            heads = heads @ self.H
        q = fake_quant_rows(heads.to(torch.float32), self.bits, 1.0).to(torch.float64)
        if self.H is not None:
            q = q @ self.H.T
        return q.reshape(t.shape)

    def project(self, x):
        y = x.to(torch.float64) @ self.W
        if self.bias is not None:
            y = y + self.bias
        d = self.dims
        q, k, v = y[..., : d.q_dim], y[..., d.q_dim : d.q_dim + d.kv_dim], y[..., d.q_dim + d.kv_dim :]
        return q.to(x.dtype), self._fake_quant(k).to(x.dtype), self._fake_quant(v).to(x.dtype)


def kv_quant_baseline(compressor, bits: int, rotate: bool = False) -> list:
    """KVQuant projectors for every layer of ``compressor`` (a pipeline.Compressor)."""
    out = []
    for s in compressor.sites:
        W_q, W_k, W_v, bias = s.weights()
        out.append(KVQuant(W_q, W_k, W_v, bias, s.dims, bits, rotate))
    return out
