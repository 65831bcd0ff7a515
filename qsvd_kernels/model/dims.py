"""The shape of one attention layer's Q/K/V projection."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerDims:
    """Shape of one attention layer's Q/K/V projection."""

    hidden: int  # E
    num_heads: int  # H
    num_kv_heads: int  # H_kv
    head_dim: int  # d

    def __post_init__(self):
        for name in ("hidden", "num_heads", "num_kv_heads", "head_dim"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def kv_dim(self) -> int:  # E_kv
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_dim(self) -> int:  # columns of [W_q | W_k | W_v]
        return self.q_dim + 2 * self.kv_dim

    @property
    def max_rank(self) -> int:
        return min(self.hidden, self.out_dim)

    def to_dict(self):
        return asdict(self)


# How a layer's projections share the cached latent (compress/svd.py):
# "qkv" (the paper's: q, k and v from one latent) or "kv" (k and v from the
# latent, q from its own projection of x, never cached).
LATENT_FORMS = ("qkv", "kv")


@dataclass(frozen=True)
class LatentDims:
    """One layer's shape under a latent form: what its rank costs.

    ``cols`` are the columns the latent's up-projection produces (all of
    [q | k | v], or [k | v]); a rank r costs r (hidden + cols) weights and r
    cached values per token; the "kv" form also keeps W_q whole
    (``fixed_weights`` = hidden q_dim). The budget (compress/budget.py)
    counts these; ``out_dim`` stays the original layer's, for the ratios.
    """

    dims: LayerDims
    form: str = "qkv"

    def __post_init__(self):
        if self.form not in LATENT_FORMS:
            raise ValueError(f"latent form must be one of {LATENT_FORMS}, got {self.form!r}")

    hidden = property(lambda self: self.dims.hidden)
    kv_dim = property(lambda self: self.dims.kv_dim)
    q_dim = property(lambda self: self.dims.q_dim)
    out_dim = property(lambda self: self.dims.out_dim)

    @property
    def first_col(self) -> int:
        """Where the latent's columns start in [q | k | v]."""
        return 0 if self.form == "qkv" else self.dims.q_dim

    @property
    def cols(self) -> int:
        return self.dims.out_dim - self.first_col

    @property
    def max_rank(self) -> int:
        return min(self.dims.hidden, self.cols)

    @property
    def fixed_weights(self) -> int:
        return 0 if self.form == "qkv" else self.dims.hidden * self.dims.q_dim


def latent_dims(d, form: str | None = None) -> LatentDims:
    """``d`` as LatentDims: a LayerDims in ``form`` (default "qkv"), or a LatentDims as it is."""
    if isinstance(d, LatentDims):
        if form is not None and form != d.form:
            raise ValueError(f"dims are in form {d.form!r}, not {form!r}")
        return d
    return LatentDims(d, form or "qkv")
