"""CUDA latent_attention (split-KV decode) against the float64 reference, at
shapes the device-parametrised tests in test_latent_attention.py do not
reach: long contexts with many splits, a ragged batch of 33 sequences,
grouped heads tiled across CTAs, ranks up to 4096, forced split counts, and
the device-side index guards with the host checks off.

Every test runs once per split kernel, forced with QSVD_LATENT_KERNEL (read
at every call): "simt" (CUDA cores) and "tc" (tensor cores,
latent_attention_tc.cuh). Each is held to its own bound,
latent_attention_error_bound(kernel="cuda" / "cuda_tc"): the worst-case
evaluation error of that kernel's order of operations (derived in
helpers.py), plus the output rounding. Unused cache slots hold NaN scales,
so a read outside a sequence's tokens fails the test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R

from conftest import require_kernel
from helpers import LATENT_KERNEL_BOUND, assert_within, latent_attention_error_bound, make_paged_cache, make_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F16, BF16, F32, I8 = torch.float16, torch.bfloat16, torch.float32, torch.int8

# 33 ragged lengths: 0, 1, block-boundary neighbours and a spread up to ~600.
RAGGED = [0, 1, 2, 15, 16, 17, 255, 256, 257] + [(97 * i) % 600 for i in range(1, 25)]
SHORT = [0, 1, 70, 129, 3]


def _run(seq_lens, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d, seed=0, sm_scale=None):
    g = torch.Generator().manual_seed(seed)
    pc = make_paged_cache(seq_lens, r, bits, block_size, generator=g)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    q = torch.randn(len(seq_lens), H, d, generator=g).to(q_dtype)
    cos, sin = R.rope_tables(max(max(seq_lens), 1) + 3, d) if rope else (None, None)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, bits, sm_scale, cos, sin]
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    out, lse = qk.latent_attention(q.cuda(), *dev)
    return out.cpu(), lse.cpu(), q, args


KERNELS = ["simt", "tc"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Forces the split kernel for the test (QSVD_LATENT_KERNEL is read per call)."""
    monkeypatch.setenv("QSVD_LATENT_KERNEL", request.param)
    return request.param


def _tc_serves(rope, d):
    """Whether the tensor-core kernel serves the shape apart from shared
    memory (which depends on the device): RoPE needs d % 16 == 0."""
    return not rope or d % 16 == 0


def _run_or_skip(kernel, rope, d, *run_args, **run_kw):
    """_run, except where the forced tensor-core kernel cannot serve the
    shape: a shape rule must raise its documented error (asserted); a shape
    that does not fit this device's shared memory skips, saying so."""
    if kernel == "tc" and not _tc_serves(rope, d):
        with pytest.raises(RuntimeError, match=r"qsvd.latent_attention: QSVD_LATENT_KERNEL=tc, but the tensor-core "
                                               r"kernel needs d % 16 == 0"):
            _run(*run_args, **run_kw)
        return None
    try:
        return _run(*run_args, **run_kw)
    except RuntimeError as e:
        if kernel == "tc" and "the tensor-core kernel needs more shared memory" in str(e):
            pytest.skip(f"too large for this device's shared memory: {e}")
        raise


def _check(out, lse, q, args, what="", kernel="simt"):
    truth = R.latent_attention_ref(q.double(), *args)
    bound = latent_attention_error_bound(q, *args, **LATENT_KERNEL_BOUND[kernel])
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_within(out, truth[0], bound[0], q.dtype, f"out {what}")
    assert_within(lse, truth[1], bound[1], torch.float32, f"lse {what}")
    empty = args[3] == 0
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())


# (bits, weight dtype, rope, H, H_kv, block size, q dtype, r, d, seq_lens): every value of every axis once.
CASES = [
    pytest.param(8, F16, False, 32, 8, 16, F16, 512, 128, RAGGED, id="b8-f16-norope-H32kv8-bs16-r512"),
    pytest.param(4, BF16, True, 32, 8, 1, BF16, 130, 64, RAGGED, id="b4-bf16-rope-H32kv8-bs1-r130"),
    pytest.param(8, I8, True, 8, 8, 256, F32, 1000, 128, RAGGED, id="b8-i8-rope-H8kv8-bs256-r1000"),
    pytest.param(4, I8, False, 16, 1, 16, F16, 4096, 64, SHORT, id="b4-i8-norope-G16-r4096"),
    pytest.param(4, F16, True, 8, 2, 16, BF16, 4096, 128, SHORT, id="b4-f16-rope-G4-r4096"),
    pytest.param(8, F16, True, 16, 1, 16, F32, 1000, 64, SHORT, id="b8-f16-rope-G16-r1000-headtiles"),
    pytest.param(8, BF16, True, 4, 2, 16, F32, 130, 6, SHORT, id="b8-bf16-rope-d6"),
    pytest.param(4, BF16, False, 4, 2, 16, F32, 98, 250, SHORT, id="b4-bf16-norope-d250"),
]


# Shapes aimed at the tensor-core kernels' tiles: token tiles of 16..64 with
# tails (lengths not multiples of 64, block sizes that split tiles), r not a
# multiple of 16 (zero-padded MMA depth), d 64 / 128, groups of 1 / 4 / 8,
# head tiles of 16 with a partial last tile (H = 20, no RoPE), r > 512 (two
# latent slices without RoPE), every weight dtype, INT8 and INT4.
TAILS = [0, 1, 15, 16, 17, 63, 64, 65, 127, 129, 200, 1000]
CASES_TC = [
    pytest.param(8, F16, True, 8, 8, 16, F16, 130, 64, TAILS, id="tc-b8-f16-rope-G1-r130-d64"),
    pytest.param(4, BF16, True, 16, 4, 32, BF16, 130, 128, TAILS, id="tc-b4-bf16-rope-G4-r130-d128"),
    pytest.param(8, I8, True, 16, 2, 16, F32, 1000, 128, TAILS, id="tc-b8-i8-rope-G8-r1000-d128"),
    pytest.param(4, I8, True, 8, 2, 64, F16, 96, 64, TAILS, id="tc-b4-i8-rope-G4-r96-d64"),
    pytest.param(8, BF16, True, 4, 4, 1, F32, 17, 16, TAILS, id="tc-b8-bf16-rope-r17-d16"),
    pytest.param(8, F16, False, 20, 4, 16, F16, 130, 64, TAILS, id="tc-b8-f16-norope-H20-r130"),
    pytest.param(4, BF16, False, 32, 8, 16, BF16, 1000, 128, TAILS, id="tc-b4-bf16-norope-H32-r1000-slices"),
    pytest.param(8, I8, False, 8, 1, 256, F32, 528, 64, TAILS, id="tc-b8-i8-norope-G8-r528-slices"),
    pytest.param(4, F16, False, 1, 1, 16, F32, 64, 6, TAILS, id="tc-b4-f16-norope-H1-r64-d6"),
]


@pytest.mark.parametrize("bits,wdtype,rope,H,H_kv,block_size,q_dtype,r,d,seq_lens", CASES + CASES_TC)
def test_cuda_shapes(kernel, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d, seq_lens):
    require_kernel("latent_attention", "cuda")
    res = _run_or_skip(kernel, rope, d, seq_lens, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d)
    if res is None:
        return
    out, lse, q, args = res
    assert out.shape == (len(seq_lens), H, d)
    _check(out, lse, q, args, kernel=kernel)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_long_context_many_splits(kernel, rope, bits):
    """16K-32K tokens, small batch: the launcher picks many splits."""
    require_kernel("latent_attention", "cuda")
    seq_lens = [32768, 16384 + 5] if bits == 8 else [20000, 1]
    out, lse, q, args = _run(seq_lens, bits, BF16 if rope else F16, rope, 8, 2, 256, F16, 130 if rope else 512, 64)
    _check(out, lse, q, args, kernel=kernel)


@pytest.mark.parametrize("rope", [False, True])
def test_cuda_long_context_d128_g4(kernel, rope):
    """32K tokens at the tensor-core targets (d = 128, GQA group 4, r = 512)."""
    require_kernel("latent_attention", "cuda")
    out, lse, q, args = _run([32768, 4097], 8, F16, rope, 16, 4, 16, F16, 512, 128, seed=7)
    _check(out, lse, q, args, kernel=kernel)


@pytest.mark.parametrize("splits", ["1", "2", "7", "1000"])
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_split_count_does_not_change_result(kernel, monkeypatch, splits, rope):
    """QSVD_LATENT_SPLITS (read at every call) forces the split count; every
    count must stay within the bound (the merge rescales by exact powers of
    two; its additions are counted in the bound's depth)."""
    require_kernel("latent_attention", "cuda")
    seq_lens = [3000, 0, 31, 700]
    monkeypatch.setenv("QSVD_LATENT_SPLITS", splits)
    out, lse, q, args = _run(seq_lens, 8, F16, rope, 8, 2, 64, F32, 256, 64, seed=3)
    _check(out, lse, q, args, f"splits={splits}", kernel=kernel)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_agree_bitwise_on_exact_inputs(monkeypatch, rope, bits):
    """q = 0 and token scales 2^-7 make every score 0, every softmax weight
    exactly 1, and every latent sum exact in both split kernels: integers
    times 2^-7 far below 2^24 ulps; in the tensor-core kernels the weight
    split is exact (hi = 2^14, lo = 0) and each 64-token MMA sums multiples
    of 2^14 below 2^27. Split merges of exact sums are exact, so both kernels
    hand the shared combine the same (acc, l) whatever their tiles and split
    counts, and out and lse must agree bit for bit: at token and rank tails,
    partial head tiles, latent slices and empty sequences. A stale or
    uninitialised shared-memory value (NaN, or a wrong code) shows up,
    since 0 * NaN is NaN. The reference check uses the tensor-core bound."""
    require_kernel("latent_attention", "cuda")
    seq_lens = [1000, 0, 1, 63, 65, 129, 4097]
    shapes = [(130, 64, 20, 4, F16), (1000, 128, 16, 2, BF16), (528, 64, 8, 8, I8)]
    for i, (r, d, H, H_kv, wdtype) in enumerate(shapes):
        g = torch.Generator().manual_seed(11 + i)
        pc = make_paged_cache(seq_lens, r, bits, 16, generator=g)
        pc.cache_scale[pc.used] = 2.0**-7  # unused slots keep their NaN poison
        w = make_weights(H_kv, r, d, wdtype, generator=g)
        q = torch.zeros(len(seq_lens), H, d)
        cos, sin = R.rope_tables(max(seq_lens) + 1, d) if rope else (None, None)
        args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, bits, 1.0 / math.sqrt(d), cos, sin]
        dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        res = {}
        for k in KERNELS:
            monkeypatch.setenv("QSVD_LATENT_KERNEL", k)
            try:
                out, lse = qk.latent_attention(q.cuda(), *dev)
            except RuntimeError as e:
                if k == "tc" and "the tensor-core kernel needs more shared memory" in str(e):
                    pytest.skip(f"too large for this device's shared memory: {e}")
                raise
            res[k] = (out.cpu(), lse.cpu())
        what = f"r={r} d={d} H={H}"
        assert torch.equal(res["simt"][0], res["tc"][0]), f"out differs between the kernels ({what})"
        assert torch.equal(res["simt"][1], res["tc"][1]), f"lse differs between the kernels ({what})"
        _check(*res["tc"], q, args, what, kernel="tc")


def _call_or_skip(q, args, kernel):
    """The op on CUDA with QSVD_LATENT_KERNEL=kernel already set; skips when
    the tensor-core kernel's tile does not fit this device's shared memory."""
    try:
        out, lse = qk.latent_attention(q.cuda(), *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    except RuntimeError as e:
        if kernel == "tc" and "the tensor-core kernel needs more shared memory" in str(e):
            pytest.skip(f"too large for this device's shared memory: {e}")
        raise
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_agree_bitwise_int8_rope_one_tile(monkeypatch, bits):
    """Int8 weights with RoPE and live scores (random q, codes, weights and
    scales, the standard RoPE tables): when every sequence fits one token
    tile of both split kernels (L <= 16: the tensor-core tile is >= 16
    tokens, the CUDA-core one 32 at these sizes) and one split, the two
    kernels do the same fp32 operations in the same order on the same
    values, so out and lse agree bit for bit:
      - K~: the CUDA-core kernel sums the r exact products c W in fp32, the
        tensor-core kernel on INT8 MMA in int32, converted once. With
        r <= 1040 every partial sum is an integer of magnitude
        <= 127 * 127 * r < 2^24 (INT4 codes are smaller), so both give the
        exact K~ (never -0: the sums start at +0);
      - times w_uk_scale, RoPE (rotate-half), q' . k (per-lane fmaf over
        j = lane + 32 m, the same butterfly), times s_t: identical code;
      - softmax: one tile, so the same integer max M and the same
        p_t = exp2f(x_t - M); tokens past L score -inf and add exact zeros
        (p = 0, zero code rows) to the sum l and to the latent sum, which
        both kernels run over the tile's tokens in order with fmaf;
      - one split: the shared combine kernel gets identical partials.
    No step after K~ needs to be exact. A wrong column block, a stale pad
    column, a misplaced INT4 nibble or a lost conversion in the INT8 MMA path
    changes a score and shows. r = 130 and 1000 are not multiples of 16;
    r = 1000 with a group of 16 tiles the heads across CTAs; block size 4
    pages every sequence. Also checked against the reference (tensor-core
    bound)."""
    require_kernel("latent_attention", "cuda")
    monkeypatch.setenv("QSVD_LATENT_SPLITS", "1")
    seq_lens = [16, 1, 0, 9, 13]
    for i, (r, d, H, H_kv) in enumerate([(130, 64, 8, 2), (1000, 128, 16, 1)]):
        g = torch.Generator().manual_seed(31 + i)
        pc = make_paged_cache(seq_lens, r, bits, 4, generator=g)
        w = make_weights(H_kv, r, d, I8, generator=g)
        q = torch.randn(len(seq_lens), H, d, generator=g)
        cos, sin = R.rope_tables(max(seq_lens), d)
        args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, bits, 1.0 / math.sqrt(d), cos, sin]
        res = {}
        for k in KERNELS:
            monkeypatch.setenv("QSVD_LATENT_KERNEL", k)
            res[k] = _call_or_skip(q, args, k)
        what = f"r={r} d={d} H={H}"
        assert torch.equal(res["simt"][0], res["tc"][0]), f"out differs between the kernels ({what})"
        assert torch.equal(res["simt"][1], res["tc"][1]), f"lse differs between the kernels ({what})"
        _check(*res["tc"], q, args, what, kernel="tc")


@pytest.mark.parametrize("pattern", ["uniform", "mixed"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_int8_rebuild_sums_past_2_24(kernel, d, pattern):
    """Int8 weights with RoPE: the tensor-core kernel rebuilds K~ on INT8
    MMA, an exact int32 sum rounded once to fp32, and is held to the bound
    with d + 9 roundings on a score instead of r + d + 8 (helpers.py). Here
    r = 4096 and every K~ lies between 96^2 r = 3.8e7 and 127^2 r = 6.6e7,
    past 2^24 = 1.7e7, where the fp32 spacing is 2..8. All codes are
    positive, W_uk column j has one sign and q_j the same sign, so at
    position 0 (cos 1, sin 0) every term of a score has one sign: a relative
    error e of K~ moves the score, and the one-token sequence's lse, which
    is that score, by e |score|. The bound allows about 2 (d + 12) u
    relative there (9e-6 at d = 64, 1.7e-5 at d = 128).
      - "uniform": codes 127, W_uk +-127: every product is 16129 = 1 mod 8,
        so a sum kept in fp32 and rounded to nearest at each product loses
        1 per product past 2^24 (ties to even, always downwards): 4.6e-5
        relative, 5x and 2.7x the allowance. A conversion through bf16 errs
        by 6e-5, through fp16 overflows.
      - "mixed": codes and |W_uk| uniform in [96, 127], so a misplaced code
        or weight block shows as well.
    The longer sequences check RoPE at other positions. The CUDA-core kernel
    runs too, against its own bound (its fp32 sums do round past 2^24)."""
    require_kernel("latent_attention", "cuda")
    r, H, H_kv = 4096, 4, 2
    seq_lens = [1, 37, 300, 0]
    g = torch.Generator().manual_seed(41)
    pc = make_paged_cache(seq_lens, r, 8, 16, generator=g)
    sign = torch.where(torch.rand(H_kv, 1, d, generator=g) < 0.5, -1, 1)
    if pattern == "uniform":
        pc.cache.fill_(127)
        w_uk = (torch.full((H_kv, r, d), 127) * sign).to(I8)
    else:
        pc.cache.copy_(torch.randint(96, 128, pc.cache.shape, dtype=I8, generator=g))
        w_uk = (torch.randint(96, 128, (H_kv, r, d), generator=g) * sign).to(I8)
    w_uk_scale = torch.full((H_kv, d), 1.0 / (127 * r))  # |k| = |K~| / (127 r) in [72, 127]
    _, _, w_uv, w_uv_scale = make_weights(H_kv, r, d, I8, generator=g)
    q = (torch.rand(len(seq_lens), H, d, generator=g) + 0.5) * sign.reshape(H_kv, d).repeat_interleave(H // H_kv, 0)
    cos, sin = R.rope_tables(max(seq_lens), d)
    assert bool((cos[0] == 1).all()) and bool((sin[0] == 0).all())
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, w_uk, w_uk_scale, w_uv, w_uv_scale, 8,
            1.0 / math.sqrt(d), cos, sin]
    out, lse = _call_or_skip(q, args, kernel)
    _check(out, lse, q, args, f"d={d} {pattern}", kernel=kernel)


@pytest.mark.parametrize("part", ["q_lat", "weights"])
def test_cuda_hi_lo_splits_carry_the_low_bits(kernel, part):
    """The no-RoPE tensor-core kernel splits q_lat and the softmax weights
    p s_t into fp16 hi + lo. Random shapes cannot tell a kernel that drops a
    lo part (fp16 accuracy, 2^-12 relative, with random signs) from a correct
    one within the bound; here every element carries the same fp16 rounding
    error: m = 1 + 2^-11 - 2^-14 rounds to 1 in fp16 (after any power-of-two
    pre-scale), its lo part 2^-11 - 2^-14 is exact, and positive codes and
    W_uv make the error systematic. "q_lat": W_uk[:, 0] = 1, q = m e_0 and
    sm_scale = ln 2 (score_scale = 1) make every q_lat entry m, so a lost lo
    moves lse ~30x past the bound. "weights": q = 0 and token scales m 2^-7
    make every weight m 2^-7, so a lost lo moves out ~15x past the bound
    (checked against a float64 emulation of the kernel's steps)."""
    require_kernel("latent_attention", "cuda")
    m = 1 + 2.0**-11 - 2.0**-14
    g = torch.Generator().manual_seed(21)
    seq_lens, r, d = [200, 64, 1], 32, 16
    pc = make_paged_cache(seq_lens, r, 8, 16, generator=g)
    pc.cache.copy_(torch.randint(1, 128, pc.cache.shape, dtype=torch.int8, generator=g))
    w_uk = torch.zeros(1, r, d, dtype=F16)
    w_uk[0, :, 0] = 1
    w_uv = make_weights(1, r, d, F16, generator=g)[2].abs()
    q = torch.zeros(len(seq_lens), 1, d)
    if part == "q_lat":
        q[:, 0, 0] = m
        sm_scale = math.log(2.0)
    else:
        pc.cache_scale[pc.used] = m * 2.0**-7
        sm_scale = 1.0
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, w_uk, None, w_uv, None, 8, sm_scale, None, None]
    out, lse = qk.latent_attention(q.cuda(), *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    _check(out.cpu(), lse.cpu(), q, args, part, kernel=kernel)


def test_cuda_kernel_choice_errors(monkeypatch):
    """A forced tensor-core kernel on a shape it cannot serve, and an unknown
    QSVD_LATENT_KERNEL value, raise clear errors (never a silent fallback)."""
    require_kernel("latent_attention", "cuda")
    monkeypatch.setenv("QSVD_LATENT_KERNEL", "tc")
    with pytest.raises(RuntimeError, match=r"QSVD_LATENT_KERNEL=tc, but the tensor-core kernel needs d % 16 == 0"):
        _run([40], 8, F16, True, 2, 1, 16, F32, 64, 40)
    monkeypatch.setenv("QSVD_LATENT_KERNEL", "wmma")
    with pytest.raises(RuntimeError, match=r"QSVD_LATENT_KERNEL must be simt, tc or auto, got 'wmma'"):
        _run([40], 8, F16, False, 2, 1, 16, F32, 64, 64)
    monkeypatch.setenv("QSVD_LATENT_KERNEL", "auto")
    out, lse, q, args = _run([40, 3], 8, F16, True, 2, 1, 16, F32, 64, 40)  # d % 16 != 0: the CUDA-core kernel
    _check(out, lse, q, args, kernel="simt")


@pytest.mark.parametrize("rope", [False, True])
def test_cuda_nan_query_reaches_the_output(kernel, rope):
    """A NaN in one query head gives NaN out and lse for that head, as on the
    CPU and in the reference, although every score of the head is NaN (no
    finite running max in any split): such a partial must not be taken for
    an empty split. The other heads are unaffected."""
    require_kernel("latent_attention", "cuda")
    g = torch.Generator().manual_seed(5)
    pc = make_paged_cache([300, 40], 64, 8, 16, generator=g)
    w = make_weights(2, 64, 64, torch.float16, generator=g)
    q = torch.randn(2, 4, 64, generator=g)
    q[0, 1, 3] = float("nan")
    cos, sin = R.rope_tables(301, 64) if rope else (None, None)
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8, 0.125, cos, sin]
    out, lse = qk.latent_attention(q.cuda(), *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    out, lse = out.cpu(), lse.cpu()
    assert bool(out[0, 1].isnan().all()) and bool(lse[0, 1].isnan()), (out[0, 1], lse[0, 1])
    _check(out, lse, q, args, kernel=kernel)


_SKIP_CHECKS_SCRIPT = textwrap.dedent(
    """
    import math, torch, qsvd_kernels as qk
    from qsvd_kernels import reference as R
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import make_paged_cache, make_weights
    g = torch.Generator().manual_seed(0)
    pc = make_paged_cache([40, 17, 33], 64, {bits}, 16, generator=g)
    w = [x.cuda() if x is not None else None for x in make_weights(2, 64, 64, torch.float16, generator=g)]
    q = torch.randn(3, 4, 64, generator=g).cuda()
    cos, sin = R.rope_tables(48, 64) if {rope} else (None, None)
    rope = [t.cuda() if t is not None else None for t in (cos, sin)]
    def run(table, lens):
        out, lse = qk.latent_attention(q, pc.cache.cuda(), pc.cache_scale.cuda(), table.cuda(), lens.cuda(), *w,
                                       {bits}, 0.125, *rope)
        torch.cuda.synchronize()
        return out.cpu(), lse.cpu()
    good = run(pc.block_table, pc.seq_lens)
    # A block id far outside the cache (both signs) in sequence 0: its tokens are skipped.
    for bad in (2**31 - 1, -2**31, pc.cache.shape[0]):
        table = pc.block_table.clone()
        table[0, 1] = bad
        out, lse = run(table, pc.seq_lens)
        assert torch.equal(out[1:], good[0][1:]) and torch.equal(lse[1:], good[1][1:]), "other sequences changed"
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    # seq_len past what block_table addresses (and past the RoPE table): clamped to the capacity.
    cap = pc.block_table.shape[1] * 16
    lens = pc.seq_lens.clone()
    lens[1] = 2**31 - 1
    table = pc.block_table.clone()
    table[1, :] = table[1, 0]  # every entry of row 1 valid, so the clamped tokens are readable
    out, lse = run(table, lens)
    lens[1] = min(cap, 48) if {rope} else cap
    ref = run(table, lens)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1]), "long seq_len not clamped"
    lens[1] = -5  # a negative length is an empty sequence
    out, lse = run(table, lens)
    assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())
    print("OK")
    """
)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_bad_indices_with_host_checks_off(kernel, rope, bits):
    """QSVD_SKIP_INDEX_CHECKS=1 (read once per process, hence a subprocess):
    bad block ids and too-long seq_lens neither raise nor fault nor touch
    other sequences; the kernel skips bad blocks and clamps lengths."""
    require_kernel("latent_attention", "cuda")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "QSVD_SKIP_INDEX_CHECKS": "1", "CUDA_LAUNCH_BLOCKING": "1", "QSVD_LATENT_KERNEL": kernel}
    script = _SKIP_CHECKS_SCRIPT.format(tests=tests, bits=bits, rope=rope)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_cuda_unsupported_shape_raises():
    require_kernel("latent_attention", "cuda")
    g = torch.Generator().manual_seed(1)
    pc = make_paged_cache([5], 16, 8, 16, generator=g)
    w = [x.cuda() if x is not None else None for x in make_weights(1, 16, 258, torch.float16, generator=g)]
    q = torch.randn(1, 1, 258, generator=g).cuda()
    with pytest.raises(RuntimeError, match=r"qsvd.latent_attention: the CUDA kernel serves head dims d <= 256"):
        qk.latent_attention(q, pc.cache.cuda(), pc.cache_scale.cuda(), pc.block_table.cuda(), pc.seq_lens.cuda(),
                            *w, 8, 0.1)


# Packed rows (cache_scale None): each token's codes then its fp32 scale in
# one uint8 row of row_bytes + 4 bytes. The loaders read codes as wide as the
# row stride allows (4-byte loads at stride r + 4 instead of 16-byte loads),
# into the same shared-memory tiles: the same arithmetic, so the output must
# equal the separate layout's bit for bit, and stay within the bound.
PACKED_CASES = [
    pytest.param(8, F16, False, 32, 8, 16, F16, 512, 128, RAGGED, id="b8-f16-norope-r512"),
    pytest.param(4, BF16, True, 32, 8, 1, BF16, 136, 64, RAGGED, id="b4-bf16-rope-bs1-r136"),
    pytest.param(8, I8, True, 8, 8, 256, F32, 1000, 128, SHORT, id="b8-i8-rope-r1000"),
    pytest.param(4, I8, False, 16, 1, 16, F16, 4096, 64, SHORT, id="b4-i8-norope-r4096"),
    pytest.param(8, BF16, True, 4, 2, 16, F32, 8, 16, SHORT, id="b8-bf16-rope-r8-d16"),
]


@pytest.mark.parametrize("bits,wdtype,rope,H,H_kv,block_size,q_dtype,r,d,seq_lens", PACKED_CASES)
def test_cuda_packed_rows_equal_separate(kernel, bits, wdtype, rope, H, H_kv, block_size, q_dtype, r, d, seq_lens):
    require_kernel("latent_attention", "cuda")
    from qsvd_kernels.formats import pack_latent_rows

    g = torch.Generator().manual_seed(31)
    pc = make_paged_cache(seq_lens, r, bits, block_size, generator=g)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    q = torch.randn(len(seq_lens), H, d, generator=g).to(q_dtype)
    cos, sin = R.rope_tables(max(max(seq_lens), 1) + 3, d) if rope else (None, None)
    rest = [pc.block_table, pc.seq_lens, *w, bits, 1.0 / math.sqrt(d), cos, sin]
    sep = [pc.cache, pc.cache_scale, *rest]
    packed = [pack_latent_rows(pc.cache, pc.cache_scale), None, *rest]
    to_dev = lambda args: [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]  # noqa: E731
    try:
        out_s, lse_s = qk.latent_attention(q.cuda(), *to_dev(sep))
    except RuntimeError as e:
        if kernel == "tc" and "the tensor-core kernel needs more shared memory" in str(e):
            pytest.skip(f"too large for this device's shared memory: {e}")
        raise
    out_p, lse_p = qk.latent_attention(q.cuda(), *to_dev(packed))
    _check(out_p.cpu(), lse_p.cpu(), q, packed, "packed", kernel=kernel)
    assert torch.equal(out_p, out_s) and torch.equal(lse_p, lse_s)


# Cached rotary keys (partial RoPE, issue 22): the CUDA-core absorbed kernel
# plus q[:d_rope] . rope_keys per token. Ragged long contexts, head tiles
# (G = 32 > 16 heads per CTA), d_rope not a multiple of 4 (6) and of 32 (48),
# INT4 latents, every weight dtype.
ROPE_KEY_CASES = [
    pytest.param(8, I8, 64, 2, 960, 128, 32, RAGGED, id="b8-i8-G32-r960-d128-rope32"),
    pytest.param(4, F16, 8, 8, 130, 64, 6, RAGGED, id="b4-f16-G1-r130-d64-rope6"),
    pytest.param(8, BF16, 16, 4, 4096, 128, 48, SHORT, id="b8-bf16-G4-r4096-d128-rope48"),
]


@pytest.mark.parametrize("bits,wdtype,H,H_kv,r,d,d_rope,seq_lens", ROPE_KEY_CASES)
def test_cached_rotary_keys(monkeypatch, bits, wdtype, H, H_kv, r, d, d_rope, seq_lens):
    """latent_rope_keys_append on CUDA writes what the CPU kernel writes
    (both within the derived bound of the exact keys), and latent_attention
    reading them matches the reference on the same stored keys within the
    CUDA-core kernel's bound, with its automatic plan, and with forced split
    counts; forcing the tensor-core kernel is refused by name."""
    from helpers import rope_keys_bound

    require_kernel("latent_rope_keys_append", "cuda")
    g = torch.Generator().manual_seed(31)
    pc = make_paged_cache(seq_lens, r, bits, 16, generator=g)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    L = max(seq_lens)
    cos, sin = R.rope_tables(L + 3, d, pairs=range(d_rope // 2))
    block = pc.cache.shape[1]
    slots = torch.tensor([int(pc.block_table[b, t // block]) * block + t % block
                          for b, n in enumerate(seq_lens) for t in range(n)])
    pos = torch.tensor([t for n in seq_lens for t in range(n)])
    keys = torch.zeros(pc.cache.shape[0], block, H_kv, d_rope, dtype=torch.float16)
    keys_cpu = keys.clone()
    qk.latent_rope_keys_append(pc.cache, pc.cache_scale, slots, pos, w[0], w[1], bits, cos, sin, keys_cpu)
    keys_dev = keys.cuda()
    qk.latent_rope_keys_append(pc.cache.cuda(), pc.cache_scale.cuda(), slots.cuda(), pos.cuda(), w[0].cuda(),
                               None if w[1] is None else w[1].cuda(), bits, cos.cuda(), sin.cuda(), keys_dev)
    exact = R.latent_rope_keys_ref(pc.cache, pc.cache_scale, slots, pos, w[0], w[1], bits, cos, sin)
    bound = rope_keys_bound(pc.cache, pc.cache_scale, slots, w[0], w[1], bits, exact)
    for got in (keys_dev.cpu(), keys_cpu):
        err = (got.view(-1, H_kv, d_rope)[slots].double() - exact).abs()
        assert bool((err <= bound).all()), float((err - bound).max())

    keys = keys_dev.cpu()
    q = torch.randn(len(seq_lens), H, d, generator=g)
    args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, bits, 1.0 / math.sqrt(d), cos, sin]
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    truth = R.latent_attention_ref(q.double(), *args, rope_keys=keys)
    bound = latent_attention_error_bound(q, *args, **LATENT_KERNEL_BOUND["simt"], rope_keys=keys)
    for splits in ("0", "1", "7"):
        monkeypatch.setenv("QSVD_LATENT_SPLITS", splits)
        out, lse = qk.latent_attention(q.cuda(), *dev, rope_keys=keys_dev)
        assert_within(out.cpu(), truth[0], bound[0], torch.float32, f"out splits={splits}")
        assert_within(lse.cpu(), truth[1], bound[1], torch.float32, f"lse splits={splits}")
    monkeypatch.setenv("QSVD_LATENT_SPLITS", "0")
    monkeypatch.setenv("QSVD_LATENT_KERNEL", "tc")
    with pytest.raises(RuntimeError, match="QSVD_LATENT_KERNEL=tc, but the tensor-core kernels do not read cached "
                                           "rotary keys"):
        qk.latent_attention(q.cuda(), *dev, rope_keys=keys_dev)


def test_cached_rotary_keys_reconstruct_and_partial_rope_prefill():
    """latent_reconstruct_kv on CUDA, partial RoPE in both forms: the rebuilt
    rotary dims (the epilogue over d_rope dims) and the cached ones (the
    stored keys copied over), against the reference within the tensor-core
    GEMM's bound, in the vector and the scalar epilogue (d_rope 16 / 6)."""
    from helpers import RECONSTRUCT_BOUND, latent_reconstruct_error_bound

    require_kernel("latent_rope_keys_append", "cuda")
    g = torch.Generator().manual_seed(32)
    seq_lens, H_kv, r, d = [37, 0, 300, 1], 2, 96, 64
    for d_rope in (16, 6):
        pc = make_paged_cache(seq_lens, r, 8, 16, generator=g)
        w = make_weights(H_kv, r, d, F16, generator=g)
        cos, sin = R.rope_tables(310, d, pairs=range(d_rope // 2))
        keys = torch.randn(pc.cache.shape[0], 16, H_kv, d_rope, generator=g).half()
        args = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8, cos, sin]
        dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        kb, vb = latent_reconstruct_error_bound(*args, **RECONSTRUCT_BOUND["cuda"])
        for rope_keys in (None, keys):
            k, v = qk.latent_reconstruct_kv(*dev, out_dtype=F32,
                                            rope_keys=None if rope_keys is None else rope_keys.cuda())
            k_ref, v_ref = R.latent_reconstruct_kv_ref(*args, out_dtype=F32, compute_dtype=torch.float64,
                                                       rope_keys=rope_keys)
            assert bool(((k.cpu().double() - k_ref.double()).abs() <= kb + 2.0**-24 * k_ref.abs()).all()), d_rope
            assert bool(((v.cpu().double() - v_ref.double()).abs() <= vb + 2.0**-24 * v_ref.abs()).all()), d_rope
