"""Where attention can see a projection's error: a metric on the output
columns of q, k and v, so the joint SVD truncates what attention ignores.

Input whitening (whitening.py) makes the SVD of ``S W`` minimise the error
of the projection's outputs, ``|X W - X W_r|``, every output column counted
alike. Attention does not use them alike:

- a key error ``e`` changes scores by ``q R(t - s) e`` (RoPE rotates q and k
  by their positions t >= s), so it matters in the directions the group's
  queries point to: ``M_k = E_delta[R(delta) C_q R(delta)^T]`` with
  ``C_q = sum over the group's query heads of E[q^T q]``;
- a query error the same way through the keys:
  ``M_q = E_delta[R(-delta) C_k R(-delta)^T]``;
- a value error ``e`` reaches the layer's output through o_proj:
  ``M_v = sum over the group's query heads h of W_o,h^T W_o,h``.

Without RoPE (encoders) R is the identity. The average over relative
distances delta (uniform on [0, context)) is exact in closed form: the
rotation is one 2x2 block per frequency (rotate-half pairs i, i + d/2), so
``E[R C R^T]`` is C's four d/2 x d/2 blocks times expectations of
cos/sin products (``rope_average``). The q, k and v statistics come from
the input Gram matrix the whitening already has (``E[q^T q] = W_q^T E[x^T
x] W_q``, plus bias terms), so nothing new is collected.

The SVD is then taken of ``S W T`` with ``T`` = blockdiag(M_h^(1/2)) over
the heads the latent covers, and the up-projection is mapped back by
``T^-1``. Each of q, k and v is scaled so that its weighted energy equals
its plain output energy: the metric reshapes errors within a projection and
leaves the balance between q, k and v as plain whitening has it.
"""

from __future__ import annotations

import math

import torch

from ..model.dims import LayerDims


class OutputMetric:
    """T = blockdiag(T_h) over the output columns (one d x d block per head,
    in column order), symmetric positive definite, with its inverse."""

    def __init__(self, blocks: torch.Tensor, inverse: torch.Tensor):
        self.blocks, self.inverse = blocks, inverse  # [n_heads, d, d] float64

    def _right(self, M: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        n, d, _ = blocks.shape
        lead = M.shape[:-1]
        return torch.einsum("...hi,hij->...hj", M.reshape(*lead, n, d), blocks).reshape(*lead, n * d)

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """W T (columns weighted)."""
        return self._right(W, self.blocks)

    def solve(self, M: torch.Tensor) -> torch.Tensor:
        """M T^-1."""
        return self._right(M, self.inverse)

    def solve_columns(self, V: torch.Tensor) -> torch.Tensor:
        """T^-T V for V [n d, k] (T is symmetric)."""
        return self.solve(V.T).T


def rope_expectations(inv_freq: torch.Tensor, context: int, sign: float = 1.0) -> tuple[torch.Tensor, ...]:
    """E over delta uniform on {0, .., context - 1} of c_a c_b, s_a s_b,
    c_a s_b and s_a c_b, with c_a = cos(sign delta w_a), s_a = sin(sign
    delta w_a): four [d/2, d/2] float64 matrices (closed forms of sums of
    cosines)."""
    w = inv_freq.to(torch.float64) * sign
    n = context

    def mean_cos(x):  # (1/n) sum_{t<n} cos(x t)
        half = x / 2
        small = half.abs() < 1e-12
        ratio = torch.where(small, torch.full_like(x, float(n)),
                            torch.sin(n * half) / torch.where(small, torch.ones_like(half), torch.sin(half)))
        return torch.where(small, torch.ones_like(x), ratio * torch.cos((n - 1) * half) / n)

    def mean_sin(x):
        half = x / 2
        small = half.abs() < 1e-12
        ratio = torch.sin(n * half) / torch.where(small, torch.ones_like(half), torch.sin(half))
        return torch.where(small, torch.zeros_like(x), ratio * torch.sin((n - 1) * half) / n)

    plus, minus = w[:, None] + w[None, :], w[:, None] - w[None, :]
    cc = (mean_cos(minus) + mean_cos(plus)) / 2
    ss = (mean_cos(minus) - mean_cos(plus)) / 2
    cs = (mean_sin(plus) - mean_sin(minus)) / 2  # E[cos a sin b] = (sin(a+b) - sin(a-b)) / 2
    sc = cs.T
    return cc, ss, cs, sc


def rope_average(C: torch.Tensor, expectations) -> torch.Tensor:
    """E[R C R^T] for the rotate-half rotation R (R[i, i] = R[i+h, i+h] = cos,
    R[i, i+h] = -sin, R[i+h, i] = sin) given ``rope_expectations``."""
    cc, ss, cs, sc = expectations
    h = C.shape[0] // 2
    A, B, Bt, D = C[:h, :h], C[:h, h:], C[h:, :h], C[h:, h:]
    tl = cc * A - sc * Bt - cs * B + ss * D
    tr = cs * A - ss * Bt + cc * B - sc * D
    bl = sc * A + cc * Bt - ss * B - cs * D
    br = ss * A + cs * Bt + sc * B + cc * D
    return torch.cat([torch.cat([tl, tr], 1), torch.cat([bl, br], 1)], 0)


def _sqrt_pd(M: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^(1/2), M^(-1/2)) of a symmetric PSD matrix, eigenvalues floored at
    ``floor`` times their mean (directions attention never sees still get a
    finite inverse)."""
    M = (M + M.T) / 2
    lam, Q = torch.linalg.eigh(M)
    lam = lam.clamp(min=floor * max(float(lam.clamp(min=0).mean()), 1e-300))
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def _second_moments(W: torch.Tensor, b: torch.Tensor | None, gram: torch.Tensor, mean: torch.Tensor | None,
                    heads: int, d: int) -> torch.Tensor:
    """E[y_h^T y_h] per head for y = x W + b: [heads, d, d]."""
    C = W.T @ gram @ W
    if b is not None:
        m = mean @ W if mean is not None else torch.zeros_like(b)
        C = C + m[:, None] * b[None, :] + b[:, None] * m[None, :] + b[:, None] * b[None, :]
    idx = torch.arange(heads)
    return C.reshape(heads, d, heads, d)[idx, :, idx, :]


def attention_output_metric(dims: LayerDims, form: str, W_cat: torch.Tensor, bias: torch.Tensor | None,
                            gram: torch.Tensor, mean: torch.Tensor | None, W_o: torch.Tensor | None,
                            inv_freq: torch.Tensor | None, context: int = 1024) -> OutputMetric:
    """The metric of the columns the latent covers ("qkv": q, k, v; "kv": k, v).

    W_cat [E, q_dim + 2 kv_dim] float64 (row-vector convention), bias the
    concatenated bias or None, gram E[x^T x] and mean E[x] of the layer
    input, W_o the output projection's weight [E_out, q_dim] (None: values
    are weighted uniformly), inv_freq the RoPE frequencies [d/2] (None: no
    RoPE)."""
    H, Hk, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    rep = H // Hk
    qd, kd = dims.q_dim, dims.kv_dim
    Wq, Wk, Wv = W_cat[:, :qd], W_cat[:, qd : qd + kd], W_cat[:, qd + kd :]
    bq, bk, bv = (None, None, None) if bias is None else (bias[:qd], bias[qd : qd + kd], bias[qd + kd :])
    Cq = _second_moments(Wq, bq, gram, mean, H, d)  # [H, d, d]
    Ck = _second_moments(Wk, bk, gram, mean, Hk, d)
    Cv = _second_moments(Wv, bv, gram, mean, Hk, d)
    if inv_freq is not None:
        fwd, back = rope_expectations(inv_freq, context, 1.0), rope_expectations(inv_freq, context, -1.0)
        Mk = torch.stack([rope_average(Cq[g * rep : (g + 1) * rep].sum(0), fwd) for g in range(Hk)])
        Mq = torch.stack([rope_average(Ck[h // rep], back) for h in range(H)])
    else:
        Mk = torch.stack([Cq[g * rep : (g + 1) * rep].sum(0) for g in range(Hk)])
        Mq = torch.stack([Ck[h // rep] for h in range(H)])
    if W_o is not None:
        Wo = W_o.to(torch.float64).reshape(W_o.shape[0], H, d)  # [E_out, H, d]
        per_head = torch.einsum("ehi,ehj->hij", Wo, Wo)
        Mv = torch.stack([per_head[g * rep : (g + 1) * rep].sum(0) for g in range(Hk)])
    else:
        Mv = torch.eye(d, dtype=torch.float64).expand(Hk, d, d)

    def part(M, C):
        """T blocks for one projection, scaled so tr(T C T) = tr(C) (its plain output energy)."""
        roots = [_sqrt_pd(m) for m in M]
        T = torch.stack([r[0] for r in roots])
        Ti = torch.stack([r[1] for r in roots])
        weighted = sum(float(torch.trace(t @ c @ t)) for t, c in zip(T, C))
        plain = float(sum(torch.trace(c) for c in C))
        alpha = math.sqrt(plain / weighted) if weighted > 0 and plain > 0 else 1.0
        return T * alpha, Ti / alpha

    parts = [part(Mk, Ck), part(Mv, Cv)]
    if form == "qkv":
        parts.insert(0, part(Mq, Cq))
    return OutputMetric(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
