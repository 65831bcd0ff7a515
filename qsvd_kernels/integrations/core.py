"""The QSVD decoder attention step on torch.ops.qsvd, engine-neutral: what
the Hugging Face block and the vLLM layer both run (their adapters turn
their engine's metadata into the arguments here, and add nothing to the
arithmetic).

Per step, for N new tokens ``x`` [N, E]:

1. ``project(x)``: x codes = hadamard_quant(x) (H1, per-token
   quantization), c = x W_d (quant_gemm, fp32 [N, r]);
2. ``append(proj, slots, cache)``: latent_cache_append writes each token's
   quantized c at its slot of the paged cache;
3. ``queries(proj, rows)``: q, fp32 [N, H d] (plus b_q), unrotated: in the
   "qkv" latent form from the *cached* rows (``read_rows``: queries see
   exactly what later steps' keys are made of), in the "kv" form from x's
   codes with W_q (the same activation codes as c; q is never cached);
4. attention over the cache, the caller having rotated q with RoPE:
   ``decode`` (one new token per sequence: latent_attention, K rebuilt and
   V absorbed inside the op) or ``keys_values`` (K rotated, V, for any
   dense attention: prefill). The V bias is added here (softmax weights sum
   to 1, so it is added once, after attention).

A cache is ``LatentCache(codes, scale)``: separate codes and fp32 scales,
or packed rows (``scale`` None; docs/ops.md "The latent cache layouts").
The operands are read by name from ``operands`` (a module holding them as
buffers or parameters, laid out as model.layer_tensors says), at every
call, so moving or loading them needs nothing from the core.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import formats, ops
from ..model.layer_tensors import QSVDLayerSpec


# A K bias adds q.b_k to every score, which cancels in softmax without RoPE;
# under RoPE, q.R(b_k) depends on the key's position, which latent_attention
# does not model. Export, the Hugging Face ops backend and the vLLM layer
# refuse it through refuse_k_bias.
K_BIAS_UNDER_ROPE = ("a K bias under RoPE is position-dependent after rotation, which latent_attention does not "
                     "model")


def has_nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool((t != 0).any())


def refuse_k_bias(bk: torch.Tensor | None, where: str, error: type[Exception] = ValueError, hint: str = "") -> None:
    """Raise ``error`` naming ``where`` when ``bk`` (a layer's K bias, under
    RoPE) has a nonzero entry; a zero bias changes nothing and passes."""
    if has_nonzero(bk):
        raise error(f"{where}: {K_BIAS_UNDER_ROPE}" + (f"; {hint}" if hint else ""))


class LatentCache(NamedTuple):
    codes: torch.Tensor  # [num_blocks, block_size, row bytes] (separate) or [.., row bytes + 4] uint8 (packed)
    scale: torch.Tensor | None  # [num_blocks, block_size] fp32, or None for packed rows


class Projection(NamedTuple):
    c: torch.Tensor  # [N, r] fp32, the latent before quantization
    x_codes: torch.Tensor  # x's activation codes (quant_gemm a operand)
    x_scale: torch.Tensor  # [N] fp32


class QSVDAttentionCore:
    """One layer's QSVD attention step (module docstring); ``spec`` is the
    layer (this rank's heads), ``operands`` holds its tensors by name."""

    def __init__(self, spec: QSVDLayerSpec, operands):
        self.spec = spec
        self.operands = operands

    def _t(self, name: str):
        return getattr(self.operands, name, None)

    # ---------------------------------------------------------------- steps
    def project(self, x2d: torch.Tensor) -> Projection:
        s = self.spec
        codes, scale = ops.hadamard_quant(x2d.contiguous(), s.a_bits, s.a_clip, self._t("signs"))
        c = ops.quant_gemm(codes, scale, self._t("wd"), self._t("wd_scale"), s.a_bits, s.w_bits, torch.float32)
        return Projection(c, codes, scale)

    def append(self, proj: Projection, slots: torch.Tensor, cache: LatentCache) -> None:
        """Quantize the rows of ``proj.c`` whose slot is >= 0 into the cache (in place)."""
        ops.latent_cache_append(proj.c, slots, cache.codes, cache.scale, self.spec.latent_bits,
                                self.spec.latent_clip)

    def read_rows(self, cache: LatentCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rows at ``slots`` as quant_gemm operands (codes, fp32
        scales); a negative slot (padding) reads a zero scale, so its row is 0."""
        s = self.spec
        if cache.scale is None:
            codes, scale = formats.split_latent_rows(cache.codes.view(-1, cache.codes.shape[-1]), s.latent_bits,
                                                     s.rank)
        else:
            codes, scale = cache.codes.view(-1, cache.codes.shape[-1]), cache.scale.view(-1)
        rows = slots.clamp(min=0)
        got = torch.where(slots >= 0, scale[rows], torch.zeros((), device=scale.device, dtype=scale.dtype))
        return codes[rows].contiguous(), got.contiguous()

    def queries(self, proj: Projection, rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q fp32 [N, H d] (plus b_q), before RoPE: from the cached ``rows``
        ("qkv" form) or from x's codes ("kv" form, which needs no rows)."""
        s = self.spec
        if s.form == "kv":
            return ops.quant_gemm(proj.x_codes, proj.x_scale, self._t("wq"), self._t("wq_scale"), s.a_bits,
                                  s.w_bits, torch.float32, self._t("bq"))
        if rows is None:
            raise ValueError("the 'qkv' latent form computes q from the cached rows: pass rows=read_rows(...)")
        codes, scale = rows
        return ops.quant_gemm(codes, scale, self._t("wuq"), self._t("wuq_scale"), s.latent_bits, s.w_bits,
                              torch.float32, self._t("bq"))

    @property
    def queries_need_rows(self) -> bool:
        return self.spec.form == "qkv"

    def decode(self, q: torch.Tensor, cache: LatentCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
               cos: torch.Tensor | None, sin: torch.Tensor | None, sm_scale: float) -> torch.Tensor:
        """One new token per sequence over its cache: out fp32 [B, H, d]
        (q [B, H, d], rotated)."""
        s = self.spec
        out, _ = ops.latent_attention(q.contiguous(), cache.codes, cache.scale, block_table, seq_lens, self._t("wuk"),
                                      self._t("wuk_scale"), self._t("wuv"), self._t("wuv_scale"), s.latent_bits,
                                      sm_scale, cos, sin)
        bv = self.v_bias_per_query_head()
        return out.float() if bv is None else out.float() + bv

    def keys_values(self, cache: LatentCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """K (rotated) and V of every cached token of the sequences, fp32
        varlen [sum(seq_lens), H_kv, d], the V bias included."""
        s = self.spec
        k, v = ops.latent_reconstruct_kv(cache.codes, cache.scale, block_table, seq_lens, self._t("wuk"),
                                         self._t("wuk_scale"), self._t("wuv"), self._t("wuv_scale"), s.latent_bits,
                                         cos, sin, torch.float32)
        bv = self._t("bv")
        if bv is not None:
            v = v + bv.view(1, s.num_kv_heads, s.head_dim)
        return k, v

    def v_bias_per_query_head(self) -> torch.Tensor | None:
        """b_v repeated per query head [H, d] (GQA), or None."""
        bv, s = self._t("bv"), self.spec
        if bv is None:
            return None
        return bv.view(s.num_kv_heads, 1, s.head_dim).expand(-1, s.num_heads // s.num_kv_heads, -1).reshape(
            s.num_heads, s.head_dim)
