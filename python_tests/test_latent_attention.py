"""latent_attention and latent_reconstruct_kv against the exact-math reference.

Error bounds: the reference computes the math in float64 from the same codes
(the truth). The allowed error is the worst-case evaluation error of the
backend's fp32 arithmetic (the CPU kernel's order of operations, or the CUDA
kernels'), derived in helpers.py from the magnitudes of the terms, plus the
final rounding to the output dtype. Unused cache slots hold NaN scales, so a
stray read fails the test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import code_row_bytes, pack_latent_rows, packed_row_bytes

from conftest import isa_levels_to_test, require_kernel
from helpers import (
    EPS,
    LATENT_BOUND,
    TINY,
    assert_within,
    latent_attention_error_bound,
    RECONSTRUCT_BOUND,
    latent_reconstruct_error_bound,
    make_paged_cache,
    make_weights,
    rope_keys_bound,
)

HEADS = [(4, 4), (8, 2), (6, 1)]  # (H, H_kv): MHA, GQA, MQA
BLOCKS = [16, 64, 256]
Q_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
RANKS = [48, 130, 256]  # 130: not a multiple of 16 / 32 / 64
HEAD_DIMS = [64, 128]

# bits x weight dtype x RoPE, each combined with a rotating choice of the
# other axes so that every value of every axis is covered.
CASES = []
for i, (bits, wdtype, rope) in enumerate(itertools.product([8, 4], [torch.float16, torch.bfloat16, torch.int8],
                                                           [False, True])):
    H, H_kv = HEADS[i % 3]
    CASES.append(pytest.param(bits, wdtype, rope, H, H_kv, BLOCKS[(i // 3) % 3], Q_DTYPES[i % 3], RANKS[(i + 1) % 3],
                              HEAD_DIMS[i % 2], id=f"b{bits}-{str(wdtype)[6:]}-{'rope' if rope else 'norope'}-H{H}kv{H_kv}"))

SEQ_LENS = [37, 0, 300, 1, 64]


def _run(device, seq_lens, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d, seed=0, **cache_kw):
    g = torch.Generator().manual_seed(seed)
    pc = make_paged_cache(seq_lens, r, bits, block_size, generator=g, **cache_kw)
    w_uk, w_uk_s, w_uv, w_uv_s = make_weights(H_kv, r, d, wdtype, generator=g)
    q = torch.randn(len(seq_lens), H, d, generator=g).to(q_dtype)
    cos, sin = R.rope_tables(max(max(seq_lens), 1) + 5, d) if rope else (None, None)
    sm_scale = 1.0 / math.sqrt(d)
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, w_uk, w_uk_s, w_uv, w_uv_s, bits, sm_scale, cos, sin]
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out, lse = qk.latent_attention(q.to(device), *dev)
    truth = R.latent_attention_ref(q.double(), *args)
    bound = latent_attention_error_bound(q, *args, **LATENT_BOUND[device])
    return out.cpu(), lse.cpu(), truth, bound, (q, args)


def _check(out, lse, truth, bound, q_dtype, what=""):
    assert_within(out, truth[0], bound[0], q_dtype, f"out {what}")
    assert_within(lse, truth[1], bound[1], torch.float32, f"lse {what}")


@pytest.mark.parametrize("bits,wdtype,rope,H,H_kv,block_size,q_dtype,r,d", CASES)
def test_attention_matches_reference(device, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d):
    require_kernel("latent_attention", device)
    out, lse, truth, bound, _ = _run(device, SEQ_LENS, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d)
    assert out.dtype == q_dtype and out.shape == (len(SEQ_LENS), H, d)
    assert lse.dtype == torch.float32 and lse.shape == (len(SEQ_LENS), H)
    _check(out, lse, truth, bound, q_dtype)
    # seq_len 0: zeros and -inf.
    assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())
    assert bool(torch.isfinite(out).all())


NOROPE_CASES = [c for c in CASES if "norope" in c.id]


@pytest.mark.parametrize("gemm", ["fp32", "split"])
@pytest.mark.parametrize("bits,wdtype,rope,H,H_kv,block_size,q_dtype,r,d", NOROPE_CASES)
def test_cpu_absorbed_gemm_paths(monkeypatch, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d, gemm):
    """The CPU absorbed path's two GEMM paths (fp32; split: int8 digits of
    q_lat on torch's int8 brgemm with bf16 hi/lo weights on MKL's bf16 GEMM,
    or on oneDNN's _int_mm with int8 digits of the weights and of the
    up-projections' rows),
    each forced, within the derived bound; ranks that are not multiples of
    4 (130) exercise the padded codes; a long sequence spans several token
    tiles and splits."""
    if gemm == "split" and not _split_available():
        pytest.skip(SPLIT_MISSING)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", gemm)
    out, lse, truth, bound, _ = _run("cpu", SEQ_LENS + [700], bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d)
    _check(out, lse, truth, bound, q_dtype, gemm)


SPLIT_MISSING = ("no split path here (it needs an exact int8 GEMM: torch's int8 brgemm on an AMX CPU with MKL's bf16 "
                 "GEMM, or oneDNN's _int_mm on a CPU with VNNI; oneDNN enabled): the kernel always takes the fp32 "
                 "path, which the fp32 case tests")


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_cpu_split_path_at_ranks_below_the_gemm_width(monkeypatch, r):
    """Ranks that are not multiples of 4, down to 1: the digit GEMMs take
    K padded with zero columns (torch's _int_mm gets K = 1 wrong), within
    the derived bound."""
    if not _split_available():
        pytest.skip(SPLIT_MISSING)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "split")
    out, lse, truth, bound, _ = _run("cpu", [37, 300, 1], 8, torch.int8, False, 4, 2, 16, torch.float32, r, 64)
    _check(out, lse, truth, bound, torch.float32, f"split r={r}")


def _check_uniform_weights_positive_values(pc, H, H_kv, d, g, what):
    """The two digit tests' run: q = 0 (every softmax weight 1), int8 W_uk,
    W_uv all 100 x 0.01 (positive: no cancellation), INT8 cache pc; checked
    against the reference within the derived bound, which is returned."""
    r = pc.cache.shape[-1]
    w_uk, w_uk_s, _, _ = make_weights(H_kv, r, d, torch.int8, generator=g)
    w_uv = torch.full((H_kv, r, d), 100, dtype=torch.int8)
    w_uv_s = torch.full((H_kv, d), 0.01)
    q = torch.zeros(1, H, d)
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, w_uk, w_uk_s, w_uv, w_uv_s, 8, d**-0.5, None, None]
    out, lse = qk.latent_attention(q, *args)
    truth = R.latent_attention_ref(q.double(), *args)
    bound = latent_attention_error_bound(q, *args, **LATENT_BOUND["cpu"])
    _check(out, lse, truth, bound, torch.float32, what)
    return bound


@pytest.mark.parametrize("gemm", ["fp32", "split"])
def test_cpu_v_step_keeps_fp32_accuracy_where_two_digits_would_not(monkeypatch, gemm):
    """The split path's V step (three int8 digits of w = p s with _int_mm's
    digit scores, bf16 hi/lo with brgemm's) within the derived bound on data
    built against it: q = 0 (every weight 1, so w_t = s_t), every code 127,
    positive W_uv (no cancellation), and token scales whose quotients
    w_t / sigma = k + 3.49/254 leave the same residual 0.49/254 after two
    digits. Two digits would be off by 7 tokens x 0.49/254 sigma x |c W| / 8,
    about 2x the bound (asserted: over 1.5x), so a dropped third digit fails."""
    if gemm == "split" and not _split_available():
        pytest.skip(SPLIT_MISSING)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", gemm)
    L, r, d, H, H_kv = 8, 8, 16, 2, 1
    g = torch.Generator().manual_seed(3)
    pc = make_paged_cache([L], r, 8, 16, extra_blocks=0, generator=g)
    sigma = 2.0**-10
    quotients = torch.tensor([127.0] + [60 + t + 3.49 / 254 for t in range(1, L)], dtype=torch.float64)
    for t in range(L):
        blk = int(pc.block_table[0, t // 16])
        pc.cache[blk, t % 16] = 127
        pc.cache_scale[blk, t % 16] = float(quotients[t] * sigma)
    bound = _check_uniform_weights_positive_values(pc, H, H_kv, d, g, f"V digits, {gemm}")
    s = pc.cache_scale[pc.block_table[0].long()[torch.arange(L) // 16], torch.arange(L) % 16].double()
    residual = (s / sigma - quotients.floor() - 3 / 254).clamp(min=0)  # 0 for the first token, 0.49/254 after
    two_digit_error = (residual * sigma).sum() * 127 * (100 * 0.01 * r) / L
    assert (two_digit_error > 1.5 * bound[0]).all(), (two_digit_error, bound[0].max())


@pytest.mark.parametrize("gemm", ["fp32", "split"])
def test_cpu_up_projection_keeps_fp32_accuracy_where_two_digits_would_not(monkeypatch, gemm):
    """acc x W_uv with more query rows than weight streaming takes (16 heads
    on one kv head): on the split path with _int_mm's digit scores and int8
    weights, acc's rows as three int8 digits. Data built against it: q = 0
    (both weights 1), two tokens, token 0's codes 127 then 1s, token 1's
    0 then 1s at 3.49/254 of token 0's scale, so acc_i / sigma = 1 +
    3.49/254 for i >= 1: the same residual 0.49/254 after two digits.
    Positive W_uv (no cancellation). Two digits would be off by about 8x
    the bound (asserted: over 2x), so a dropped third digit fails."""
    if gemm == "split" and not _split_available():
        pytest.skip(SPLIT_MISSING)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", gemm)
    L, r, d, H, H_kv = 2, 8, 16, 16, 1
    g = torch.Generator().manual_seed(4)
    pc = make_paged_cache([L], r, 8, 16, extra_blocks=0, generator=g)
    s0 = 2.0**-10
    blk = int(pc.block_table[0, 0])
    pc.cache[blk, 0] = torch.tensor([127] + [1] * (r - 1), dtype=torch.int8)
    pc.cache[blk, 1] = torch.tensor([0] + [1] * (r - 1), dtype=torch.int8)
    pc.cache_scale[blk, 0], pc.cache_scale[blk, 1] = s0, s0 * 3.49 / 254
    bound = _check_uniform_weights_positive_values(pc, H, H_kv, d, g, f"up-projection digits, {gemm}")
    sigma = s0  # max acc_i = 127 s0, over 127
    s1 = float(pc.cache_scale[blk, 1])
    residual = (s1 / s0 - 3 / 254) * sigma  # per acc entry i >= 1, after two digits
    two_digit_error = (r - 1) * residual * (100 * 0.01) / L
    assert (two_digit_error > 2 * bound[0]).all(), (two_digit_error, bound[0].max())


def _split_available():
    """Whether the absorbed path's split GEMMs serve here now (int8 digit
    scores on brgemm with MKL's bf16 GEMM, or on _int_mm), whatever
    QSVD_CPU_LATENT_GEMM says."""
    paths = qk._C.cpu_paths()
    return paths["latent_digit_scores"] != "none"


def test_cpu_gemm_paths_differ_and_bad_knob_is_refused(monkeypatch):
    """The knob takes effect (the split path changes the last bits), and a
    bad value is an error naming it."""
    if not _split_available():
        pytest.skip(SPLIT_MISSING)
    outs = {}
    for gemm in ("fp32", "split"):
        monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", gemm)
        outs[gemm] = _run("cpu", [300], 8, torch.float16, False, 4, 4, 16, torch.float32, 64, 64)[0]
    assert not torch.equal(outs["fp32"], outs["split"])
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "fast")
    with pytest.raises(RuntimeError, match="QSVD_CPU_LATENT_GEMM must be fp32, split or auto"):
        _run("cpu", [3], 8, torch.float16, False, 2, 2, 16, torch.float32, 16, 16)


def test_cpu_split_path_follows_onednn_switch(monkeypatch):
    """With torch's oneDNN switched off after a call on the split path, the
    next call takes the fp32 path (the int8 GEMMs' availability is asked per
    call: brgemm and _int_mm both need oneDNN) within the same bound, and a
    forced split is an error naming the knob."""
    if not _split_available():
        pytest.skip("no split path here: every call takes the fp32 path, with oneDNN on or off")
    case = ("cpu", [300], 8, torch.float16, False, 4, 4, 16, torch.float32, 64, 64)
    _run(*case)
    with torch.backends.mkldnn.flags(enabled=False):
        out, lse, truth, bound, _ = _run(*case)
        _check(out, lse, truth, bound, torch.float32, "fp32")
        monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "fp32")
        assert torch.equal(out, _run(*case)[0])
        monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "split")
        with pytest.raises(RuntimeError, match="QSVD_CPU_LATENT_GEMM=split, but"):
            _run(*case)


# (bits, weights, RoPE, H, H_kv, r, d, q dtype, seq_lens). B G query rows per
# kv head <= 8 (kWeightStreamRows) take the weight-streaming products at the
# avx512 ISA level (q_lat = W_uk q' without RoPE, acc W_uv always) and
# torch's fp32 GEMM below it; B G > 8 take torch's GEMM at every level. d not
# a multiple of 16 gives the streaming kernels masked tails.
ISA_CASES = [
    (8, torch.float16, False, 4, 4, 130, 64, torch.float32, [37, 0, 300]),  # B G = 3
    (4, torch.bfloat16, False, 8, 2, 96, 40, torch.float16, [5, 70]),  # B G = 8
    (8, torch.int8, False, 6, 1, 64, 64, torch.float32, [33, 1, 9]),  # B G = 18
    (4, torch.int8, True, 4, 2, 48, 36, torch.float32, [300]),  # B G = 2, RoPE
    (8, torch.bfloat16, True, 8, 1, 64, 128, torch.bfloat16, [64, 1]),  # B G = 16, RoPE
]


# The split GEMMs serve the absorbed path only: full-RoPE cases run on fp32.
ISA_GEMM_CASES = [(gemm, *c) for c in ISA_CASES for gemm in ("fp32", "split") if gemm == "fp32" or not c[2]]


@pytest.mark.parametrize("gemm,bits,wdtype,rope,H,H_kv,r,d,q_dtype,seq_lens", ISA_GEMM_CASES,
                         ids=[f"{c[0]}-b{c[1]}-{str(c[2])[6:]}-{'rope' if c[3] else 'norope'}-"
                              f"BG{len(c[9]) * c[4] // c[5]}" for c in ISA_GEMM_CASES])
def test_cpu_every_isa_level(monkeypatch, gemm, bits, wdtype, rope, H, H_kv, r, d, q_dtype, seq_lens):
    """latent_attention and latent_reconstruct_kv at every ISA level this CPU
    supports: attention within the derived bound at each; the same bits at
    levels that take the same paths (streaming or not: avx2 and baseline
    always, avx512 too where B G > 8); reconstruct_kv (no weight streaming)
    the same bits at every level."""
    if gemm == "split" and not _split_available():
        pytest.skip(SPLIT_MISSING)
    levels = isa_levels_to_test()
    if len(levels) < 2:
        pytest.skip(f"only one ISA level to test here ({levels})")
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", gemm)
    eligible = len(seq_lens) * (H // H_kv) <= 8
    results = {}
    for level in levels:
        with qk.cpu_isa(level):
            streaming = qk._C.cpu_paths()["weight_streaming"]
            assert streaming == (level == "avx512")
            out, lse, truth, bound, (q, args) = _run("cpu", seq_lens, bits, wdtype, rope, H, H_kv, 16, q_dtype, r, d,
                                                     seed=31)
            _check(out, lse, truth, bound, q_dtype, level)
            kv = qk.latent_reconstruct_kv(*args[:9], *args[10:], out_dtype=torch.float32)
            results[level] = (streaming and eligible, out, lse, kv)
    for level, (streams, out, lse, kv) in results.items():
        ref = results[levels[-1]]  # the lowest level: never streams
        assert torch.equal(kv[0], ref[3][0]) and torch.equal(kv[1], ref[3][1]), level
        if not streams:
            assert torch.equal(out, ref[1]) and torch.equal(lse, ref[2]), level


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_rows_and_large_magnitudes(device, bits):
    require_kernel("latent_attention", device)
    for kw in ({"zero_rows": True}, {"scale_mag": 1e3}, {"scale_mag": 1e-6}):
        out, lse, truth, bound, _ = _run(device, [50, 17], bits, torch.float16, True, 4, 2, 16, torch.float32, 64, 64,
                                         **kw)
        _check(out, lse, truth, bound, torch.float32, str(kw))


def test_long_context(device):
    require_kernel("latent_attention", device)
    L = 8192 if device == "cpu" else 32768
    out, lse, truth, bound, _ = _run(device, [L, 3], 8, torch.bfloat16, True, 4, 2, 256, torch.bfloat16, 64, 64)
    _check(out, lse, truth, bound, torch.bfloat16)


def test_identity_rope_equals_absorbed_k(device):
    """cos = 1, sin = 0 makes the RoPE path (K rebuilt per token) compute the
    same function as the no-RoPE path (K absorbed into the query)."""
    require_kernel("latent_attention", device)
    g = torch.Generator().manual_seed(4)
    d, r = 64, 96
    pc = make_paged_cache([40, 9], r, 8, 16, generator=g)
    w = make_weights(2, r, d, torch.float16, generator=g)
    q = torch.randn(2, 4, d, generator=g)
    host = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8, 0.125]
    common = [a.to(device) if isinstance(a, torch.Tensor) else a for a in host]
    ones, zeros = torch.ones(64, d), torch.zeros(64, d)
    a = qk.latent_attention(q.to(device), *common, ones.to(device), zeros.to(device))
    b = qk.latent_attention(q.to(device), *common)
    # Each path within its own evaluation bound of the one exact result (the
    # two fp32 CUDA paths differ in order, so no fixed rtol is derived).
    truth = R.latent_attention_ref(q.double(), *host)
    bounds = []
    for (out, lse), rope in ((a, (ones, zeros)), (b, ())):
        bound = latent_attention_error_bound(q, *host, *rope, **LATENT_BOUND[device])
        _check(out.cpu(), lse.cpu(), truth, bound, torch.float32, f"rope={bool(rope)}")
        bounds.append(bound)
    # The two paths against each other: each is within its bound (plus its
    # output rounding) of the same exact value, so they differ by at most
    # the sum (the triangle inequality; no further tolerance).
    for i, what in ((0, "out"), (1, "lse")):
        slack = bounds[0][i] + bounds[1][i] + 2 * (EPS[torch.float32] * truth[i].abs() + TINY[torch.float32])
        assert bool(((a[i].cpu().double() - b[i].cpu().double()).abs() <= slack).all()), what


PARTIAL = [(8, torch.float16, 32, [37, 0, 300]), (4, torch.int8, 16, [64, 5]), (8, torch.bfloat16, 2, [129]),
           (4, torch.float16, 48, [1, 200]), (8, torch.int8, 64, [70])]  # d = 64: d_rope 64 is full RoPE


@pytest.mark.parametrize("bits,wdtype,d_rope,seq_lens", PARTIAL)
def test_partial_rope_matches_reference(device, bits, wdtype, d_rope, seq_lens):
    """RoPE tables of width d_rope < d: the first d_rope dims of each head
    rotary, the rest absorbed (docs/ops.md), against the exact reference
    within the backend's bound. CUDA's latent_attention serves partial RoPE
    only with the rotary keys cached (refusing this form, naming rope_keys);
    its latent_reconstruct_kv serves it."""
    require_kernel("latent_attention", device)
    g = torch.Generator().manual_seed(11)
    H, H_kv, r, d = 8, 2, 96, 64
    pc = make_paged_cache(seq_lens, r, bits, 16, generator=g)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    q = torch.randn(len(seq_lens), H, d, generator=g)
    cos, sin = R.rope_tables(max(seq_lens) + 3, d, pairs=range(d_rope // 2))
    host = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, bits, 0.125, cos, sin]
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in host]
    if device == "cuda" and d_rope < d:
        with pytest.raises(ValueError, match="partial RoPE .* rebuilt is not implemented in the CUDA kernels; pass "
                                             "the cached rotary keys `rope_keys`"):
            qk.latent_attention(q.to(device), *dev)
    else:
        out, lse = qk.latent_attention(q.to(device), *dev)
        truth = R.latent_attention_ref(q.double(), *host)
        _check(out.cpu(), lse.cpu(), truth, latent_attention_error_bound(q, *host, **LATENT_BOUND[device]),
               torch.float32, f"d_rope={d_rope}")
    # K and V of the same cache: the prefill op agrees with the reference too.
    kv_args = host[:9] + host[10:]
    k, v = qk.latent_reconstruct_kv(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in kv_args],
                                    out_dtype=torch.float32)
    k_ref, v_ref = R.latent_reconstruct_kv_ref(*kv_args, out_dtype=torch.float32, compute_dtype=torch.float64)
    kb, vb = latent_reconstruct_error_bound(*kv_args, **RECONSTRUCT_BOUND[device])
    assert bool(((k.cpu().double() - k_ref.double()).abs() <= kb + EPS[torch.float32] * k_ref.abs()).all())
    assert bool(((v.cpu().double() - v_ref.double()).abs() <= vb + EPS[torch.float32] * v_ref.abs()).all())


def test_partial_rope_is_full_rope_with_the_other_pairs_unrotated():
    """The meaning of the partial tables: with q and W_uk's head dims in the
    partial layout (reference.partial_rope_permutation), partial RoPE over
    pairs P computes what full RoPE computes when every pair outside P has
    cos 1, sin 0 (the frequency set to zero). Each op within its bound of
    the one exact value, so they differ by at most the sum; and both differ
    from full RoPE, so the test sees the rotation (CPU: CUDA refuses)."""
    require_kernel("latent_attention", "cpu")
    g = torch.Generator().manual_seed(12)
    H, H_kv, r, d, L = 4, 2, 64, 64, 200
    pairs = [0, 3, 7, 20]  # any pairs, in any order
    pc = make_paged_cache([L], r, 8, 16, generator=g)
    w_uk, ws_k, w_uv, ws_v = make_weights(H_kv, r, d, torch.float16, generator=g)
    q = torch.randn(1, H, d, generator=g)
    cos, sin = R.rope_tables(L, d)
    keep = torch.zeros(d, dtype=torch.bool)
    keep[pairs] = True
    keep[[j + d // 2 for j in pairs]] = True
    cos_unrot, sin_unrot = torch.where(keep, cos, 1.0), torch.where(keep, sin, 0.0)
    perm = R.partial_rope_permutation(d, pairs)
    cos_p, sin_p = R.rope_tables(L, d, pairs=pairs)
    cache = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens]
    full_args = [q, *cache, w_uk, ws_k, w_uv, ws_v, 8, 0.125, cos_unrot, sin_unrot]
    part_args = [q[..., perm].contiguous(), *cache, w_uk[..., perm].contiguous(), ws_k, w_uv, ws_v, 8, 0.125, cos_p,
                 sin_p]
    a, b = qk.latent_attention(*full_args), qk.latent_attention(*part_args)
    truth = R.latent_attention_ref(q.double(), *full_args[1:])
    slack = (latent_attention_error_bound(q, *full_args[1:], **LATENT_BOUND["cpu"])[0]
             + latent_attention_error_bound(part_args[0], *part_args[1:], **LATENT_BOUND["cpu"])[0]
             + 2 * (EPS[torch.float32] * truth[0].abs() + TINY[torch.float32]))
    assert bool(((a[0].double() - b[0].double()).abs() <= slack).all())
    full = qk.latent_attention(q, *cache, w_uk, ws_k, w_uv, ws_v, 8, 0.125, cos, sin)[0]
    assert not bool(((full.double() - b[0].double()).abs() <= slack).all()), "the unrotated pairs changed nothing"


def _all_slots(pc, seq_lens):
    """(slots, positions) of every cached token, in batch order."""
    block = pc.cache.shape[1]
    slots, pos = [], []
    for b, L in enumerate(seq_lens):
        for t in range(L):
            slots.append(int(pc.block_table[b, t // block]) * block + t % block)
            pos.append(t)
    return torch.tensor(slots), torch.tensor(pos)


@pytest.mark.parametrize("bits,wdtype,d_rope,packed", [(8, torch.float16, 32, False), (4, torch.int8, 16, True),
                                                       (8, torch.bfloat16, 64, False), (8, torch.int8, 6, False)])
def test_cached_rope_keys_match_the_reference(device, bits, wdtype, d_rope, packed):
    """latent_rope_keys_append writes RoPE_pos(c W_uk[:, :, :d_rope]) in fp16
    at the given slots only (padding skipped, other slots untouched), within
    the fp32 rebuild's r + 4 roundings on the magnitudes plus the fp16
    rounding; latent_attention and latent_reconstruct_kv given rope_keys
    read them (against the reference on the same stored keys, within the
    backend's bound: on CUDA, the absorbed split kernel plus the keys).
    d_rope 6: not a multiple of 4 or 8 (the kernels' vector widths)."""
    require_kernel("latent_rope_keys_append", device)
    g = torch.Generator().manual_seed(21)
    seq_lens, H, H_kv, r, d = [37, 0, 300], 8, 2, 96, 64
    pc = make_paged_cache(seq_lens, r, bits, 16, generator=g)
    w_uk, ws_k, w_uv, ws_v = make_weights(H_kv, r, d, wdtype, generator=g)
    cos, sin = R.rope_tables(320, d, pairs=range(d_rope // 2))
    cache, scale = (_packed(pc), None) if packed else (pc.cache, pc.cache_scale)
    keys = torch.full((pc.cache.shape[0], pc.cache.shape[1], H_kv, d_rope), float("nan"), dtype=torch.float16)
    slots, pos = _all_slots(pc, seq_lens)
    slots_pad = torch.cat([slots, torch.tensor([-1])])
    pos_pad = torch.cat([pos, torch.tensor([5])])

    def on(*a):
        return [x.to(device) if isinstance(x, torch.Tensor) else x for x in a]

    keys_dev = keys.to(device)
    qk.latent_rope_keys_append(*on(cache, scale, slots_pad, pos_pad, w_uk, ws_k), bits, *on(cos, sin), keys_dev)
    keys = keys_dev.cpu()
    exact = R.latent_rope_keys_ref(cache, scale, slots, pos, w_uk, ws_k, bits, cos, sin)
    got = keys.view(-1, H_kv, d_rope)[slots].double()
    bound = rope_keys_bound(cache, scale, slots, w_uk, ws_k, bits, exact)
    assert bool(((got - exact).abs() <= bound).all()), float(((got - exact).abs() - bound).max())
    written = torch.zeros(keys.shape[0] * keys.shape[1], dtype=torch.bool)
    written[slots] = True
    assert bool(keys.view(-1, H_kv, d_rope)[~written].isnan().all()), "a slot outside slot_mapping was written"

    q = torch.randn(3, H, d, generator=g)
    keys = torch.nan_to_num(keys)
    host = [cache, scale, pc.block_table, pc.seq_lens, w_uk, ws_k, w_uv, ws_v, bits, 0.125, cos, sin]
    out, lse = qk.latent_attention(q.to(device), *on(*host), rope_keys=keys.to(device))
    truth = R.latent_attention_ref(q.double(), *host, rope_keys=keys)
    _check(out.cpu(), lse.cpu(), truth,
           latent_attention_error_bound(q, *host, **LATENT_BOUND[device], rope_keys=keys),
           torch.float32, f"rope_keys d_rope={d_rope}")
    # The same call with its plan (made with the keys: on CUDA another kernel).
    plan = qk.latent_attention_plan(q.to(device), *on(*host[:9]), *on(cos, sin), keys.to(device))
    again = qk.latent_attention(q.to(device), *on(*host), plan=plan, rope_keys=keys.to(device))
    assert torch.equal(again[0].cpu(), out.cpu()) and torch.equal(again[1].cpu(), lse.cpu())
    kv_args = host[:9] + host[10:]
    k, v = qk.latent_reconstruct_kv(*on(*kv_args), out_dtype=torch.float32, rope_keys=keys.to(device))
    k_ref, _ = R.latent_reconstruct_kv_ref(*kv_args, out_dtype=torch.float32, compute_dtype=torch.float64,
                                           rope_keys=keys)
    kb, _ = latent_reconstruct_error_bound(*kv_args, **RECONSTRUCT_BOUND[device])
    assert bool(((k.cpu().double() - k_ref.double()).abs() <= kb + EPS[torch.float32] * k_ref.abs()).all())


@pytest.mark.parametrize("gemm", ["fp32", "split"])
@pytest.mark.parametrize("bits,wdtype,d_rope,H,H_kv,r", [(8, torch.int8, 16, 8, 2, 96), (4, torch.float16, 6, 6, 3, 130),
                                                        (8, torch.bfloat16, 64, 4, 4, 64)])
def test_cpu_cached_rope_keys_on_each_gemm_path(monkeypatch, gemm, bits, wdtype, d_rope, H, H_kv, r):
    """Partial RoPE with K's rotary part cached takes the absorbed paths'
    GEMMs for its position-free dims: split (int8 digit scores, bf16 V) where
    it serves, else the RoPE path's fp32 GEMMs (which read the keys too);
    each forced, within the derived bound, over several tiles and splits.
    Full RoPE (d_rope = d) with cached keys has no absorbed dims: the RoPE
    path whatever the knob."""
    if gemm == "split" and not _split_available():
        pytest.skip(SPLIT_MISSING)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", gemm)
    g = torch.Generator().manual_seed(23)
    seq_lens, d = [37, 0, 700, 1], 64
    pc = make_paged_cache(seq_lens, r, bits, 16, generator=g)
    w_uk, ws_k, w_uv, ws_v = make_weights(H_kv, r, d, wdtype, generator=g)
    cos, sin = R.rope_tables(710, d, pairs=range(d_rope // 2))
    keys = torch.zeros(pc.cache.shape[0], pc.cache.shape[1], H_kv, d_rope, dtype=torch.float16)
    slots, pos = _all_slots(pc, seq_lens)
    qk.latent_rope_keys_append(pc.cache, pc.cache_scale, slots, pos, w_uk, ws_k, bits, cos, sin, keys)
    q = torch.randn(len(seq_lens), H, d, generator=g)
    host = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, w_uk, ws_k, w_uv, ws_v, bits, 0.125, cos, sin]
    plan = qk.latent_attention_plan(q, *host[:9], cos, sin, keys)
    path = qk.describe_latent_attention_plan(plan)["cpu_path"]
    assert path == ("absorbed_split" if gemm == "split" and d_rope < d else "rope"), path
    out, lse = qk.latent_attention(q, *host, plan=plan, rope_keys=keys)
    truth = R.latent_attention_ref(q.double(), *host, rope_keys=keys)
    _check(out, lse, truth, latent_attention_error_bound(q, *host, **LATENT_BOUND["cpu"], rope_keys=keys),
           torch.float32, f"{gemm} d_rope={d_rope}")


def test_cached_rope_keys_give_the_same_bits_at_every_isa_level():
    """The fp16 rotary keys are converted exactly at every ISA level (F16C
    at avx2 and above, c10 at baseline), and partial RoPE's rebuild takes
    no level-dependent path: the same bits everywhere (B G > 8: no weight
    streaming)."""
    levels = isa_levels_to_test()
    if len(levels) < 2:
        pytest.skip(f"only one ISA level to test here ({levels})")
    g = torch.Generator().manual_seed(23)
    seq_lens, H, H_kv, r, d = [40, 77, 5], 8, 2, 64, 64
    pc = make_paged_cache(seq_lens, r, 8, 16, generator=g)
    w = make_weights(H_kv, r, d, torch.float16, generator=g)
    cos, sin = R.rope_tables(100, d, pairs=range(8))
    slots, pos = _all_slots(pc, seq_lens)
    q = torch.randn(3, H, d, generator=g)
    host = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8, 0.125, cos, sin]
    results = {}
    for level in levels:
        with qk.cpu_isa(level):
            keys = torch.zeros(pc.cache.shape[0], 16, H_kv, 16, dtype=torch.float16)
            qk.latent_rope_keys_append(pc.cache, pc.cache_scale, slots, pos, w[0], w[1], 8, cos, sin, keys)
            results[level] = (keys, *qk.latent_attention(q, *host, rope_keys=keys), *qk.latent_attention(q, *host))
    ref = results[levels[-1]]
    for level, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), level


def test_bad_rope_keys_are_refused():
    require_kernel("latent_rope_keys_append", "cpu")
    g = torch.Generator().manual_seed(22)
    pc = make_paged_cache([20], 32, 8, 16, generator=g, poison=False)
    w_uk, ws_k, w_uv, ws_v = make_weights(2, 32, 64, torch.int8, generator=g)
    cos, sin = R.rope_tables(32, 64, pairs=range(8))
    keys = torch.zeros(pc.cache.shape[0], 16, 2, 16, dtype=torch.float16)
    slots, pos = torch.tensor([0, 1]), torch.tensor([0, 1])
    base = (pc.cache, pc.cache_scale, slots, pos, w_uk, ws_k, 8, cos, sin)
    for bad, match in ((keys.float(), "`rope_keys` must have dtype"), (keys[..., :8], "must have shape"),
                       (keys.transpose(0, 1), "must have shape")):
        with pytest.raises((ValueError, RuntimeError), match=match):
            qk.latent_rope_keys_append(*base, bad)
    with pytest.raises(ValueError, match=r"`positions`\[1\] = 40 is outside the RoPE table"):
        qk.latent_rope_keys_append(*base[:3], torch.tensor([0, 40]), *base[4:], keys)
    with pytest.raises(ValueError, match=r"`slot_mapping`\[0\] = 9999 is past the end"):
        qk.latent_rope_keys_append(pc.cache, pc.cache_scale, torch.tensor([9999, 1]), *base[3:], keys)
    # a key past fp16's range is refused (it would make the scores infinite)
    big = pc.cache_scale.clone()
    big[0, 1] = 1e9
    with pytest.raises(ValueError, match=r"the rotary key of row 1 exceeds fp16's range .*rope_key_cache='rebuilt'"):
        qk.latent_rope_keys_append(pc.cache, big, *base[2:], keys)
    q = torch.randn(1, 4, 64, generator=g)
    with pytest.raises(ValueError, match="`rope_keys` needs the RoPE tables"):
        qk.latent_attention(q, pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, w_uk, ws_k, w_uv, ws_v, 8,
                            0.125, rope_keys=keys)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_reconstruct_matches_reference(device, rope, wdtype, out_dtype):
    require_kernel("latent_reconstruct_kv", device)
    _reconstruct_case(device, [23, 0, 70], 130, 4, 16, 2, 64, wdtype, rope, out_dtype, seed=5)


def test_reconstruct_all_empty(device):
    require_kernel("latent_reconstruct_kv", device)
    g = torch.Generator().manual_seed(6)
    pc = make_paged_cache([0, 0], 32, 8, 16, generator=g)
    w = make_weights(1, 32, 64, torch.float16, generator=g)
    k, v = qk.latent_reconstruct_kv(*[a.to(device) for a in (pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens)],
                                    *[x.to(device) if x is not None else None for x in w], 8)
    assert k.shape == (0, 1, 64) and v.shape == (0, 1, 64)


@pytest.mark.parametrize("rope", [False, True])
def test_reconstruct_then_sdpa_equals_latent_attention(device, rope):
    """The prefill bridge: K/V from latent_reconstruct_kv fed to plain SDPA
    give the decode kernel's output (same numerics on both paths)."""
    require_kernel("latent_attention", device)
    require_kernel("latent_reconstruct_kv", device)
    g = torch.Generator().manual_seed(7)
    d, r, H, H_kv = 64, 96, 8, 2
    seq_lens = [33, 5, 80]
    pc = make_paged_cache(seq_lens, r, 8, 16, generator=g)
    w = make_weights(H_kv, r, d, torch.float16, generator=g)
    cos, sin = R.rope_tables(100, d) if rope else (None, None)
    q = torch.randn(3, H, d, generator=g)
    common = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8]
    common = [a.to(device) if isinstance(a, torch.Tensor) else a for a in common]
    rope_args = [t.to(device) if t is not None else None for t in (cos, sin)]
    out, lse = qk.latent_attention(q.to(device), *common, d**-0.5, *rope_args)
    k, v = qk.latent_reconstruct_kv(*common, *rope_args, out_dtype=torch.float32)
    # Each path is within the kernel's bound of the exact result: the decode
    # kernel by its derivation, the fp32 rebuild + SDPA because it takes the
    # same counts of roundings in another order (an r-term rebuild, a d-term
    # dot, an L-term sum, an r-term up-projection: the fp32 path's count).
    host = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8, d**-0.5, cos, sin]
    bound, _ = latent_attention_error_bound(q, *host, **LATENT_BOUND[device])
    start = 0
    for b, L in enumerate(seq_lens):
        kb = k[start : start + L].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)  # [H, L, d]
        vb = v[start : start + L].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)
        ref = F.scaled_dot_product_attention(q[b].to(device)[:, None, :], kb, vb, scale=d**-0.5)[:, 0]
        diff = (out[b].double().cpu() - ref.double().cpu()).abs()
        assert (diff <= 2 * bound[b]).all(), (b, (diff / (2 * bound[b])).max())
        start += L


def _reconstruct_case(device, seq_lens, r, bits, block_size, H_kv, d, wdtype, rope, out_dtype, seed, **cache_kw):
    """latent_reconstruct_kv on `device` against the float64 reference, held to
    the backend's evaluation bound (helpers.latent_reconstruct_error_bound)
    plus the output rounding. Unused cache slots are NaN-poisoned."""
    g = torch.Generator().manual_seed(seed)
    pc = make_paged_cache(seq_lens, r, bits, block_size, generator=g, **cache_kw)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    cos, sin = R.rope_tables(max(seq_lens + [1]), d) if rope else (None, None)
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, bits, cos, sin]
    k, v = qk.latent_reconstruct_kv(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args],
                                    out_dtype=out_dtype)
    want_dtype = out_dtype or (torch.float16 if wdtype == torch.int8 else wdtype)
    assert k.dtype == want_dtype and v.dtype == want_dtype
    assert k.shape == (sum(seq_lens), H_kv, d) and v.shape == k.shape
    tk, tv = R.latent_reconstruct_kv_ref(*args, out_dtype=torch.float64)
    bk, bv = latent_reconstruct_error_bound(*args, **RECONSTRUCT_BOUND[device])
    assert_within(k.cpu(), tk, bk, want_dtype, "k")
    assert_within(v.cpu(), tv, bv, want_dtype, "v")


def test_reconstruct_long_context(device):
    """One long sequence (32K tokens on CUDA) over many 256-token blocks."""
    require_kernel("latent_reconstruct_kv", device)
    L = 32768 if device == "cuda" else 4096
    _reconstruct_case(device, [L], 512, 8, 256, 2, 64, torch.bfloat16, True, None, seed=8)


# (bits, weights, RoPE, out_dtype, r, d): r % 8 != 0 and d % 8 != 0 take the
# kernels' scalar paths; odd r and odd d (no RoPE) are legal for INT8.
RAGGED = [
    (8, torch.float16, True, None, 512, 128),
    (4, torch.int8, True, torch.bfloat16, 96, 64),
    (8, torch.int8, False, torch.float32, 130, 40),
    (4, torch.bfloat16, True, torch.float16, 64, 36),
    (8, torch.bfloat16, False, None, 33, 17),
]


@pytest.mark.parametrize("bits,wdtype,rope,out_dtype,r,d", RAGGED,
                         ids=[f"b{c[0]}-{str(c[1])[6:]}-{'rope' if c[2] else 'norope'}-r{c[4]}-d{c[5]}" for c in RAGGED])
@pytest.mark.parametrize("zero_rows", [False, True])
def test_reconstruct_ragged_batch(device, bits, wdtype, rope, out_dtype, r, d, zero_rows):
    """Ragged lengths, including 0 and block-boundary lengths, in batch order."""
    require_kernel("latent_reconstruct_kv", device)
    _reconstruct_case(device, [0, 1, 63, 64, 65, 0, 300], r, bits, 64, 3, d, wdtype, rope, out_dtype, seed=9,
                      zero_rows=zero_rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reconstruct_cuda_row_chunks():
    """H_kv d = 4096: the CUDA launcher's 256 MiB workspace holds ~8K rows, so
    9000 rows run in two chunks; the rows on both sides of the seam must be right."""
    require_kernel("latent_reconstruct_kv", "cuda")
    _reconstruct_case("cuda", [5000, 0, 4000], 64, 4, 128, 32, 128, torch.int8, True, None, seed=10)


def test_reconstruct_empty_batch(device):
    """B = 0: no sequences, empty outputs of the right shape and dtype."""
    require_kernel("latent_reconstruct_kv", device)
    g = torch.Generator().manual_seed(11)
    w = make_weights(2, 32, 64, torch.bfloat16, generator=g)
    cache = torch.zeros(2, 16, 32, dtype=torch.int8)
    scale = torch.zeros(2, 16)
    table = torch.zeros(0, 1, dtype=torch.int32)
    lens = torch.zeros(0, dtype=torch.int32)
    k, v = qk.latent_reconstruct_kv(*[t.to(device) for t in (cache, scale, table, lens)],
                                    *[x.to(device) if x is not None else None for x in w], 8)
    assert k.shape == (0, 2, 64) and v.shape == (0, 2, 64)
    assert k.dtype == torch.bfloat16 and k.device.type == device


# ---------------------------------------------------------------------------
# Packed rows (cache_scale None): the same data in one uint8 tensor gives the
# separate layout's result bit for bit on the CPU (same arithmetic, only the
# addressing differs), and stays within the derived bounds on every device.
# ---------------------------------------------------------------------------

def _packed_rank(r, bits):
    """r, or the next multiple of 8, so that the code bytes of a row are a
    multiple of 4 (what packed rows require)."""
    return r if code_row_bytes(bits, r) % 4 == 0 else -(-r // 8) * 8


def _packed(pc):
    """pc's cache as packed rows (NaN-poisoned unused scales included)."""
    packed = pack_latent_rows(pc.cache, pc.cache_scale)
    assert packed.shape[-1] == pc.cache.shape[-1] + 4 and packed.is_contiguous()
    return packed


@pytest.mark.parametrize("bits,wdtype,rope,H,H_kv,block_size,q_dtype,r,d", CASES)
def test_attention_packed_equals_separate(device, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d):
    require_kernel("latent_attention", device)
    r = _packed_rank(r, bits)
    g = torch.Generator().manual_seed(21)
    pc = make_paged_cache(SEQ_LENS, r, bits, block_size, generator=g)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    q = torch.randn(len(SEQ_LENS), H, d, generator=g).to(q_dtype)
    cos, sin = R.rope_tables(max(SEQ_LENS) + 5, d) if rope else (None, None)
    sm_scale = 1.0 / math.sqrt(d)
    rest = [pc.block_table, pc.seq_lens, *w, bits, sm_scale, cos, sin]
    sep = [pc.cache, pc.cache_scale, *rest]
    packed = [_packed(pc), None, *rest]
    to_dev = lambda args: [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]  # noqa: E731
    out_s, lse_s = qk.latent_attention(q.to(device), *to_dev(sep))
    out_p, lse_p = qk.latent_attention(q.to(device), *to_dev(packed))
    truth = R.latent_attention_ref(q.double(), *packed)
    assert torch.equal(truth[0], R.latent_attention_ref(q.double(), *sep)[0])  # the reference reads both layouts alike
    bound = latent_attention_error_bound(q, *packed, **LATENT_BOUND[device])
    _check(out_p.cpu(), lse_p.cpu(), truth, bound, q_dtype, "packed")
    if device == "cpu":
        assert torch.equal(out_p, out_s) and torch.equal(lse_p, lse_s)
    assert bool((out_p[1] == 0).all()) and bool(torch.isneginf(lse_p[1]).all().cpu())


@pytest.mark.parametrize("bits,wdtype,rope,out_dtype,r,d", RAGGED,
                         ids=[f"b{c[0]}-{str(c[1])[6:]}-{'rope' if c[2] else 'norope'}-r{c[4]}-d{c[5]}" for c in RAGGED])
def test_reconstruct_packed_equals_separate(device, bits, wdtype, rope, out_dtype, r, d):
    require_kernel("latent_reconstruct_kv", device)
    r = _packed_rank(r, bits)
    g = torch.Generator().manual_seed(22)
    seq_lens = [0, 1, 63, 64, 65, 0, 300]
    pc = make_paged_cache(seq_lens, r, bits, 64, generator=g, zero_rows=True)
    w = make_weights(3, r, d, wdtype, generator=g)
    cos, sin = R.rope_tables(max(seq_lens), d) if rope else (None, None)
    rest = [pc.block_table, pc.seq_lens, *w, bits, cos, sin]
    sep = [pc.cache, pc.cache_scale, *rest]
    packed = [_packed(pc), None, *rest]
    to_dev = lambda args: [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]  # noqa: E731
    k_s, v_s = qk.latent_reconstruct_kv(*to_dev(sep), out_dtype=out_dtype)
    k_p, v_p = qk.latent_reconstruct_kv(*to_dev(packed), out_dtype=out_dtype)
    want_dtype = out_dtype or (torch.float16 if wdtype == torch.int8 else wdtype)
    assert k_p.dtype == want_dtype and k_p.shape == (sum(seq_lens), 3, d) and v_p.shape == k_p.shape
    tk, tv = R.latent_reconstruct_kv_ref(*packed, out_dtype=torch.float64)
    bk, bv = latent_reconstruct_error_bound(*packed, **RECONSTRUCT_BOUND[device])
    assert_within(k_p.cpu(), tk, bk, want_dtype, "k")
    assert_within(v_p.cpu(), tv, bv, want_dtype, "v")
    if device == "cpu":
        assert torch.equal(k_p, k_s) and torch.equal(v_p, v_s)


def test_packed_cache_written_by_append_is_read_by_attention(device):
    """The two ops agree on the layout: append into a packed cache, then
    attention over it equals attention over the separate cache appended the
    same way (bit for bit on the CPU), within the bound of the reference."""
    require_kernel("latent_cache_append", device)
    require_kernel("latent_attention", device)
    g = torch.Generator().manual_seed(23)
    bits, r, d, H, H_kv, bs = 4, 64, 64, 4, 2, 16
    seq_lens = [30, 7]
    table = torch.tensor([[3, 0], [2, 1]], dtype=torch.int32)
    slots = torch.cat([(table[b].long()[torch.arange(L) // bs] * bs + torch.arange(L) % bs)
                       for b, L in enumerate(seq_lens)])
    c = torch.randn(len(slots), r, generator=g).to(device)
    packed = torch.zeros(4, bs, packed_row_bytes(bits, r), dtype=torch.uint8, device=device)
    sep = (torch.zeros(4, bs, r // 2, dtype=torch.uint8, device=device), torch.zeros(4, bs, device=device))
    qk.latent_cache_append(c, slots.to(device), packed, None, bits)
    qk.latent_cache_append(c, slots.to(device), *sep, bits)
    w = make_weights(H_kv, r, d, torch.bfloat16, generator=g)
    cos, sin = R.rope_tables(32, d)
    q = torch.randn(2, H, d, generator=g)
    rest = [table, torch.tensor(seq_lens, dtype=torch.int32), *w, bits, 0.125, cos, sin]
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in rest]
    out_p, lse_p = qk.latent_attention(q.to(device), packed, None, *dev)
    out_s, lse_s = qk.latent_attention(q.to(device), *sep, *dev)
    host = [packed.cpu(), None, *rest]
    truth = R.latent_attention_ref(q.double(), *host)
    _check(out_p.cpu(), lse_p.cpu(), truth, latent_attention_error_bound(q, *host, **LATENT_BOUND[device]),
           torch.float32)
    if device == "cpu":
        assert torch.equal(out_p, out_s) and torch.equal(lse_p, lse_s)


@pytest.mark.parametrize("rope", [False, True])
def test_ops_run_under_inference_mode_on_several_threads(device, rope):
    """Serving engines (vLLM) run models under torch.inference_mode. The CPU
    kernels' tasks run on torch's OpenMP threads, which do not inherit that
    mode: each task must re-enter it, or a tensor op on an output made under
    inference mode raises. Same results in and out of inference mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(3)
        seq_lens = [300, 70, 1, 129]
        pc = make_paged_cache(seq_lens, 64, 8, 16, generator=g)
        w = make_weights(4, 64, 32, torch.int8, generator=g)
        q = torch.randn(len(seq_lens), 8, 32, generator=g)
        cos, sin = R.rope_tables(310, 32) if rope else (None, None)
        args = [a.to(device) if isinstance(a, torch.Tensor) else a
                for a in (pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8)]
        rope_args = [t.to(device) if t is not None else None for t in (cos, sin)]
        want = qk.latent_attention(q.to(device), *args, 0.2, *rope_args)
        want_kv = qk.latent_reconstruct_kv(*args, *rope_args, out_dtype=torch.float32)
        with torch.inference_mode():
            got = qk.latent_attention(q.to(device), *args, 0.2, *rope_args)
            got_kv = qk.latent_reconstruct_kv(*args, *rope_args, out_dtype=torch.float32)
        for a, b in zip((*got, *got_kv), (*want, *want_kv)):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
