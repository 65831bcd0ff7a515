"""Compression budgets: the paper's R1 / R2, generalised to grouped-query
attention and to bit widths.

For a layer with hidden size E, query width E_q = H d (usually E) and
E_kv = H_kv d (E_kv = E_q for plain multi-head attention) at rank r, with
out = E_q + 2 E_kv:

    weights   compressed  r (E + cols) + fixed [W_d: E x r, W_u: r x cols]
              original    E out                [W_q | W_k | W_v]
    KV cache  compressed  r values per token   (the latent)
              original    2 E_kv values per token

    R1 = sum_l (r_l (E + cols) + fixed) * w_bits / sum_l E out * 16
    R2 = sum_l r_l * latent_bits                / sum_l 2 E_kv * 16   (over the layers that keep a
                                                                   KV cache: a VLM's decoder, not its
                                                                   vision tower; every layer when none
                                                                   does, e.g. an encoder-only model)

where ``cols`` and ``fixed`` depend on the latent form (model.dims.LatentDims):
cols = out and fixed = 0 for the paper's joint QKV latent; cols = 2 E_kv and
fixed = E E_q (W_q kept whole) for the "kv" form. Functions here take
LayerDims (the "qkv" form) or LatentDims.

With E_q = E_kv = E and the "qkv" form these are the paper's R1 = 4 r / 3 E and R2 = r / 2 E
(times bits / 16 when quantized: W8A8 at r = 0.75 E gives R1 = 50 %,
R2 = 18.75 %). A Budget whose bits are None takes them from the quantization
setting (CompressionConfig does this), as the paper counts; give bits 16
explicitly for a pure rank budget ("the ranks of an R2 = 30 % fp16 cache").
``cache_bytes_per_token`` also counts the per-token fp32 scale that a
quantized latent carries; R2 follows the paper and does not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..model.dims import LayerDims, latent_dims  # noqa: F401  (LayerDims also re-exported from here)


@dataclass(frozen=True)
class Budget:
    """A compression target: ``kind`` is "r1", "r2" or "mean_rank".

    For "r1" and "r2", ``value`` is a fraction (0.15 for 15 %); for
    "mean_rank" it is the mean rank over layers. ``w_bits`` and
    ``latent_bits`` enter R1 and R2 as in the paper; None means "those of
    the quantization setting" (see ``resolved``), 16 when used alone.
    """

    kind: str
    value: float
    w_bits: int | None = None
    latent_bits: int | None = None

    def __post_init__(self):
        if self.kind not in ("r1", "r2", "mean_rank"):
            raise ValueError(f"budget kind must be 'r1', 'r2' or 'mean_rank', got {self.kind!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"budget value must be a positive finite number, got {self.value!r}")
        if self.kind in ("r1", "r2") and self.value >= 1.0:
            raise ValueError(f"{self.kind.upper()} = {self.value:.1%} compresses nothing: it must be below 100 %")
        for name in ("w_bits", "latent_bits"):
            if getattr(self, name) not in (None, 4, 8, 16):
                raise ValueError(f"{name} must be 4, 8 or 16, got {getattr(self, name)}")

    def resolved(self, w_bits: int, latent_bits: int) -> "Budget":
        """This budget with unset bit widths taken from a quantization setting."""
        return Budget(self.kind, self.value, self.w_bits if self.w_bits is not None else w_bits,
                      self.latent_bits if self.latent_bits is not None else latent_bits)

    def rank_units(self, dims: list[LayerDims], caches: list[bool] | None = None) -> tuple[list[float], float]:
        """The budget as a linear constraint sum_l cost_l * r_l <= limit.
        ``caches`` marks the layers that keep a KV cache (None: all); R2
        counts only those, so the others cost 0 under an R2 budget."""
        dims = [latent_dims(d) for d in dims]
        if self.kind == "mean_rank":
            return [1.0] * len(dims), self.value * len(dims)
        w_bits = self.w_bits or 16
        latent_bits = self.latent_bits or 16
        if self.kind == "r1":
            cost = [(d.hidden + d.cols) * w_bits for d in dims]
            total = sum(d.hidden * d.out_dim * 16 for d in dims)
            # weights a rank does not scale (the "kv" form's whole W_q) come off the top
            return cost, self.value * total - sum(d.fixed_weights * w_bits for d in dims)
        else:
            keep = _cache_mask(dims, caches)
            cost = [float(latent_bits) if k else 0.0 for k in keep]
            total = sum(2 * d.kv_dim * 16 for d, k in zip(dims, keep) if k)
        return cost, self.value * total

    def to_dict(self):
        return asdict(self)


def _cache_mask(dims: list[LayerDims], caches: list[bool] | None) -> list[bool]:
    if caches is None:
        return [True] * len(dims)
    if len(caches) != len(dims):
        raise ValueError(f"caches has {len(caches)} flags for {len(dims)} layers")
    return [bool(c) for c in caches]


def achieved(ranks: list[int], dims: list[LayerDims], w_bits: int = 16, latent_bits: int = 16,
             caches: list[bool] | None = None) -> dict:
    """R1, R2, mean rank and bytes of an allocation. R1 and the weight bytes
    count every compressed layer; R2 and the cache bytes only the layers that
    keep a KV cache (``caches``; None: all, as for a decoder-only or an
    encoder-only model)."""
    dims = [latent_dims(d) for d in dims]
    keep = _cache_mask(dims, caches)
    cached = [(r, d) for r, d, k in zip(ranks, dims, keep) if k]
    weights = sum(r * (d.hidden + d.cols) + d.fixed_weights for r, d in zip(ranks, dims))
    r1 = weights * w_bits / (sum(d.hidden * d.out_dim for d in dims) * 16)
    r2 = sum(r for r, _ in cached) * latent_bits / (sum(2 * d.kv_dim for _, d in cached) * 16) if cached else 0.0
    return {
        "r1": r1,
        "r2": r2,
        "mean_rank": sum(ranks) / len(ranks),
        "weight_bytes": weights * w_bits / 8,
        "original_weight_bytes_fp16": sum(d.hidden * d.out_dim for d in dims) * 2,
        "cache_bytes_per_token": cache_bytes_per_token([r for r, _ in cached], latent_bits),
        "original_cache_bytes_per_token_fp16": sum(2 * d.kv_dim for _, d in cached) * 2,
    }


def cache_bytes_per_token(ranks: list[int], latent_bits: int) -> float:
    """Latent cache bytes per token over all layers, scales included."""
    scale = 4 if latent_bits < 16 else 0
    return sum(r * latent_bits / 8 + scale for r in ranks)
