"""Joint SVD of the projections that share one latent, per layer.

Two latent forms (``LATENT_FORMS``):

- ``"qkv"``, the paper's: the SVD covers ``W_cat = [W_q | W_k | W_v]``; q, k
  and v all come from the cached latent.
- ``"kv"``: the SVD covers ``[W_k | W_v]`` only; q comes from its own
  projection of x (W_q kept whole, quantized like W_d), which is never
  cached. On grouped-query models (2 E_kv < E) the latent then spends its
  rank on K and V alone instead of mostly on Q.

With whitening S (whitening.py) and an optional output metric T
(metric.py: where attention sees the errors), ``S W_lat T = U Sigma V^T``
where W_lat is the covered part. Keeping r singular values and splitting
them with the exponent beta:

    W_d = S^-1 U_r Sigma_r^beta           [E, r]     (shared: c = x W_d)
    W_u = Sigma_r^(1-beta) V_r^T T^-1      [r, cols]  ([W_uq | W_uk | W_uv], or [W_uk | W_uv])

so ``x W_lat ~= (x W_d) W_u`` for every beta. Weights use the row-vector
convention (W = nn.Linear.weight.T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.dims import LATENT_FORMS, LayerDims, LatentDims
from .metric import OutputMetric
from .whitening import Whitening


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} NaN or Inf entries; refusing to factorise it")


@dataclass
class JointSVD:
    dims: LayerDims
    whitening: Whitening
    U: torch.Tensor  # [E, k] float64
    sigma: torch.Tensor  # [k]
    Vh: torch.Tensor  # [k, out]
    W_cat: torch.Tensor  # [E, out] float64, the original [W_q | W_k | W_v]
    bias: torch.Tensor | None  # [out] float64
    form: str = "qkv"  # which columns the SVD covers (module docstring)
    metric: OutputMetric | None = None  # T on the covered columns (None: the identity)

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    @property
    def latent_dims(self) -> LatentDims:
        return LatentDims(self.dims, self.form)

    @property
    def W_q(self) -> torch.Tensor:
        """W_q [E, E_q] float64: the projection the "kv" form keeps whole."""
        return self.W_cat[:, : self.dims.q_dim]

    def factors(self, rank: int, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_d [E, r], W_u [r, out]) in float64."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        s = self.sigma[:rank]
        W_d = self.whitening.solve(self.U[:, :rank] * s**beta)
        W_u = s[:, None] ** (1.0 - beta) * self.Vh[:rank]
        if self.metric is not None:
            W_u = self.metric.solve(W_u)
        return W_d, W_u

    def output_error(self, X: torch.Tensor, rank: int) -> float:
        """|X W_cat - X W_d W_u|_F / |X W_cat|_F on rows X."""
        X = X.to(torch.float64)
        W_d, W_u = self.factors(rank)
        Y = X @ self.W_cat[:, self.latent_dims.first_col :]
        return float((Y - (X @ W_d) @ W_u).norm() / Y.norm())


def joint_svd(W_q: torch.Tensor, W_k: torch.Tensor, W_v: torch.Tensor, dims: LayerDims, whitening: Whitening,
              bias: torch.Tensor | None = None, form: str = "qkv", metric=None) -> JointSVD:
    """Joint SVD of one layer in latent ``form`` ("qkv" or "kv"). W_q [E, H d],
    W_k / W_v [E, H_kv d] (row-vector convention), in any float dtype;
    computed in float64. ``metric``: an OutputMetric on the covered columns,
    or a function ``(W_cat float64, bias float64 or None) -> OutputMetric``."""
    if form not in LATENT_FORMS:
        raise ValueError(f"form must be one of {LATENT_FORMS}, got {form!r}")
    for name, w, cols in (("W_q", W_q, dims.q_dim), ("W_k", W_k, dims.kv_dim), ("W_v", W_v, dims.kv_dim)):
        if tuple(w.shape) != (dims.hidden, cols):
            raise ValueError(f"{name} must have shape [{dims.hidden}, {cols}], got {tuple(w.shape)}")
        check_finite(name, w)
    W_cat = torch.cat([W_q, W_k, W_v], dim=1).to(torch.float64)
    if bias is not None:
        check_finite("the bias", bias)
        bias = bias.to(torch.float64)
    if callable(metric) and not isinstance(metric, OutputMetric):
        metric = metric(W_cat, bias)
    M = whitening.apply(W_cat[:, LatentDims(dims, form).first_col :])
    if metric is not None:
        M = metric.apply(M)
    check_finite("the whitened weight", M)
    U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
    return JointSVD(dims, whitening, U, sigma, Vh, W_cat, bias, form, metric)
