"""Typed Python wrappers of ``torch.ops.qsvd.*``.

The wrappers add signatures and documentation only: each one is a direct
call of the registered op, so ``torch.compile``, ``opcheck`` and other
frameworks see exactly the same thing. Shapes use docs/ops.md's names:
``K`` reduced dim, ``B`` batch, ``H`` query heads, ``H_kv`` kv heads,
``d`` head dim, ``r`` latent rank, ``T`` new tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hadamard_transform",
    "hadamard_quant",
    "quant_gemm",
    "latent_cache_append",
    "latent_attention",
    "latent_attention_plan",
    "latent_reconstruct_kv",
    "latent_rope_keys_append",
]


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised Walsh-Hadamard rotation of the last dimension.

    Args:
        x: ``[..., K]`` float16 / bfloat16 / float32. ``K`` is ``2^n`` or
            ``m * 2^n`` with ``m`` in {12, 20, 28, 36} (40 * 2^n included),
            at most 32768.
        signs: optional ``[K]`` float32, multiplied into ``x`` first. +-1
            values make the rotation a randomised Hadamard transform.

    Returns:
        ``(x * signs) @ H_K / sqrt(K)``: same shape and dtype as ``x``
        (contiguous). Computed in fp32, rounded once to ``x``'s dtype.
    """
    return torch.ops.qsvd.hadamard_transform(x, signs)


def hadamard_quant(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, signs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hadamard rotation fused with per-row symmetric quantization.

    Args:
        x: ``[..., K]`` float16 / bfloat16 / float32 (``K`` as in
            :func:`hadamard_transform`; even for ``bits=4``).
        bits: 8 (int8 codes in [-127, 127]) or 4 (packed INT4 in [-7, 7]).
        clip_ratio: in (0, 1]; ``scale = clip_ratio * max|row| / qmax``.
        signs: optional ``[K]`` float32, as in :func:`hadamard_transform`.

    Returns:
        ``codes``: int8 ``[..., K]`` or uint8 ``[..., K/2]`` (element ``2i``
        in the low nibble); ``scale``: float32 ``[...]``. An all-zero row has
        scale 0 and codes 0.
    """
    return torch.ops.qsvd.hadamard_quant(x, bits, clip_ratio, signs)


def quant_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    a_bits: int,
    b_bits: int,
    out_dtype: torch.dtype = torch.float16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantized GEMM with exact int32 accumulation and a dequantizing epilogue.

    Args:
        a: ``[M, K]`` int8 codes (``a_bits=8``) or ``[M, K/2]`` packed uint8
            (``a_bits=4``): activations, one row per token.
        a_scale: ``[M]`` float32, per row of ``a``.
        b: ``[N, K]`` int8 or ``[N, K/2]`` packed uint8 (``b_bits``):
            weights, one row per output channel (``F.linear`` layout).
        b_scale: ``[N]`` float32, per row of ``b``.
        out_dtype: float16, bfloat16 or float32.
        bias: optional ``[N]`` in ``out_dtype``.

    Returns:
        ``[M, N]`` ``out_dtype``:
        ``(sum_k a[m,k] b[n,k]) * a_scale[m] * b_scale[n] (+ bias[n])``.
        ``K`` is at most 131072, so the int32 sums cannot overflow.
    """
    return torch.ops.qsvd.quant_gemm(a, a_scale, b, b_scale, a_bits, b_bits, out_dtype, bias)


def latent_cache_append(
    c: torch.Tensor,
    slot_mapping: torch.Tensor,
    cache: torch.Tensor,
    cache_scale: torch.Tensor | None,
    bits: int,
    clip_ratio: float = 1.0,
    check_indices: bool = True,
) -> None:
    """Quantize latent rows per token and write them into the paged cache (in place).

    Args:
        c: ``[T, r]`` float16 / bfloat16 / float32 latent rows.
        slot_mapping: ``[T]`` int64 or int32 flat slots
            (``block * block_size + offset``); negative slots are skipped.
            A slot past the cache raises before anything is written.
        cache: the paged latent cache, contiguous, in one of two layouts.
            Separate (``cache_scale`` given): ``[num_blocks, block_size, r]``
            int8 (``bits=8``) or ``[num_blocks, block_size, r/2]`` uint8
            (``bits=4``). Packed rows (``cache_scale`` None): uint8
            ``[num_blocks, block_size, row_bytes + 4]`` with ``row_bytes =
            r`` (``bits=8``) or ``r/2`` (``bits=4``), a multiple of 4; each
            token's row is its code bytes, then its float32 scale (native
            byte order) at byte ``row_bytes``
            (:func:`qsvd_kernels.formats.pack_latent_rows`,
            :func:`qsvd_kernels.formats.split_latent_rows`).
        cache_scale: ``[num_blocks, block_size]`` float32, contiguous; or
            None for a packed-rows ``cache``.
        bits: 8 or 4.
        clip_ratio: in (0, 1].
        check_indices: False when the caller guarantees the slots (a serving
            engine's slot mapping): the CUDA kernel then skips its host check
            (a device-to-host copy and a sync), and still skips bad slots on
            the device. The CPU kernel always checks.

    With duplicate slots, which row lands is unspecified.
    """
    torch.ops.qsvd.latent_cache_append(c, slot_mapping, cache, cache_scale, bits, clip_ratio, check_indices)


def latent_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    cache_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    w_uk: torch.Tensor,
    w_uk_scale: torch.Tensor | None,
    w_uv: torch.Tensor,
    w_uv_scale: torch.Tensor | None,
    bits: int,
    sm_scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    check_indices: bool = True,
    plan: torch.Tensor | None = None,
    rope_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the quantized latent cache, up-projections inside.

    Args:
        q: ``[B, H, d]`` float16 / bfloat16 / float32, already rotated for its
            own position.
        cache, cache_scale: the paged latent cache in either layout (see
            :func:`latent_cache_append`): ``cache_scale`` None means
            ``cache`` holds packed rows (then it must be contiguous).
        block_table: ``[B, max_blocks]`` int32; sequence ``b``'s token ``t``
            is at block ``block_table[b, t // block_size]``.
        seq_lens: ``[B]`` int32, tokens per sequence (0 allowed).
        w_uk, w_uv: ``[H_kv, r, d]`` float16 / bfloat16, or int8 with
            ``w_uk_scale`` / ``w_uv_scale`` ``[H_kv, d]`` float32. Query head
            ``h`` uses kv head ``h // (H // H_kv)``.
        bits: latent code width, 8 or 4.
        sm_scale: softmax scale (usually ``d ** -0.5``).
        rope_cos, rope_sin: ``[max_position, d]`` float32 LLaMA rotary tables
            (see :func:`qsvd_kernels.reference.rope_tables`); token ``t`` is at
            position ``t``. Omit both for layers without RoPE.
        check_indices: False when the caller guarantees ``block_table`` and
            ``seq_lens`` (a serving engine's): the CUDA launcher skips its
            host check (a sync, which CUDA graphs cannot capture); the kernel
            still guards every index. The CPU kernel always checks.
        plan: :func:`latent_attention_plan`'s tensor for this batch shape
            (made once, passed by every layer of that shape): the call runs
            it, reading no environment knob, table or forced choice. It must
            match the call (device, sizes, RoPE, weight dtype; the call's
            token capacity at most the plan's), else ValueError naming
            ``plan``. None: the call plans itself.
        rope_keys: ``[num_blocks, block_size, H_kv, d_rope]`` float16, K's
            rotary part per cached token (:func:`latent_rope_keys_append`),
            read instead of rebuilt (partial RoPE's cached form; the RoPE
            tables still give d_rope). CPU only for now.

    Returns:
        ``out`` ``[B, H, d]`` in ``q``'s dtype and ``lse`` ``[B, H]`` float32
        (natural log of the sum of exp of the scaled scores). An empty
        sequence gives zeros and ``lse = -inf``.
    """
    return torch.ops.qsvd.latent_attention(
        q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits, sm_scale,
        rope_cos, rope_sin, check_indices, plan, rope_keys,
    )


def latent_attention_plan(
    q: Tensor, cache: Tensor, cache_scale: Tensor | None, block_table: Tensor, seq_lens: Tensor,
    w_uk: Tensor, w_uk_scale: Tensor | None, w_uv: Tensor, w_uv_scale: Tensor | None, bits: int,
    rope_cos: Tensor | None = None, rope_sin: Tensor | None = None, rope_keys: Tensor | None = None,
) -> torch.Tensor:
    """The plan of :func:`latent_attention` calls with these arguments'
    device, sizes and dtypes (FlashInfer's plan/run): the CUDA split kernel,
    KV splits, token tile, heads per CTA, or the CPU path, chosen once with
    forced > environment > installed table > built-in. The token capacity
    planned for is ``block_table``'s (``max_blocks * block_size``, capped
    by the RoPE table): plan with the step's widest block table; the values
    of ``seq_lens`` are not read. Returns an int64 CPU tensor to pass as
    ``plan=``; :func:`describe_latent_attention_plan` reads it. Calls that
    pass ``rope_keys`` (K's rotary part cached) need a plan made with them:
    on CUDA they run another split kernel. The layers
    of a QSVD model differ in rank, so an engine keeps one plan per rank
    (integrations/core.py, ``StepMetadata.plans``)."""
    return torch.ops.qsvd.latent_attention_plan(
        q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin,
        rope_keys,
    )


def describe_latent_attention_plan(plan: torch.Tensor) -> dict:
    """A plan tensor's fields by name (csrc/plan.h): ``device`` ("cpu" or
    "cuda:i"), the signature (B, H, H_kv, r, d, bits, d_rope, rope_keys, weight_dtype,
    token_capacity), then the CPU plan (``cpu_path``, ``cpu_threads``) or
    the CUDA plan (``split_kernel``, ``splits``, ``tile_tokens``,
    ``heads_per_cta``, shared memory, ``source`` and ``rule``)."""
    from . import _C

    return dict(_C.describe_latent_attention_plan(plan))

def latent_reconstruct_kv(
    cache: Tensor, cache_scale: Tensor | None, block_table: Tensor, seq_lens: Tensor,
    w_uk: Tensor, w_uk_scale: Tensor | None, w_uv: Tensor, w_uv_scale: Tensor | None, bits: int,
    rope_cos: Tensor | None = None, rope_sin: Tensor | None = None, out_dtype: torch.dtype | None = None,
    check_indices: bool = True, rope_keys: Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise K (RoPE-rotated when tables are given) and V from the latent cache.

    Arguments as in :func:`latent_attention` (``cache_scale`` None: a
    packed-rows ``cache``; ``rope_keys``: K's rotary part read from that
    cache). ``out_dtype`` defaults to the weights' dtype, or float16 for
    int8 weights. ``check_indices`` as in :func:`latent_attention` (the
    lengths come to the host anyway, for the output size).

    Returns:
        ``k``, ``v``: ``[sum(seq_lens), H_kv, d]``, sequences packed in
        batch order (varlen layout, ready for a dense attention kernel).
    """
    return torch.ops.qsvd.latent_reconstruct_kv(
        cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin,
        out_dtype, check_indices, rope_keys,
    )


def latent_rope_keys_append(
    cache: Tensor, cache_scale: Tensor | None, slot_mapping: Tensor, positions: Tensor,
    w_uk: Tensor, w_uk_scale: Tensor | None, bits: int, rope_cos: Tensor, rope_sin: Tensor,
    rope_keys: Tensor, check_indices: bool = True,
) -> None:
    """Partial RoPE's cached form: the rotary part of K of the latent rows
    already in the cache at ``slot_mapping`` (after
    :func:`latent_cache_append`), ``RoPE_pos(c W_uk[:, :, :d_rope])`` at
    ``positions`` (d_rope: the tables' width), written in float16 to
    ``rope_keys`` ``[num_blocks, block_size, H_kv, d_rope]`` (in place).
    Negative slots are padding (skipped). Then :func:`latent_attention` and
    :func:`latent_reconstruct_kv` given ``rope_keys`` read that part instead
    of rebuilding it per token: ``2 r d_rope`` operations per cached token and
    kv head become a read of ``2 d_rope`` bytes. CPU only for now."""
    torch.ops.qsvd.latent_rope_keys_append(cache, cache_scale, slot_mapping, positions, w_uk, w_uk_scale, bits,
                                           rope_cos, rope_sin, rope_keys, check_indices)
