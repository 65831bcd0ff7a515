"""Fake (meta) kernels of every qsvd op, for torch.compile and FakeTensor.

They compute output shapes and dtypes only, the same way the C++ kernels
allocate their outputs. torch_bindings.cpp names this module
(``set_python_module``), so tracing an op before it is imported fails with a
message that says to import it.
"""

from __future__ import annotations

import torch
from torch.library import register_fake

from .formats import code_format, reconstruct_out_dtype

__all__: list[str] = []


@register_fake("qsvd::hadamard_transform")
def _hadamard_transform_fake(x, signs=None):
    return x.new_empty(x.shape)


@register_fake("qsvd::hadamard_quant")
def _hadamard_quant_fake(x, bits, clip_ratio=1.0, signs=None):
    fmt = code_format(bits)  # the kernel checks that K is a multiple of codes_per_byte
    codes = x.new_empty((*x.shape[:-1], x.shape[-1] // fmt.codes_per_byte), dtype=fmt.dtype)
    scale = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return codes, scale


@register_fake("qsvd::quant_gemm")
def _quant_gemm_fake(a, a_scale, b, b_scale, a_bits, b_bits, out_dtype, bias=None):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@register_fake("qsvd::latent_cache_append")
def _latent_cache_append_fake(c, slot_mapping, cache, cache_scale, bits, clip_ratio=1.0, check_indices=True):
    # cache_scale may be None (packed rows): nothing is returned either way.
    return None


@register_fake("qsvd::latent_attention")
def _latent_attention_fake(
    q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits, sm_scale,
    rope_cos=None, rope_sin=None, check_indices=True, plan=None, rope_keys=None,
):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@register_fake("qsvd::latent_rope_keys_append")
def _latent_rope_keys_append_fake(cache, cache_scale, slot_mapping, positions, w_uk, w_uk_scale, bits, rope_cos,
                                  rope_sin, rope_keys, check_indices=True):
    return None


@register_fake("qsvd::latent_attention_plan")
def _latent_attention_plan_fake(
    q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits,
    rope_cos=None, rope_sin=None, rope_keys=None,
):
    from . import _C  # loaded: the op is registered by it

    # Its words: a magic number, then the fields (csrc/plan.h); on the CPU whatever q's device.
    return torch.empty(1 + len(_C.latent_attention_plan_fields()), dtype=torch.int64, device="cpu")


@register_fake("qsvd::latent_reconstruct_kv")
def _latent_reconstruct_kv_fake(
    cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits,
    rope_cos=None, rope_sin=None, out_dtype=None, check_indices=True, rope_keys=None,
):
    # The row count is sum(seq_lens): data-dependent, so an unbacked size.
    total = torch.library.get_ctx().new_dynamic_size()
    out_dtype = reconstruct_out_dtype(w_uk.dtype, out_dtype)
    H_kv, _, d = w_uk.shape
    # cache_scale is None with packed rows: allocate from cache (same device).
    k = cache.new_empty((total, H_kv, d), dtype=out_dtype)
    v = cache.new_empty((total, H_kv, d), dtype=out_dtype)
    return k, v
