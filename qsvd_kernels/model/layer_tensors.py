"""The one schema of a compressed attention layer as the kernels run it:
its settings (``QSVDLayerSpec``) and the names, shapes, dtypes and
tensor-parallel sharding of its operands (``QSVDLayerSpec.tensors``).

``CompressedQKV.kernel_tensors`` produces exactly these tensors, export
writes them (``model.layers.{i}.self_attn.qsvd.{name}``) with each layer's
spec in the config, the Hugging Face projector holds them as buffers, and
the vLLM layer declares its parameters from them. Sharding by head:
``"q_rows"`` tensors are split by query head (rows of d), ``"kv_heads"``
ones by KV head (replicated when there are fewer KV heads than ranks),
``"whole"`` ones (the down-projection and its latent) are replicated.

Operands (E hidden, r rank, H / H_kv heads, d head size; w: weight codes):

    signs      [E] fp32                 H1's diagonal (hadamard_quant of x)
    wd         [r, w-row(E)]            x -> c (quant_gemm b operand)
    wd_scale   [r] fp32
    wuq        [H d, w-row(r)]          "qkv" form: c -> q
    wuq_scale  [H d] fp32
    wq         [H d, w-row(E)]          "kv" form: x -> q, on the same activation codes as wd
    wq_scale   [H d] fp32
    wuk, wuv   [H_kv, r, d] int8        latent_attention / latent_reconstruct_kv weights
    wuk_scale, wuv_scale [H_kv, d] fp32
    bq [H d], bk [H_kv d], bv [H_kv d]  fp32 biases, when the layer has them
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..formats import code_format, packed_row_bytes
from .dims import LATENT_FORMS, LayerDims

BIAS_NAMES = ("bq", "bk", "bv")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str  # "whole" | "q_rows" | "kv_heads"


@dataclass(frozen=True)
class QSVDLayerSpec:
    """One compressed layer's settings as the kernels need them (heads may be
    one tensor-parallel rank's share: ``local``)."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rank: int
    form: str  # the latent form (model.dims.LATENT_FORMS)
    w_bits: int
    a_bits: int
    latent_bits: int
    a_clip: float
    latent_clip: float
    # Partial RoPE (issue 22): the rotary pairs (pair j rotates head dims j and
    # j + d/2 of the original layout at the model's frequency j), laid out
    # first (reference.partial_rope_permutation: q's and k's head dims are
    # stored permuted); the other dims are position-free. None: every pair
    # rotary (full RoPE, the original layout).
    rope_pairs: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.form not in LATENT_FORMS:
            raise ValueError(f"latent form must be one of {LATENT_FORMS}, got {self.form!r}")
        if self.rope_pairs is not None:
            pairs = tuple(int(j) for j in self.rope_pairs)
            if len(set(pairs)) != len(pairs) or any(j < 0 or j >= self.head_dim // 2 for j in pairs):
                raise ValueError(f"rope_pairs must be distinct pair indices in [0, {self.head_dim // 2}), got "
                                 f"{self.rope_pairs}")
            object.__setattr__(self, "rope_pairs", pairs)
        for name in ("w_bits", "a_bits", "latent_bits"):
            code_format(getattr(self, name))  # the kernels need quantized weights, activations and latent
        if self.rank < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"bad layer spec: rank {self.rank}, {self.num_heads} heads, {self.num_kv_heads} kv heads")

    @classmethod
    def of(cls, dims: LayerDims, rank: int, quant, form: str = "qkv", rope_pairs=None) -> "QSVDLayerSpec":
        """From a layer's dims, rank, quantization setting (anything with
        w_bits, a_bits, latent_bits, a_clip, latent_clip), latent form and
        rotary pairs (None: full RoPE)."""
        return cls(dims.hidden, dims.num_heads, dims.num_kv_heads, dims.head_dim, int(rank), form,
                   int(quant.w_bits), int(quant.a_bits), int(quant.latent_bits), float(quant.a_clip),
                   float(quant.latent_clip), None if rope_pairs is None else tuple(rope_pairs))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def d_rope(self) -> int:
        """Rotary dims per head: head_dim for full RoPE, 0 for none."""
        return self.head_dim if self.rope_pairs is None else 2 * len(self.rope_pairs)

    @property
    def cache_row_bytes(self) -> int:
        """Bytes per token of the packed latent cache row (codes, then the fp32 scale)."""
        return packed_row_bytes(self.latent_bits, self.rank)

    def local(self, num_heads: int, num_kv_heads: int) -> "QSVDLayerSpec":
        """The same layer restricted to one rank's heads."""
        return replace(self, num_heads=num_heads, num_kv_heads=num_kv_heads)

    def tensors(self, biases=()) -> dict[str, TensorSpec]:
        """The operands, in a fixed order; ``biases``: which of bq, bk, bv the
        layer has."""
        w = code_format(self.w_bits)
        E, r, d = self.hidden, self.rank, self.head_dim
        f32 = torch.float32
        out = {"signs": TensorSpec((E,), f32, "whole"),
               "wd": TensorSpec((r, w.row_bytes(E)), w.dtype, "whole"),
               "wd_scale": TensorSpec((r,), f32, "whole")}
        if self.form == "qkv":
            out["wuq"] = TensorSpec((self.q_dim, w.row_bytes(r)), w.dtype, "q_rows")
            out["wuq_scale"] = TensorSpec((self.q_dim,), f32, "q_rows")
        else:
            out["wq"] = TensorSpec((self.q_dim, w.row_bytes(E)), w.dtype, "q_rows")
            out["wq_scale"] = TensorSpec((self.q_dim,), f32, "q_rows")
        for name in ("wuk", "wuv"):
            out[name] = TensorSpec((self.num_kv_heads, r, d), torch.int8, "kv_heads")
            out[name + "_scale"] = TensorSpec((self.num_kv_heads, d), f32, "kv_heads")
        for name in BIAS_NAMES:
            if name in biases:
                n, shard = (self.q_dim, "q_rows") if name == "bq" else (self.kv_dim, "kv_heads")
                out[name] = TensorSpec((n,), f32, shard)
        return out

    def check(self, tensors: dict, where: str) -> None:
        """ValueError naming the tensor unless ``tensors`` holds exactly the
        operands of this spec (biases optional) with their shapes and dtypes."""
        want = self.tensors(biases=[b for b in BIAS_NAMES if tensors.get(b) is not None])
        for name, spec in want.items():
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"{where}: operand {name!r} is missing")
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise ValueError(f"{where}: operand {name!r} is {tuple(t.shape)} {t.dtype}, expected "
                                 f"{spec.shape} {spec.dtype}")
        extra = sorted(k for k, v in tensors.items() if v is not None and k not in want)
        if extra:
            raise ValueError(f"{where}: unexpected operands {extra}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["rope_pairs"] is None:
            del d["rope_pairs"]  # full RoPE: what readers of earlier specs assume
        else:
            d["rope_pairs"] = list(d["rope_pairs"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QSVDLayerSpec":
        d = dict(d)
        if d.get("rope_pairs") is not None:
            d["rope_pairs"] = tuple(d["rope_pairs"])
        return cls(**d)
