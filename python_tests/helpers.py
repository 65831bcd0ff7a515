"""Test helpers: input builders. The error bounds derived from the
arithmetic live in the shipped ``qsvd_kernels.testing`` (re-exported here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qsvd_kernels.formats import code_format
from qsvd_kernels.testing import (  # noqa: F401  (re-exported for the tests)
    EPS,
    TINY,
    U32,
    U64,
    LATENT_BOUND,
    LATENT_KERNEL_BOUND,
    RECONSTRUCT_BOUND,
    CPU_TILE_TOKENS,
    TC_MAX_TILE_TOKENS,
    assert_within,
    latent_attention_error_bound,
    latent_reconstruct_error_bound,
    random_codes,
)


@dataclass
class PagedCache:
    cache: torch.Tensor
    cache_scale: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    used: torch.Tensor  # bool [num_blocks, block_size]: slots holding a token


def make_paged_cache(seq_lens, r, bits, block_size, *, extra_blocks=3, scale_mag=1.0, zero_rows=False,
                     poison=True, generator=None, device="cpu"):
    """A paged latent cache holding random codes for len(seq_lens) sequences.

    Blocks are assigned in a shuffled order, with spare blocks left over.
    Every slot that holds no token gets a NaN scale (poison): a kernel that
    reads it produces NaN and fails the test (FlashMLA's trick).
    """
    g = generator
    B = len(seq_lens)
    blocks_per_seq = [max(1, math.ceil(L / block_size)) for L in seq_lens]
    max_blocks = max(blocks_per_seq) if B else 1
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((B, max_blocks), -1, dtype=torch.int32)  # unused entries are invalid on purpose
    k = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[k : k + n].to(torch.int32)
        k += n
    cache = random_codes(bits, (num_blocks, block_size, r), g)[1]
    scale = (torch.rand(num_blocks, block_size, generator=g) + 0.5) * scale_mag / code_format(bits).qmax
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, L in enumerate(seq_lens):
        for t in range(L):
            used[block_table[b, t // block_size], t % block_size] = True
    if zero_rows:  # every third token is an all-zero row with scale 0
        ids = used.nonzero()
        z = ids[::3]
        cache[z[:, 0], z[:, 1]] = 0
        scale[z[:, 0], z[:, 1]] = 0.0
    if poison:
        scale[~used] = float("nan")
    # block_table entries past a sequence's last block are never read: make
    # them valid-looking but wrong, so a kernel reading them hits poison.
    for b, n in enumerate(blocks_per_seq):
        block_table[b, n:] = int(perm[-1])
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return PagedCache(cache.to(device), scale.to(device), block_table.to(device), seq.to(device), used.to(device))


def make_weights(H_kv, r, d, wdtype, generator=None, device="cpu"):
    """Up-projection weights with output ~ unit scale: fp16/bf16, or int8 + [H_kv, d] scales."""
    g = generator
    w_k = torch.randn(H_kv, r, d, generator=g) / math.sqrt(r)
    w_v = torch.randn(H_kv, r, d, generator=g) / math.sqrt(r)
    if wdtype == torch.int8:
        out = []
        for w in (w_k, w_v):
            s = w.abs().amax(dim=1) / 127  # [H_kv, d]
            out.append((torch.round(w / s.unsqueeze(1)).clamp(-127, 127).to(torch.int8).to(device), s.to(device)))
        return out[0][0], out[0][1], out[1][0], out[1][1]
    return w_k.to(wdtype).to(device), None, w_v.to(wdtype).to(device), None


def rope_keys_bound(cache, cache_scale, slots, w_uk, w_uk_scale, bits, exact):
    """How far latent_rope_keys_append's stored keys may be from
    ``exact`` (reference.latent_rope_keys_ref at ``slots``, [N, H_kv,
    d_rope]): the fp32 rebuild's r + 4 roundings on the magnitudes
    (|k cos| + |rot(k) sin|), then the one rounding to fp16, and fp16's
    subnormal spacing."""
    from qsvd_kernels import reference as R

    r, d_rope = w_uk.shape[1], exact.shape[-1]
    codes, scale = R.latent_cache_parts(cache, cache_scale, bits, r)
    c_abs = R.dequantize_rows_ref(codes, scale, bits).abs().reshape(-1, r)[slots.clamp(min=0)]
    w_abs = R._dequant_weight(w_uk, w_uk_scale, torch.float64).abs()[..., :d_rope]
    mag = torch.einsum("nr,hrd->nhd", c_abs, w_abs)
    half = d_rope // 2
    mag = mag + torch.cat((mag[..., half:], mag[..., :half]), -1)
    return (r + 4) * 2.0**-24 * mag + 2.0**-11 * exact.abs() + 2.0**-25
