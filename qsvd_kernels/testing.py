"""Error bounds of the qsvd ops, derived from their arithmetic (docs/ops.md,
"Numerics of the latent ops, and tolerances"), for tests: this library's own
and a framework's that checks its use of the ops against
``qsvd_kernels.reference``.

    from qsvd_kernels import reference as R, testing as T
    out, lse = torch.ops.qsvd.latent_attention(*args)
    ref_out, ref_lse = R.latent_attention_ref(*args)           # float64
    b_out, b_lse = T.latent_attention_error_bound(*args, **T.LATENT_BOUND["cuda"])
    T.assert_within(out, ref_out, b_out, out.dtype, "out")

The bounds are worst-case (first order, Higham-style counts of roundings);
the bit-exact ops (Hadamard, quantization, quant_gemm's integer sums) need
none: compare them with ``torch.equal``.
"""

from __future__ import annotations

import math

import torch

from . import reference as R
from .formats import code_format

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
# unit roundoff of each dtype (half its ulp at 1.0)
UNIT_ROUNDOFF = {dt: eps / 2 for dt, eps in EPS.items()}
U64 = 2.0**-53  # unit roundoff of fp64

# Keyword arguments of the latent ops' error bounds for each backend: both
# the CPU kernels (csrc/cpu/latent_attention.cpp: torch's fp32 / exact int8
# GEMMs, base-2 online softmax) and the CUDA kernels accumulate in fp32;
# each has its own count of roundings (kernel="cpu", "cuda", "cuda_tc").
#
# latent_attention_error_bound:
# On CUDA the launcher picks the CUDA-core or the tensor-core split kernel
# per shape (QSVD_LATENT_KERNEL forces one); "cuda_auto" is the larger of the
# "cuda" and "cuda_tc" bounds, so it holds whichever kernel ran (the
# tensor-core bound is the looser one except with RoPE and int8 weights).
LATENT_BOUND = {"cpu": {"u": U32, "kernel": "cpu"}, "cuda": {"u": U32, "kernel": "cuda_auto"}}

# Keyword arguments for a CUDA split kernel forced with QSVD_LATENT_KERNEL.
LATENT_KERNEL_BOUND = {"simt": {"u": U32, "kernel": "cuda"}, "tc": {"u": U32, "kernel": "cuda_tc"}}

# latent_reconstruct_error_bound:
RECONSTRUCT_BOUND = {"cpu": {"u": U32}, "cuda": {"u": U32, "tensor_cores": True}}

# Token tiles of the CPU latent_attention kernel (kTileRope, kTileAbsorbed in
# csrc/cpu/latent_common.h), keyed by "K's rotary part rebuilt": the depth of
# its fp32 sums depends on them.
CPU_TILE_TOKENS = {True: 64, False: 256}

# Largest token tile of the tensor-core split kernels (kTcMaxTileTokens).
TC_MAX_TILE_TOKENS = 64

# Two runs of one quantized LLM that differ only in fp32 rounding (a cached
# decode against a recomputed prefix; vLLM's kernels against Hugging Face's
# around the same QSVD layers) do not give bit-equal logits: now and then an
# activation sits within a rounding of a quantization boundary and its code
# moves one step (1/127 of the row's range at 8 bits), and that step travels
# through the layers above. Measured on SmolLM2-135M at W8A8 (30 layers):
# 0.6 % of the logits' scale. A run that lost, misplaced or misread cached
# tokens is off by the scale itself. The logits of such runs agree within
# this fraction of max |logit|; a greedy choice may differ only where the
# reference's own top two logits are that close.
QUANTIZED_LM_LOGIT_DRIFT = 2e-2


def random_codes(bits: int, shape, generator=None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``bits``-bit codes over the full symmetric range [-qmax, qmax]:
    (int8 codes ``shape``, their stored form: int8, or packed INT4 uint8 with
    the last dimension halved). For tests and benches of the ops."""
    fmt = code_format(bits)
    codes = torch.randint(-fmt.qmax, fmt.qmax + 1, tuple(shape), dtype=torch.int8, generator=generator)
    return codes.to(device), fmt.pack(codes).to(device)


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


def _abs_kv(cache, cache_scale, block_table, L, b, bits, w_k, w_v, rope_cos):
    """Magnitudes |c| |W_k| and |c| |W_v| of one sequence ([L, H_kv, d]);
    with RoPE, |k cos| + |rot(k) sin| <= |k| + |rot(k)| over the rotary dims
    (the tables' width d_rope; the rest are position-free)."""
    c = R.gather_latent_ref(cache, cache_scale, block_table, L, b, bits).abs()
    k = torch.einsum("tr,hrd->thd", c, w_k)
    v = torch.einsum("tr,hrd->thd", c, w_v)
    if rope_cos is not None:
        n = rope_cos.shape[-1]
        half = n // 2
        rot = torch.cat((k[..., half:n], k[..., :half], torch.zeros_like(k[..., n:])), dim=-1)
        k = k + rot
    return k, v


def latent_attention_error_bound(q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale,
                                 bits, sm_scale, rope_cos=None, rope_sin=None, *, u=U32, kernel="cpu",
                                 rope_keys=None):
    """First-order worst-case bound of the evaluation error in arithmetic of
    unit roundoff u (Higham: a sum of n terms is off by at most n u sum|terms|),
    before the output rounding.

    A score takes r + d + O(1) roundings on terms bounded by
    S = |sm_scale| sum_j |q_j| (|c| |W_k|)_j, so |ds| <= (r + d + 4) u max_t S.
    Score errors move softmax weights by at most 2 |ds| p_t, so the output
    moves by 2 |ds| max|v|; summing p_t v_t over L tokens and the r-term
    up-projection add (L + r + 4) u max|v|. lse = max + log(sum) moves by
    |ds| plus (L + 4) u. Returns (bound_out [B, H, d], bound_lse [B, H]).

    kernel="cuda" counts the CUDA kernel's evaluation order
    (include/qsvd/kernels/latent_attention_kernel.cuh), in fp32 with a base-2
    softmax: x_t = score_t log2(e) with an integer running max M, p_t =
    exp2f(x_t - M), all rescales exact powers of two.
      - Score: score_scale = fl(sm_scale log2 e) (1 rounding), folded into
        the query. No RoPE: q'_j = (q_j ws_j) c (2), q_lat = W q' (d),
        code . q_lat (r), times s_t (1): r + d + 4. RoPE: K~ = codes W (r;
        int8 x int8 and int8 x fp16 products are exact), times ws (1),
        rotate-half (2), q c (1), dot (d), times s_t (1): r + d + 6.
        Cached rotary keys (``rope_keys``, partial RoPE: the absorbed
        kernel): the position-free part as no RoPE over d - d_rope dims
        (r + d - d_rope + 4), the rotary part q' (2) . the stored keys
        (d_rope; the reference reads the same stored values), their sum (1):
        at most r + d + 5. Counted as r + d + 6 on S.
      - Weight of token t: x_t - M rounds by u |x_t - M| <= u (2 max|x| + 1)
        (M <= max x + 1), i.e. 2 u S_max + u ln2 in natural-log units; exp2f
        is within 2 ulp (<= 4u relative). Together with the score:
        ds = (r + d + 8) u S_max + 5 u, acting on the weights as a score
        error does (2 ds max|v| on the output, ds on lse).
      - Output: acc = sum_t (p_t s_t) code_t: 1 + (depth <= L + 1: a split's
        sequential sum plus the merge of the non-empty splits); the
        up-projection r, times ws 1, the division 1: (L + r + 4) u max|v|;
        the denominator l = sum p_t has its own L + 1 roundings, which move
        o = acc / l by (L + 1) u |o| <= (L + 1) u max|v|: in all
        (2 L + r + 8) u max|v|.
      - lse = (M + log2f(l)) ln2: l's L + 1 roundings, log2f within 1 ulp
        of log2 l (2 u max(1, log2 L) absolute, i.e. 2 u (1 + ln L) in
        natural log), and the add, the rounded ln2 and the product, each
        u |lse| <= u (S_max + ln L + 1): ds + (L + 4 + 2 (1 + ln L)) u
        + 3 u (S_max + ln L + 1).

    kernel="cuda_tc" counts the tensor-core split kernels
    (include/qsvd/kernels/latent_attention_tc.cuh). Tensor cores do not
    accumulate with round-to-nearest: products of fp16/bf16 operands are
    exact, but each mma sums a group of k >= 4 products and the accumulator
    after aligning them to the largest exponent and truncating (no guard
    bits assumed), then truncates the sum (Fasi, Higham, Mikaitis, Pranesh,
    "Numerical behavior of NVIDIA tensor cores", 2021). With A_j <= the sum of
    all |terms| so far, a group loses < (k + 1) 2u A_j to the alignment and
    < 2u A_j to the final truncation: (2 + 4/k) u <= 3u per product, so a
    tensor-core dot of n terms is off by at most 3 n u sum|terms| (n counts
    the zero padding to a multiple of 16: r16 = round_up(r, 16)).
      - RoPE, fp16/bf16 weights: K~ = codes W_uk on tensor cores with exact
        operands (codes are exact in fp16/bf16): 3 r16 u in place of r u;
        every later step is the CUDA-core kernel's. ds = (3 r16 + d + 8) u
        S_max + 5u.
      - RoPE, int8 weights: K~ on INT8 tensor cores, an exact int32 sum
        (|K~| <= 128^2 r <= 2^27) rounded once to fp32 (|error| <= u |K~|
        <= u sum_i |c_i| |W_ij|): 1 u in place of r u. ds = (d + 9) u S_max
        + 5u, below the CUDA-core kernel's.
      - No RoPE: q_lat 2^e = hi + lo in fp16 (a power-of-two pre-scale puts
        max |q_lat| in [2^14, 2^15)): |q_lat - (hi + lo) 2^-e| <= 2^-22 |q_lat|
        + 2^-25 2^-e, and 2^-e <= 2^-14 max_i |q_lat_i|. Then two MMAs over
        r16 (2 r16 products, |hi| + |lo| <= (1 + 2^-10) |q_lat|): 6 r16 (1 + 2^-9)
        u; the fixed-order sum of <= 8 warp partials: 7u; 2^-e exact. With
        the CUDA-core count (score_scale 1, q' 2, prologue d, s_t 1, weight
        step 2): ds = (6 r16 (1 + 2^-9) + d + 17) u S_max + 5u + F_s,
        F_s = 2^-38 |sm_scale| max_i (|W_uk| |q|)_i max_t sum_i |c_t,i| (the
        2^-25 floor, in natural-log units, with slack for the first-order
        factors).
        Output: w_t = p_t s_t (1), its split (2^-22 = 4u, plus a floor of
        2^-25 2^-f with 2^-f <= 2^-14 max_t s_t), two MMAs over T <= 64
        tokens (6 T (1 + 2^-9) u), then acc = acc 2^(M_old - M_new) + V 2^-f
        in fp32 (powers of two exact; one add per tile, depth <= L + 1 with
        the merge): (2 L + r + 6 T (1 + 2^-9) + 9) u max|v| + F_v, F_v =
        2^-37 L max_t s_t qmax sum_i |W_uv|_i (the floor summed over L tokens,
        divided by l >= 1/2; qmax = 127 or 7 bounds |code|).

    kernel="cuda_auto" is the elementwise larger of "cuda" and "cuda_tc":
    the bound when the launcher chooses the split kernel.

    kernel="cpu" counts the CPU kernel (csrc/cpu/latent_attention.cpp), fp32
    throughout, with torch's GEMMs (any summation order and FMA use: a dot
    of n terms is off by at most n u sum|terms|) and the CUDA kernels'
    base-2 softmax (integer running max M, exact power-of-two rescales),
    over token tiles of T = CPU_TILE_TOKENS tokens (64 where K's rotary
    part is rebuilt, 256 otherwise: no RoPE, or ``rope_keys`` read) and at
    most ceil(L / T) splits per sequence.
      - Score: q' = q fl(sm_scale log2 e) (2). RoPE: K~ = codes x W_uk, an
        exact int32 sum rounded once (int8 weights) or an fp32 GEMM of r
        exact products (r), times w_uk_scale (1), times s_t (1),
        rotate-half (2), q' . k (d): at most r + d + 6. No RoPE: q'' =
        q' w_uk_scale (1), q_lat = W_uk q'' (d), c . q_lat (r), times s_t
        (1): r + d + 4. With the weight step (x_t - M: 2u max|x| + u ln2;
        exp2f within 2 ulp): ds = (r + d + 8) u S_max + 5u, as "cuda".
        Partial RoPE (tables of width d_rope < d): the rotary part as RoPE
        (r + d_rope + 6 on its terms), the position-free part as no RoPE
        (r + (d - d_rope) + 4), their sum (1): at most r + d + 6, within the
        count above (CUDA serves partial RoPE only with ``rope_keys``:
        "cuda" above).
      - Output: w_t = p_t s_t (1); the tile GEMM sum_t w_t c_t (min(T, L)
        terms, products included); acc * 2^k + tile (1 per tile); the merge
        of the splits (1 per split): n_acc = 1 + min(T, L) + 2 ceil(L/T).
        l = sum p_t: n_l = min(T, L) + 2 ceil(L/T), moving o = acc / l by
        n_l u |o|. Then acc x W_uv (r), times w_uv_scale (1), / l (1):
        2 ds max|v| + (n_acc + n_l + r + 2) u max|v|.
      - lse = (M + log2 l) ln2: n_l u from l, log2f 2u (1 + ln L), the add,
        the rounded ln2 and the product 3u (S_max + ln L + 1):
        ds + (n_l + 2 + 2 ln L) u + 3u (S_max + ln L + 1).
      - No RoPE, the split path (the default where torch has an int8
        brgemm (AMX) or at::_int_mm (oneDNN, exact: VNNI) and MKL's bf16
        GEMM; QSVD_CPU_LATENT_GEMM picks; also partial RoPE with
        ``rope_keys``, whose rotary part adds q' . k_rope (d_rope + 3
        roundings, inside the count below)). Scores on
        int8 digits of q_lat: per query head,
        sigma = fl(max|q_lat| / 127), t_i = fl(q_lat_i / sigma) (u |q_lat_i|),
        a_i = rint(t_i), b_i = rint(fl((t_i - a_i) 254)) (t_i - a_i exact), so
        |q_lat_i - sigma (a_i + b_i / 254)| <= sigma (1/508 + u/2) + u |q_lat_i|
        (u/2: the rounding of (t_i - a_i) 254, in t's units), with
        sigma (1/508 + u/2) <= (1 + 2^-10) max|q_lat| / 64516: 1/64516 of
        the head's largest entry, with slack. c . a and c . b are exact int32 sums; then fl(A),
        fl(B) fl(1/254) (3), the add, times sigma, times s_t: 7. Score:
        q' (2), q'' (1), q_lat (d), t_i (1), 7: d + 11, with the weight step
        (4) d + 15, counted as d + 16 on S_max, plus the floor
        F_s = (1 + 2^-10) / 64516 |sm_scale| max_i (|W_uk| |q|)_i
        max_t sum_i |c_t,i| (natural-log units; the slack covers q_lat's own
        d + 3 roundings). ds is the larger of the two paths' ds.
        V on bf16: w_t = p_t s_t (1) split as hi + lo in bf16 (|w - hi -
        lo| <= 2^-18 |w|: 64u), one GEMM of 2 min(T, L) exact products
        (codes are exact in bf16), the rescale and merge as above, hi + lo
        once (1): n_acc = n_l + min(T, L) + 66, so the output counts
        2 n_l + min(T, L) + r + 68 (the larger count is used).
        V on int8 digits (with at::_int_mm's digit scores): per query
        head and tile, w's row as three digits (qsvd::digit_row: |w_t -
        sigma (a + b/254 + c/254^2)| <= 1.03 u omega + u w_t, omega the
        tile's largest w), one exact int32 GEMM, then (A + B fl(1/254)) +
        C fl(1/254^2), times sigma, acc f + that: 8 roundings on the
        tile's sum; with w's own (1), the rescales and the merge: the
        output counts 2 n_l + r + 22 on max|v| (10 of them for the
        up-projection's digits below), plus the digits' omega
        term: summed over a tile's tokens, T omega |c_t| |W_v|; since
        omega <= max_t s_t max_(t in tile) p_t and the tiles' largest
        weights sum to at most l, over l it is at most 1.03 min(T, L) u
        V_d, V_d = max_t |s_t| max_t (|codes_t| |W_v|) (>= max|v|). The
        larger of the two V paths' totals is used.
        With _int_mm's digit scores and int8 weights, the up-projections of
        more query rows than weight streaming takes run on int8 digits
        too: q'' as two digits (the scores read q_lat as two digits
        anyway), so q_lat = W_uk q'' is off by at most (1 + 2^-10) / 64516
        max_k |q''_k| sum_k |W_uk,jk| per entry (W_uk unscaled, over the
        position-free k), and a score by F_q = (1 + 2^-10) / 64516
        |sm_scale| max_k |q_k ws_k| max_t sum_j |c_t,j| sum_k |W_uk,jk|,
        added to the floor, the digits' own roundings (10) to the count:
        d + 26 on S_max. acc as three digits per row (fp32-class: the
        output): acc W_uv off by 1.03 u max_i |acc_i| sum_i |W_uv|_i, and
        max_i |acc_i| <= l max_t s_t qmax, so after / l by F_o = 1.03 u
        max_t s_t qmax sum_i |W_uv|_i, added to the output's floor. AMX and
        AVX512-BF16 treat subnormal bf16 inputs as zero and flush
        subnormal results: < 2^-115 qmax per token and acc entry, over L
        tokens, times sum_i |W_uv|_i, over l >= 1/2 (the largest weight
        of a merged row is above 1/2): floor F_v = 2^-110 L qmax
        sum_i |W_uv|_i, with slack.
    """
    cache, cache_scale = R.latent_cache_parts(cache, cache_scale, bits, w_uk.shape[1])  # either layout
    if kernel == "cuda_auto":
        args = (q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, bits, sm_scale,
                rope_cos, rope_sin)
        simt = latent_attention_error_bound(*args, u=u, kernel="cuda")
        tc = latent_attention_error_bound(*args, u=u, kernel="cuda_tc")
        return torch.maximum(simt[0], tc[0]), torch.maximum(simt[1], tc[1])
    B, H, d = q.shape
    H_kv, r, _ = w_uk.shape
    w_k, w_v = _abs_weight(w_uk, w_uk_scale), _abs_weight(w_uv, w_uv_scale)
    bound_out = torch.zeros(B, H, d, dtype=torch.float64)
    bound_lse = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        k, v = _abs_kv(cache, cache_scale, block_table, L, b, bits, w_k, w_v, rope_cos)
        k = k.repeat_interleave(H // H_kv, dim=1)
        v_max = v.repeat_interleave(H // H_kv, dim=1).amax(dim=0)  # [H, d]
        s_abs = abs(sm_scale) * torch.einsum("hd,thd->ht", q[b].double().abs(), k)
        s_max = s_abs.amax(dim=-1)  # [H]
        if kernel in ("cuda", "cuda_tc"):
            rope = rope_cos is not None
            r16 = -(-r // 16) * 16
            score_terms, out_terms, floor_s, floor_v = r + d + 8, 2 * L + r + 8, 0.0, 0.0
            if kernel == "cuda_tc" and rope:
                score_terms = d + 9 if w_uk.dtype == torch.int8 else 3 * r16 + d + 8
            elif kernel == "cuda_tc":
                score_terms = 6 * r16 * (1 + 2.0**-9) + d + 17
                out_terms = 2 * L + r + 6 * TC_MAX_TILE_TOKENS * (1 + 2.0**-9) + 9
                q_lat_abs = torch.einsum("hrd,hd->hr", w_k.repeat_interleave(H // H_kv, dim=0), q[b].double().abs())
                c_abs = R.gather_latent_ref(cache, cache_scale, block_table, L, b, bits).abs()
                floor_s = 2.0**-38 * abs(sm_scale) * q_lat_abs.amax(dim=-1) * c_abs.sum(dim=-1).max()
                t = torch.arange(L)
                scales = cache_scale[block_table[b].long()[t // cache.shape[1]], t % cache.shape[1]]
                w_v_rows = w_v.sum(dim=1).repeat_interleave(H // H_kv, dim=0)  # [H, d]
                qmax = code_format(bits).qmax
                floor_v = 2.0**-37 * L * scales.double().abs().max() * qmax * w_v_rows
            ds = score_terms * u * s_max + 5 * u + floor_s
            bound_out[b] = 2 * ds[:, None] * v_max + out_terms * u * v_max + floor_v
            bound_lse[b] = ds + (L + 6 + 2 * math.log(L)) * u + 3 * u * (s_max + math.log(L) + 1)
        elif kernel == "cpu":
            T = CPU_TILE_TOKENS[rope_cos is not None and rope_keys is None]
            n_l = min(T, L) + 2 * -(-L // T)
            ds = (r + d + 8) * u * s_max + 5 * u
            out_terms, floor_v = 2 * n_l + r + 3, 0.0
            cached_partial = rope_keys is not None and rope_cos.shape[-1] < d
            if rope_cos is None or cached_partial:  # the split path may run: the larger of both paths' counts, floors
                q_lat_abs = torch.einsum("hrd,hd->hr", w_k.repeat_interleave(H // H_kv, dim=0), q[b].double().abs())
                c_abs = R.gather_latent_ref(cache, cache_scale, block_table, L, b, bits).abs()
                floor_s = (1 + 2.0**-10) / 64516 * abs(sm_scale) * q_lat_abs.amax(dim=-1) * c_abs.sum(dim=-1).max()
                if w_uk.dtype == torch.int8:  # q_lat = W_uk q'' on int8 digits of q'' (rows past weight streaming)
                    d0 = rope_cos.shape[-1] if rope_cos is not None else 0
                    qws = (q[b].double().abs() * w_uk_scale.double().abs().repeat_interleave(H // H_kv, dim=0))
                    w_rows = w_uk.double().abs()[..., d0:].sum(dim=-1)  # [H_kv, r]: sum_k |W_jk|, unscaled
                    c_w = torch.einsum("tr,hr->th", c_abs, w_rows).amax(dim=0).repeat_interleave(H // H_kv)
                    floor_s = floor_s + (1 + 2.0**-10) / 64516 * abs(sm_scale) * qws[:, d0:].amax(dim=-1) * c_w
                ds = torch.maximum(ds, (d + 26) * u * s_max + 5 * u + floor_s)
                qmax = code_format(bits).qmax
                floor_v = 2.0**-110 * L * qmax * w_v.sum(dim=1).repeat_interleave(H // H_kv, dim=0)  # [H, d]
                # V on int8 digits: max_t |s_t| max_t (|codes_t| |W_v|), [H, d]
                t = torch.arange(L)
                s_tok = cache_scale[block_table[b].long()[t // cache.shape[1]], t % cache.shape[1]].double().abs()
                codes_abs = torch.where(s_tok[:, None] > 0, c_abs / s_tok[:, None].clamp(min=2.0**-1074), 0.0)
                v_digits = s_tok.max() * torch.einsum("tr,hrd->thd", codes_abs, w_v).amax(dim=0)
                v_digits = v_digits.repeat_interleave(H // H_kv, dim=0)
                split_out = torch.maximum((2 * n_l + min(T, L) + r + 68) * u * v_max,  # V on bf16
                                          (2 * n_l + r + 22) * u * v_max + 1.03 * min(T, L) * u * v_digits)
                if w_uv.dtype == torch.int8:  # acc W_uv on int8 digits of acc: max|acc| <= l max_t s_t qmax
                    floor_v = floor_v + 1.03 * u * s_tok.max() * qmax * w_v.sum(dim=1).repeat_interleave(H // H_kv,
                                                                                                        dim=0)
                bound_out[b] = 2 * ds[:, None] * v_max + split_out + floor_v
                bound_lse[b] = ds + (n_l + 2 + 2 * math.log(L)) * u + 3 * u * (s_max + math.log(L) + 1)
                continue
            bound_out[b] = 2 * ds[:, None] * v_max + out_terms * u * v_max + floor_v
            bound_lse[b] = ds + (n_l + 2 + 2 * math.log(L)) * u + 3 * u * (s_max + math.log(L) + 1)
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
    return bound_out, bound_lse


def latent_reconstruct_error_bound(cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale,
                                   bits, rope_cos=None, rope_sin=None, *, u=U32, tensor_cores=False):
    """k = RoPE(c W_k), v = c W_v: (r + 4) u times the magnitudes.

    A sum of r exact products (r - 1 roundings, any order), then the token
    scale and the int8 weight scale (2), then RoPE's products and sum (2, on
    |k| + |rotate_half(k)|): r + 3 roundings. tensor_cores=True is the CUDA
    kernel (include/qsvd/kernels/latent_cache_kernel.cuh), whose GEMM runs
    on tensor cores through cuBLAS: they align and truncate instead of
    rounding to nearest, at most 3u per product (the derivation is in
    latent_attention_error_bound, kernel="cuda_tc"), so the sum counts 3 r."""
    cache, cache_scale = R.latent_cache_parts(cache, cache_scale, bits, w_uk.shape[1])  # either layout
    H_kv, r, d = w_uk.shape
    w_k, w_v = _abs_weight(w_uk, w_uk_scale), _abs_weight(w_uv, w_uv_scale)
    ks, vs = [], []
    for b in range(block_table.shape[0]):
        L = int(seq_lens[b])
        if L:
            k, v = _abs_kv(cache, cache_scale, block_table, L, b, bits, w_k, w_v, rope_cos)
            ks.append(k)
            vs.append(v)
    if not ks:
        return torch.zeros(0, H_kv, d, dtype=torch.float64), torch.zeros(0, H_kv, d, dtype=torch.float64)
    n = (3 * r if tensor_cores else r) + 4
    return n * u * torch.cat(ks), n * u * torch.cat(vs)


def causal_attention_bound(q, k, v, sm_scale: float, dtype) -> torch.Tensor:
    """Elementwise bound [H, n, d] on |integrations.core.causal_attention(q,
    k, v, sm_scale, dtype) - reference.causal_attention_ref(...)|, from its
    arithmetic, with u the unit roundoff of ``dtype`` (fp32: U32):

    - q sm_scale, k and v rounded to ``dtype`` (u each); each score summed in
      fp32 over d products ((d + 2) U32) and rounded to ``dtype`` (u): a score
      moves by at most D = (3u + (d + 2) U32) A, A = max_j sm_scale sum_i
      |q_i| |k_ji| (a bound on |s_j|, over the row's keys);
    - moving every score of a row by at most D scales each softmax weight by
      at most e^{+-2D}: sum_j |p'_j - p_j| <= e^{2D} - 1; the weights' own
      evaluation (exp, fp32 sums over L keys) and their rounding to
      ``dtype``: (u + (L + 4) U32) relative;
    - the weighted sum over V: the rounded v (u), fp32 sums over L keys
      ((L + 2) U32), the output's rounding to ``dtype`` (u).

    With W = max_j |v_jc| over the kv head's keys (for the output column c):
    bound = W ((e^{2D} - 1)(1 + u)^2 + (3u + (2L + 6) U32)(1 + u)^2), first
    order in u, as the other bounds here: the (1 + u)^2 factors absorb the
    dropped products of roundings while D stays below about 0.8 (the tests
    assert the bound stays far below W). The result is returned as fp32
    (exact from ``dtype``): compare with ``assert_within(..., torch.float32)``."""
    u = UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else U32
    H, n, d = q.shape
    H_kv, L = k.shape[:2]
    rep = H // H_kv
    K = k.double().abs().repeat_interleave(rep, 0)
    A = (torch.einsum("hnd,hld->hnl", q.double().abs(), K) * abs(sm_scale)).amax(-1, keepdim=True)  # [H, n, 1]
    D = (3 * u + (d + 2) * U32) * A
    W = v.double().abs().amax(1, keepdim=True).repeat_interleave(rep, 0)  # [H, 1, d]
    grow = (1 + u) ** 2
    return W * (torch.expm1(2 * D) * grow + (3 * u + (2 * L + 6) * U32) * grow)
