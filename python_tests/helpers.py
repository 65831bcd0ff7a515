"""Test helpers: input builders and error bounds derived from the arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qsvd_kernels import reference as R

# Relative spacing of each dtype (ulp at 1.0), and the spacing of its
# subnormals (the absolute error floor of a rounding near zero).
EPS = {
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}
TINY = {
    torch.float32: 2.0**-149,
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-133,
}


U32 = 2.0**-24  # unit roundoff of fp32
U64 = 2.0**-53  # unit roundoff of fp64

# Unit roundoff of each backend's arithmetic in the latent ops: the CPU
# kernels accumulate in float64 (csrc/cpu/latent_attention.cpp), the CUDA
# kernels in fp32.
COMPUTE_ROUNDOFF = {"cpu": U64, "cuda": U32}


def assert_within(actual, truth, bound, out_dtype, what=""):
    """|actual - truth| <= bound + the final rounding to out_dtype (one ulp,
    or a subnormal step), elementwise. NaN/Inf must sit where truth has them."""
    actual, bound = actual.double(), bound.double()
    # Where the exact value overflows the output dtype, +-Inf is the answer.
    truth = torch.where(torch.isfinite(truth.to(out_dtype)), truth.double(), truth.to(out_dtype).double())
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite pattern differs"
    assert torch.equal(actual[~finite].nan_to_num(nan=0.5), truth[~finite].nan_to_num(nan=0.5)), \
        f"{what}: non-finite values differ"
    err = (actual - truth).abs()[finite]
    allowed = (bound + EPS[out_dtype] * truth.abs() + TINY[out_dtype])[finite]
    if err.numel():
        worst = (err / allowed).max().item()
        assert worst <= 1.0, f"{what}: error {err.max().item():.3e} exceeds its bound ({worst:.2f}x the allowed error)"


def _abs_weight(w, scale):
    wf = w.double().abs()
    return wf * scale.double().abs().unsqueeze(1) if scale is not None else wf


def _abs_kv(cache, cache_scale, block_table, L, b, bits, w_k, w_v, rope):
    """Magnitudes |c| |W_k| and |c| |W_v| of one sequence ([L, H_kv, d]);
    with RoPE, |k cos| + |rot(k) sin| <= |k| + |rot(k)|."""
    c = R.gather_latent_ref(cache, cache_scale, block_table, L, b, bits).abs()
    k = torch.einsum("tr,hrd->thd", c, w_k)
    v = torch.einsum("tr,hrd->thd", c, w_v)
    if rope:
        half = k.shape[-1] // 2
        k = k + torch.cat((k[..., half:], k[..., :half]), dim=-1)
    return k, v


def latent_attention_error_bound(q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale,
                                 bits, sm_scale, rope_cos=None, rope_sin=None, *, u=U32):
    """First-order worst-case bound of the evaluation error in arithmetic of
    unit roundoff u (Higham: a sum of n terms is off by at most n u sum|terms|),
    before the output rounding.

    A score takes r + d + O(1) roundings on terms bounded by
    S = |sm_scale| sum_j |q_j| (|c| |W_k|)_j, so |ds| <= (r + d + 4) u max_t S.
    Score errors move softmax weights by at most 2 |ds| p_t, so the output
    moves by 2 |ds| max|v|; summing p_t v_t over L tokens and the r-term
    up-projection add (L + r + 4) u max|v|. lse = max + log(sum) moves by
    |ds| plus (L + 4) u. Returns (bound_out [B, H, d], bound_lse [B, H]).
    """
    B, H, d = q.shape
    H_kv, r, _ = w_uk.shape
    w_k, w_v = _abs_weight(w_uk, w_uk_scale), _abs_weight(w_uv, w_uv_scale)
    bound_out = torch.zeros(B, H, d, dtype=torch.float64)
    bound_lse = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        k, v = _abs_kv(cache, cache_scale, block_table, L, b, bits, w_k, w_v, rope_cos is not None)
        k = k.repeat_interleave(H // H_kv, dim=1)
        v_max = v.repeat_interleave(H // H_kv, dim=1).amax(dim=0)  # [H, d]
        s_abs = abs(sm_scale) * torch.einsum("hd,thd->ht", q[b].double().abs(), k)
        ds = (r + d + 4) * u * s_abs.amax(dim=-1)  # [H]
        bound_out[b] = 2 * ds[:, None] * v_max + (L + r + 4) * u * v_max
        bound_lse[b] = ds + (L + 4) * u
    return bound_out, bound_lse


def latent_reconstruct_error_bound(cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale,
                                   bits, rope_cos=None, rope_sin=None, *, u=U32):
    """k = RoPE(c W_k), v = c W_v: (r + 4) u times the magnitudes."""
    H_kv, r, d = w_uk.shape
    w_k, w_v = _abs_weight(w_uk, w_uk_scale), _abs_weight(w_uv, w_uv_scale)
    ks, vs = [], []
    for b in range(block_table.shape[0]):
        L = int(seq_lens[b])
        if L:
            k, v = _abs_kv(cache, cache_scale, block_table, L, b, bits, w_k, w_v, rope_cos is not None)
            ks.append(k)
            vs.append(v)
    if not ks:
        return torch.zeros(0, H_kv, d, dtype=torch.float64), torch.zeros(0, H_kv, d, dtype=torch.float64)
    return (r + 4) * u * torch.cat(ks), (r + 4) * u * torch.cat(vs)


def random_codes(shape, bits, generator=None):
    """Random stored codes (int8, or packed INT4) covering the full symmetric range."""
    qmax = 7 if bits == 4 else 127
    codes = torch.randint(-qmax, qmax + 1, shape, dtype=torch.int8, generator=generator)
    return R.pack_int4(codes) if bits == 4 else codes


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
    last = r // 2 if bits == 4 else r
    cache = random_codes((num_blocks, block_size, r), bits, g).reshape(num_blocks, block_size, last)
    scale = (torch.rand(num_blocks, block_size, generator=g) + 0.5) * scale_mag / (7 if bits == 4 else 127)
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
