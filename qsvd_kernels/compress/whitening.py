"""Calibration statistics of a layer's input, and the whitening they define.

Joint SVD is taken of ``S W_cat`` rather than ``W_cat``, with S built from the
inputs X the layer sees on calibration data:

- ``"diag"`` (ASVD): S = diag(s), s_j = (mean_n |x_nj|) ^ alpha;
- ``"cholesky"`` (SVD-LLM): S = L^T with L L^T = X^T X / n (+ jitter), so that
  truncating the SVD of S W_cat minimises the output error |X W - X W_r|_F
  exactly;
- ``"none"``: plain SVD of W_cat.

Statistics are accumulated in float64. The whitening needs S^-1 (to map the
truncated factors back); it is applied with triangular solves, never formed.
"""

from __future__ import annotations

import torch

WHITENING_KINDS = ("cholesky", "diag", "none")


class LayerStats:
    """Input statistics of one layer over calibration tokens: the Gram matrix,
    mean |x| per channel, and a uniform sample of input rows (reservoir
    sampling, seeded) for the per-layer beta search and error reports."""

    def __init__(self, dim: int, keep_rows: int = 2048, seed: int = 0):
        self.dim = dim
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.count = 0
        self.keep_rows = keep_rows
        self._rows = torch.empty(0, dim, dtype=torch.float32)
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        """Add rows of x ([n, dim], any float dtype)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected rows of size {self.dim}, got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.dim).to("cpu", torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration inputs contain NaN or Inf")
        self.gram += x.T @ x
        self.abs_sum += x.abs().sum(0)
        self.sum += x.sum(0)
        n0 = self.count
        self.count += x.shape[0]
        if self.keep_rows <= 0:
            return
        # Reservoir sampling: row i of the stream is kept with prob keep/(i+1).
        xf = x.float()
        room = self.keep_rows - self._rows.shape[0]
        if room > 0:
            self._rows = torch.cat([self._rows, xf[:room]])
            xf, n0 = xf[room:], n0 + room
        if xf.shape[0]:
            idx = torch.arange(n0, n0 + xf.shape[0], dtype=torch.float64)
            u = torch.rand(xf.shape[0], generator=self._gen, dtype=torch.float64)
            keep = u < self.keep_rows / (idx + 1)
            slots = torch.randint(0, self.keep_rows, (xf.shape[0],), generator=self._gen)
            for i in keep.nonzero().flatten().tolist():
                self._rows[slots[i]] = xf[i]

    @property
    def rows(self) -> torch.Tensor:
        """The sampled input rows [<= keep_rows, dim] (fp32)."""
        return self._rows

    def mean_gram(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration data was seen by this layer")
        return self.gram / self.count

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration data was seen by this layer")
        return self.sum / self.count


class Whitening:
    """S and its inverse's action for one layer (see module docstring)."""

    def __init__(self, kind: str, diag: torch.Tensor | None = None, chol_upper: torch.Tensor | None = None,
                 jitter: float = 0.0):
        if kind not in WHITENING_KINDS:
            raise ValueError(f"whitening must be one of {WHITENING_KINDS}, got {kind!r}")
        self.kind = kind
        self.diag = diag  # s (diag)
        self.upper = chol_upper  # S = L^T (cholesky)
        self.jitter = jitter

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """S W."""
        if self.kind == "diag":
            return self.diag[:, None] * W
        if self.kind == "cholesky":
            return self.upper @ W
        return W

    def solve(self, M: torch.Tensor) -> torch.Tensor:
        """S^-1 M."""
        if self.kind == "diag":
            return M / self.diag[:, None]
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.upper, M, upper=True)
        return M


def make_whitening(stats: LayerStats | None, kind: str, *, alpha: float = 0.5, rel_jitter: float = 1e-7) -> Whitening:
    """Whitening of ``kind`` from calibration statistics.

    Cholesky: an ill-conditioned (condition number above 1e10) or
    rank-deficient (fewer tokens than channels, dead channels) Gram matrix
    gets a jitter of rel_jitter times its mean diagonal, growing tenfold until
    the factorisation succeeds and is well conditioned.
    Diagonal: channels that never fire get the smallest positive scale seen.
    """
    if kind == "none":
        return Whitening("none")
    if stats is None:
        raise ValueError(f"whitening {kind!r} needs calibration statistics")
    if kind == "diag":
        s = (stats.abs_sum / max(stats.count, 1)) ** alpha
        positive = s[s > 0]
        if positive.numel() == 0:
            raise ValueError("every input channel was zero on the calibration data")
        return Whitening("diag", diag=torch.clamp(s, min=float(positive.min())))
    if kind != "cholesky":
        raise ValueError(f"whitening must be one of {WHITENING_KINDS}, got {kind!r}")
    C = stats.mean_gram()
    scale = float(C.diagonal().mean())
    if not scale > 0:
        raise ValueError("the calibration Gram matrix is zero")
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    jitter = 0.0
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(C + jitter * scale * eye)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            d = L.diagonal()
            # cond(C) ~ (max d / min d)^2: beyond 1e10, S^-1 would amplify
            # directions the calibration data never explored.
            if float((d.min() / d.max()) ** 2) > 1e-10:
                return Whitening("cholesky", chol_upper=L.T.contiguous(), jitter=jitter)
        jitter = rel_jitter if jitter == 0 else jitter * 10
    raise ValueError("the calibration Gram matrix could not be factorised even with jitter")
