"""Pure-PyTorch reference implementations: the numerical spec of every op.

These ship with the package (as fast-hadamard-transform ships
``hadamard_transform_ref``), so users can check the kernels themselves.
They are written for clarity, not speed.

Two kinds of reference live here:

* **Bit-exact specs** (``hadamard_transform_ref``, ``hadamard_quant_ref``,
  ``latent_cache_append_ref``): the Hadamard butterflies and the quantization
  are done in fp32 in exactly the order of ``include/qsvd/hadamard.h`` and
  ``include/qsvd/numerics.h``, so integer codes match the kernels bit for bit
  and fp32 outputs match exactly.
* **Exact-math references** (``quant_gemm_ref``, ``latent_attention_ref``,
  ``latent_reconstruct_kv_ref``): computed in ``compute_dtype`` (float64 by
  default) from the same integer codes, so they measure the kernels' fp32
  rounding. Run them with ``compute_dtype=torch.float32`` to get a
  same-precision baseline for error bounds.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .formats import LATENT_SCALE_BYTES, code_format, qmax_for_bits, reconstruct_out_dtype, split_latent_rows

__all__ = [
    "MAX_HADAMARD_DIM",
    "hadamard_factorize",
    "hadamard_base_matrix",
    "hadamard_matrix",
    "hadamard_transform_ref",
    "hadamard_quant_ref",
    "quantize_rows_ref",
    "dequantize_rows_ref",
    "pack_int4",
    "unpack_int4",
    "unpack_codes",
    "quant_gemm_ref",
    "latent_cache_append_ref",
    "latent_cache_parts",
    "gather_latent_ref",
    "rope_tables",
    "apply_rope_ref",
    "latent_attention_ref",
    "latent_reconstruct_kv_ref",
]

MAX_HADAMARD_DIM = 32768


# ----------------------------------------------------------------------------
# Hadamard
# ----------------------------------------------------------------------------


def hadamard_factorize(K: int) -> tuple[int, int]:
    """``K = m * 2**log_n`` with ``m`` in {1, 12, 20, 28, 36}; ValueError otherwise.

    40 * 2^n is served as 20 * 2^(n+1).
    """
    if not (1 <= K <= MAX_HADAMARD_DIM):
        raise ValueError(f"Hadamard size K = {K} is outside [1, {MAX_HADAMARD_DIM}]")
    odd, twos = K, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    if odd == 1:
        return 1, twos
    if odd in (3, 5, 7, 9) and twos >= 2:
        return 4 * odd, twos - 2
    raise ValueError(f"Hadamard size K = {K} is not 2^n, or 12, 20, 28 or 36 times 2^n")


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if any((x * x) % q == a for x in range(1, q)) else -1


@lru_cache(maxsize=None)
def _base_matrix_list(m: int) -> tuple[tuple[int, ...], ...]:
    if m == 1:
        return ((1,),)
    if m in (12, 20):  # Paley I, q = m - 1 = 3 (mod 4)
        q = m - 1
        rows = []
        for i in range(m):
            row = []
            for j in range(m):
                if i == j:
                    s = 1
                elif i == 0:
                    s = 1
                elif j == 0:
                    s = -1
                else:
                    s = _legendre(j - i, q)
                row.append(s)
            rows.append(tuple(row))
        return tuple(rows)
    if m in (28, 36):  # Paley II, q = m/2 - 1 = 1 (mod 4)
        q = m // 2 - 1
        H = [[0] * m for _ in range(m)]
        for i in range(q + 1):
            for j in range(q + 1):
                if i == 0 and j == 0:
                    c = 0
                elif i == 0 or j == 0:
                    c = 1
                else:
                    c = _legendre(j - i, q)
                for di in range(2):
                    for dj in range(2):
                        if c == 0:
                            e = 1 if (di == 0 and dj == 0) else -1
                        else:
                            e = c * (-1 if (di == 1 and dj == 1) else 1)
                        H[2 * i + di][2 * j + dj] = e
        return tuple(tuple(r) for r in H)
    raise ValueError(f"no Hadamard base of order {m}")


def hadamard_base_matrix(m: int) -> torch.Tensor:
    """The m x m base Hadamard matrix (entries +-1, int8) used for K = m 2^n."""
    return torch.tensor(_base_matrix_list(m), dtype=torch.int8)


def _sylvester(n: int) -> torch.Tensor:
    """Sylvester's H_n (n a power of two): entry (i, j) = (-1)^popcount(i & j)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H


def hadamard_matrix(K: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Dense orthogonal ``H_K / sqrt(K)``, ``H_K = H_m (x) H_N``, such that
    ``hadamard_transform(x) == x @ hadamard_matrix(K)`` up to rounding.

    Use it to fold a rotation into weights offline (``W <- H^T W``).
    """
    m, log_n = hadamard_factorize(K)
    H = torch.kron(hadamard_base_matrix(m).to(torch.float64), _sylvester(1 << log_n))
    return (H / math.sqrt(K)).to(dtype=dtype, device=device)


def _rotate_fp32(x: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """The rotation in fp32, operation for operation as qsvd/hadamard.h."""
    K = x.shape[-1]
    m, log_n = hadamard_factorize(K)
    n = 1 << log_n
    v = x.to(torch.float32)
    if signs is not None:
        v = v * signs.to(device=v.device, dtype=torch.float32)
    v = v.reshape(-1, m, n)
    h = 1
    while h < n:
        w = v.reshape(-1, m, n // (2 * h), 2, h)
        lo, hi = w[..., 0, :], w[..., 1, :]
        v = torch.stack((lo + hi, lo - hi), dim=-2).reshape(-1, m, n)
        h *= 2
    if m > 1:
        H = _base_matrix_list(m)
        cols = []
        for a in range(m):
            acc = torch.zeros_like(v[:, 0, :])
            for ap in range(m):
                acc = acc + v[:, ap, :] if H[ap][a] > 0 else acc - v[:, ap, :]
            cols.append(acc)
        v = torch.stack(cols, dim=1)
    norm = torch.tensor(1.0 / math.sqrt(K), dtype=torch.float32, device=v.device)
    return (v * norm).reshape(x.shape)


def hadamard_transform_ref(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``(x * signs) @ hadamard_matrix(K)`` over the last dim, in x's dtype.

    Bit-exact spec of ``torch.ops.qsvd.hadamard_transform``.
    """
    return _rotate_fp32(x, signs).to(x.dtype)


# ----------------------------------------------------------------------------
# Quantization formats
# ----------------------------------------------------------------------------


def quantize_rows_ref(v: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of fp32 ``v`` ([..., K]).

    Returns unpacked int8 codes [..., K] and fp32 scales [...]:
    ``scale = clip_ratio * max|row| / qmax``,
    ``code = clamp(round_half_even(v / scale), -qmax, qmax)``; a zero (or
    NaN/Inf) scale gives codes 0. Bit-exact with include/qsvd/numerics.h.
    """
    qmax = qmax_for_bits(bits)
    v = v.to(torch.float32)
    amax = v.abs().amax(dim=-1) if v.shape[-1] > 0 else v.new_zeros(v.shape[:-1])
    clip = torch.full_like(amax, clip_ratio)  # float32(clip_ratio), like the kernels
    # Tensor divisors throughout: torch may turn division by a scalar into a
    # multiplication by its reciprocal, which rounds differently.
    scale = (clip * amax) / torch.full_like(amax, float(qmax))
    usable = (scale > 0) & torch.isfinite(scale)
    safe = torch.where(usable, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.round(v / safe)
    q = torch.where(usable.unsqueeze(-1) & ~torch.isnan(q), q, torch.zeros_like(q))
    codes = q.clamp(-qmax, qmax).to(torch.int8)
    return codes, scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], last dim even -> uint8, element 2i in the low nibble."""
    return code_format(4).pack(codes)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] (two's-complement nibbles)."""
    return code_format(4).unpack(packed)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes (int8, or packed INT4 uint8) -> int8 values."""
    return code_format(bits).unpack(codes)


def dequantize_rows_ref(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float64) -> torch.Tensor:
    """codes (stored format) * per-row scale, in ``dtype``."""
    return unpack_codes(codes, bits).to(dtype) * scale.to(dtype).unsqueeze(-1)


def hadamard_quant_ref(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, signs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-exact spec of ``torch.ops.qsvd.hadamard_quant``: the fp32 rotation
    (not rounded to x's dtype) quantized per row."""
    codes, scale = quantize_rows_ref(_rotate_fp32(x, signs), bits, clip_ratio)
    return code_format(bits).pack(codes), scale


# ----------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------


def quant_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    a_bits: int,
    b_bits: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``(A @ B.T) * a_scale[:, None] * b_scale[None, :] (+ bias)``.

    The integer product is exact (float64 holds every int32 sum exactly); the
    dequantization runs in ``compute_dtype`` and the result is cast to
    ``out_dtype``.
    """
    A = unpack_codes(a, a_bits).to(torch.float64)
    B = unpack_codes(b, b_bits).to(torch.float64)
    acc = (A @ B.T).to(compute_dtype)
    out = acc * a_scale.to(compute_dtype)[:, None] * b_scale.to(compute_dtype)[None, :]
    if bias is not None:
        out = out + bias.to(compute_dtype)[None, :]
    return out.to(out_dtype)


# ----------------------------------------------------------------------------
# Paged latent cache
# ----------------------------------------------------------------------------


def latent_cache_parts(
    cache: torch.Tensor, cache_scale: torch.Tensor | None, bits: int, r: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged cache in the separate layout: ``(codes, scale)``.

    With ``cache_scale`` given, that is ``(cache, cache_scale)``. With
    ``cache_scale`` None, ``cache`` holds packed rows (uint8
    ``[num_blocks, block_size, row_bytes + 4]``) and the result is
    :func:`qsvd_kernels.formats.split_latent_rows` of it: views into ``cache``
    (writes through them land in it). ``r`` defaults to what the row width
    implies."""
    if cache_scale is not None:
        return cache, cache_scale
    if r is None:
        r = (cache.shape[-1] - LATENT_SCALE_BYTES) * code_format(bits).codes_per_byte
    return split_latent_rows(cache, bits, r)


def latent_cache_append_ref(
    c: torch.Tensor,
    slot_mapping: torch.Tensor,
    cache: torch.Tensor,
    cache_scale: torch.Tensor | None,
    bits: int,
    clip_ratio: float = 1.0,
) -> None:
    """In-place spec of ``torch.ops.qsvd.latent_cache_append`` (bit-exact).
    ``cache_scale`` None: ``cache`` holds packed rows (:func:`latent_cache_parts`)."""
    packed = cache_scale is None
    cache, cache_scale = latent_cache_parts(cache, cache_scale, bits, c.shape[-1])
    if packed and cache_scale.untyped_storage().data_ptr() != cache.untyped_storage().data_ptr():
        raise ValueError("packed rows need 4-byte aligned scales (code bytes per row a multiple of 4)")
    codes, scale = quantize_rows_ref(c.to(torch.float32), bits, clip_ratio)
    codes = code_format(bits).pack(codes)
    flat = cache.view(-1, cache.shape[-1])
    flat_scale = cache_scale.view(-1)
    slots = slot_mapping.to(torch.int64)
    if bool((slots >= flat.shape[0]).any()):
        raise ValueError("slot_mapping has a slot past the end of the cache")
    keep = slots >= 0
    flat[slots[keep]] = codes[keep].to(flat.dtype)
    flat_scale[slots[keep]] = scale[keep]


def gather_latent_ref(
    cache: torch.Tensor,
    cache_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_len: int,
    b: int,
    bits: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The dequantized latent rows [seq_len, r] of sequence ``b`` (either
    cache layout: :func:`latent_cache_parts`)."""
    cache, cache_scale = latent_cache_parts(cache, cache_scale, bits)
    block_size = cache.shape[1]
    t = torch.arange(seq_len, device=cache.device)
    blocks = block_table[b].to(torch.int64)[t // block_size]
    offsets = t % block_size
    codes = cache[blocks, offsets]
    scales = cache_scale[blocks, offsets]
    return dequantize_rows_ref(codes, scales, bits, dtype)


def rope_tables(max_position: int, head_dim: int, base: float = 10000.0, device=None,
                pairs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaMA's rotary tables [max_position, head_dim] (fp32): the frequency
    table repeated twice, as transformers' LlamaRotaryEmbedding builds it.
    ``pairs`` (indices of rotary pairs, pair j rotating dims j and j +
    head_dim / 2 at frequency base^(-2j / head_dim)): the partial-RoPE
    tables [max_position, 2 len(pairs)] of those pairs only, for heads laid
    out with those pairs' dims first (:func:`partial_rope_permutation`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if pairs is not None:
        inv_freq = inv_freq[torch.as_tensor(list(pairs), dtype=torch.long)]
    pos = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def partial_rope_permutation(head_dim: int, pairs) -> torch.Tensor:
    """The head-dim order of partial RoPE: the rotary ``pairs``' first dims,
    then their second dims (a rotate-half layout of width 2 len(pairs)),
    then the remaining dims in their order. Permuting the head dims of q and
    k alike leaves every score unchanged; the op rotates the first 2
    len(pairs) dims with ``rope_tables(..., pairs=pairs)``."""
    half = head_dim // 2
    pairs = [int(j) for j in pairs]
    if len(set(pairs)) != len(pairs) or any(j < 0 or j >= half for j in pairs):
        raise ValueError(f"pairs must be distinct indices in [0, {half}), got {pairs}")
    rotary = pairs + [j + half for j in pairs]
    chosen = set(rotary)
    return torch.tensor(rotary + [j for j in range(head_dim) if j not in chosen], dtype=torch.long)


def select_rope_pairs(cos: torch.Tensor, sin: torch.Tensor, pairs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A model's rotate-half tables [..., d] (any RoPE scaling) restricted to
    the rotary ``pairs``: [..., 2 len(pairs)] for heads in the partial
    layout (:func:`partial_rope_permutation`); no pairs: (None, None), no
    RoPE. ``pairs`` None: the tables unchanged (full RoPE)."""
    if pairs is None:
        return cos, sin
    if len(pairs) == 0:
        return None, None
    idx = torch.as_tensor(list(pairs), dtype=torch.long, device=cos.device)
    idx = torch.cat((idx, idx))
    return cos.index_select(-1, idx).contiguous(), sin.index_select(-1, idx).contiguous()


def apply_rope_ref(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: ``k * cos + rotate_half(k) * sin`` (cos/sin broadcast
    over k). Tables narrower than k (width d_rope < d: partial RoPE) rotate
    the first d_rope dims of k among themselves; the rest pass unchanged."""
    n = cos.shape[-1]
    if n < k.shape[-1]:
        return torch.cat((apply_rope_ref(k[..., :n], cos, sin), k[..., n:]), dim=-1)
    half = n // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * cos + rotated * sin


def _dequant_weight(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    wf = w.to(dtype)
    if scale is not None:
        wf = wf * scale.to(dtype).unsqueeze(1)
    return wf


def _kv_for_sequence(cache, cache_scale, block_table, L, b, w_k, w_v, bits, rope_cos, rope_sin, dtype,
                     rope_keys=None):
    c = gather_latent_ref(cache, cache_scale, block_table, L, b, bits, dtype)  # [L, r]
    k = torch.einsum("tr,hrd->thd", c, w_k)
    v = torch.einsum("tr,hrd->thd", c, w_v)
    if rope_keys is not None:  # the rotary part of K as cached (latent_rope_keys_append)
        t = torch.arange(L, device=cache.device)
        block_size = rope_keys.shape[1]
        cached = rope_keys[block_table[b].to(torch.int64)[t // block_size], t % block_size]  # [L, H_kv, d_rope]
        n = cached.shape[-1]
        k = torch.cat((cached.to(dtype), k[..., n:]), dim=-1)
    elif rope_cos is not None:
        k = apply_rope_ref(k, rope_cos[:L].to(dtype)[:, None, :], rope_sin[:L].to(dtype)[:, None, :])
    return k, v


def latent_rope_keys_ref(cache, cache_scale, slot_mapping, positions, w_uk, w_uk_scale, bits, rope_cos, rope_sin,
                         compute_dtype=torch.float64) -> torch.Tensor:
    """The rotary part of K of the cached rows at ``slot_mapping`` (negative:
    none, zeros) at their ``positions``: RoPE_pos(c W_uk[:, :, :d_rope]) with
    d_rope the tables' width, [N, H_kv, d_rope] in compute_dtype
    (latent_rope_keys_append stores it in fp16)."""
    cache, cache_scale = latent_cache_parts(cache, cache_scale, bits, w_uk.shape[1])
    n = rope_cos.shape[-1]
    w_k = _dequant_weight(w_uk, w_uk_scale, compute_dtype)[..., :n]
    flat_codes = cache.reshape(-1, cache.shape[-1])
    flat_scale = cache_scale.reshape(-1)
    slots = slot_mapping.to(torch.int64).clamp(min=0)
    c = dequantize_rows_ref(flat_codes[slots], flat_scale[slots], bits, compute_dtype)  # [N, r]
    k = torch.einsum("nr,hrd->nhd", c, w_k)
    pos = positions.to(torch.int64).clamp(min=0)
    k = apply_rope_ref(k, rope_cos[pos].to(compute_dtype)[:, None, :], rope_sin[pos].to(compute_dtype)[:, None, :])
    return torch.where((slot_mapping >= 0)[:, None, None], k, torch.zeros((), dtype=compute_dtype))


def latent_attention_ref(q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits: int,
                         sm_scale: float, rope_cos=None, rope_sin=None, compute_dtype=torch.float64,
                         rope_keys=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention with K and V rebuilt explicitly from the latent.
    ``rope_keys`` [num_blocks, block_size, H_kv, d_rope]: the rotary part of
    K read from that cache (its stored values) instead of rebuilt.

    ``k_t = RoPE_t(c_t W_uk)``, ``v_t = c_t W_uv``, query head h reads kv head
    ``h // (H / H_kv)``; ``out = softmax(sm_scale q.k) v``, ``lse`` the
    natural-log sum of exp of the scaled scores. An empty sequence gives
    zeros and ``lse = -inf``. ``cache_scale`` None: ``cache`` holds packed
    rows (:func:`latent_cache_parts`). Returns (out in q's dtype, lse fp32); a
    float64 ``q`` returns both unrounded in float64 (the exact result).
    """
    cache, cache_scale = latent_cache_parts(cache, cache_scale, bits, w_uk.shape[1])
    B, H, d = q.shape
    H_kv = w_uk.shape[0]
    group = H // H_kv
    w_k = _dequant_weight(w_uk, w_uk_scale, compute_dtype)
    w_v = _dequant_weight(w_uv, w_uv_scale, compute_dtype)
    out = torch.zeros(B, H, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((B, H), float("-inf"), dtype=compute_dtype, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        k, v = _kv_for_sequence(cache, cache_scale, block_table, L, b, w_k, w_v, bits, rope_cos, rope_sin, compute_dtype,
                                rope_keys)
        k = k.repeat_interleave(group, dim=1)  # [L, H, d]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].to(compute_dtype), k) * sm_scale
        lse[b] = torch.logsumexp(scores, dim=-1)
        p = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("ht,thd->hd", p, v)
    return out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """float64 softmax(sm_scale q k^T + causal) v: q [H, n, d], k / v
    [H_kv, L, d] (GQA), the n rows being the last n of the L keys (row i
    sees keys <= L - n + i), as integrations/core.causal_attention."""
    H, n, _ = q.shape
    H_kv, L = k.shape[:2]
    K = k.double().repeat_interleave(H // H_kv, 0)
    V = v.double().repeat_interleave(H // H_kv, 0)
    s = torch.einsum("hnd,hld->hnl", q.double(), K) * sm_scale
    seen = torch.arange(L, device=q.device)[None] <= (L - n + torch.arange(n, device=q.device))[:, None]
    return torch.einsum("hnl,hld->hnd", torch.softmax(s.masked_fill(~seen, float("-inf")), -1), V)


def latent_reconstruct_kv_ref(cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits: int,
                              rope_cos=None, rope_sin=None, out_dtype=None, compute_dtype=torch.float64,
                              rope_keys=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated) and V of every cached token, [sum(seq_lens), H_kv, d]
    (``rope_keys``: K's rotary part read from that cache, as latent_attention_ref).
    ``cache_scale`` None: ``cache`` holds packed rows (:func:`latent_cache_parts`)."""
    cache, cache_scale = latent_cache_parts(cache, cache_scale, bits, w_uk.shape[1])
    out_dtype = reconstruct_out_dtype(w_uk.dtype, out_dtype)
    H_kv, _, d = w_uk.shape
    w_k = _dequant_weight(w_uk, w_uk_scale, compute_dtype)
    w_v = _dequant_weight(w_uv, w_uv_scale, compute_dtype)
    ks, vs = [], []
    for b in range(block_table.shape[0]):
        L = int(seq_lens[b])
        if L == 0:
            continue
        k, v = _kv_for_sequence(cache, cache_scale, block_table, L, b, w_k, w_v, bits, rope_cos, rope_sin, compute_dtype,
                                rope_keys)
        ks.append(k)
        vs.append(v)
    if not ks:
        empty = torch.empty(0, H_kv, d, dtype=out_dtype, device=cache.device)
        return empty, empty.clone()
    return torch.cat(ks).to(out_dtype), torch.cat(vs).to(out_dtype)
