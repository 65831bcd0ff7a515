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
