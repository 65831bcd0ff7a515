"""Hypothesis fuzzing, one test per op: random legal shapes match the
reference; random illegal ones raise ValueError/RuntimeError. Neither
crashes, neither changes its read-only inputs, and the in-place op writes
only the slots it was given (guard blocks around the cache must survive)."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import code_format, pack_latent_rows, packed_row_bytes

from conftest import DEVICES, require_kernel
from helpers import (
    LATENT_BOUND,
    assert_within,
    latent_attention_error_bound,
    RECONSTRUCT_BOUND,
    latent_reconstruct_error_bound,
    make_paged_cache,
    make_weights,
    random_codes,
)

SUPPORTED_K = [K for K in range(1, 4097) if qk._C.is_supported_hadamard_dim(K)]
FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
devices = st.sampled_from(DEVICES)


def _append_inputs(T, r, n_slots, bad_slot, dtype, g):
    """Up to T distinct slots (a quarter skipped with -1, one past the cache
    when bad_slot) and their latent rows."""
    T = min(T, n_slots)
    slots = torch.randperm(n_slots, generator=g)[:T]
    if T:
        slots[torch.rand(T, generator=g) < 0.25] = -1
    if bad_slot and T:
        slots[int(torch.randint(0, T, (1,), generator=g))] = n_slots + int(torch.randint(0, 5, (1,), generator=g))
    return slots, (torch.randn(T, r, generator=g) * 3).to(dtype)


def _refused_untouched(append, buffers) -> None:
    """A slot past the cache raises, naming slot_mapping, and nothing in the
    guarded buffers (pairs of buffer, its copy before the call) changes."""
    try:
        append()
    except ValueError as e:
        assert "`slot_mapping`" in str(e)
    else:
        raise AssertionError("a slot past the cache was accepted")
    for buf, before in buffers:
        assert torch.equal(buf, before)


def _snapshot(ts):
    return [t.clone() for t in ts if isinstance(t, torch.Tensor)]


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.numel() else t


def _unchanged(ts, snap):
    """Bitwise equality (NaN poison compares equal to itself)."""
    return all(torch.equal(_bits(a), _bits(b)) for a, b in zip([t for t in ts if isinstance(t, torch.Tensor)], snap))


@given(device=devices, K=st.sampled_from(SUPPORTED_K), lead=st.lists(st.integers(0, 3), max_size=2),
       dtype=FLOATS, use_signs=st.booleans(), bits=st.sampled_from([0, 4, 8]),
       clip=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_fuzz_hadamard_legal(device, K, lead, dtype, use_signs, bits, clip, seed):
    require_kernel("hadamard_quant", device)
    assume(not (bits == 4 and K % 2))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, K, generator=g) * 10 ** torch.randint(-3, 4, (), generator=g).item()).to(dtype)
    signs = torch.randn(K, generator=g) if use_signs else None  # any real diagonal is legal
    xd, sd = x.to(device), (signs.to(device) if signs is not None else None)
    snap = _snapshot([xd, sd])
    if bits == 0:
        assert torch.equal(qk.hadamard_transform(xd, sd).cpu(), R.hadamard_transform_ref(x, signs))
    else:
        codes, scale = qk.hadamard_quant(xd, bits, clip, sd)
        want = R.hadamard_quant_ref(x, bits, clip, signs)
        assert torch.equal(codes.cpu(), want[0]) and torch.equal(scale.cpu(), want[1])
    assert _unchanged([xd, sd], snap)


@given(device=devices, K=st.integers(-3, 70000), bits=st.integers(0, 9), clip=st.one_of(st.floats(-1.0, 2.0), st.just(float("nan"))),
       signs_len=st.integers(0, 5))
def test_fuzz_hadamard_illegal(device, K, bits, clip, signs_len):
    require_kernel("hadamard_quant", device)
    K_ok = 1 <= K <= 32768 and qk._C.is_supported_hadamard_dim(K)
    bits_ok = bits in (4, 8) and (bits == 8 or K % 2 == 0)
    clip_ok = 0 < clip <= 1
    signs_ok = signs_len in (0, K)
    assume(not (K_ok and bits_ok and clip_ok and signs_ok))
    assume(K <= 70000)
    x = torch.randn(2, max(K, 0), device=device) if K >= 0 else torch.randn(2, 3, device=device)
    signs = torch.ones(signs_len, device=device) if signs_len else None
    try:
        qk.hadamard_quant(x if K >= 0 else x[:, :0], bits, clip, signs)
    except (ValueError, RuntimeError) as e:
        assert "qsvd.hadamard_quant:" in str(e)
    else:
        raise AssertionError("illegal arguments were accepted")


@given(device=devices, M=st.integers(0, 40), N=st.integers(0, 40), half_K=st.integers(0, 150),
       a_bits=st.sampled_from([4, 8]), b_bits=st.sampled_from([4, 8]), out_dtype=FLOATS, use_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_quant_gemm_legal(device, M, N, half_K, a_bits, b_bits, out_dtype, use_bias, seed):
    require_kernel("quant_gemm", device)
    g = torch.Generator().manual_seed(seed)
    K = 2 * half_K
    (a, A), (b, B) = random_codes(a_bits, (M, K), g), random_codes(b_bits, (N, K), g)
    # Scales keep |out| inside fp16's range (K * 127 * 127 * sa * sb < 65504).
    sa, sb = torch.rand(M, generator=g) / 128, torch.rand(N, generator=g) / 128
    bias = torch.randn(N, generator=g).to(out_dtype) if use_bias else None
    ins = [t.to(device) if t is not None else None for t in (A, sa, B, sb, bias)]
    snap = _snapshot(ins)
    got = qk.quant_gemm(ins[0], ins[1], ins[2], ins[3], a_bits, b_bits, out_dtype, ins[4]).cpu()
    prod = (a.double() @ b.double().T) * sa.double()[:, None] * sb.double()[None, :]
    exact = prod + (bias.double()[None, :] if use_bias else 0)
    mag = prod.abs() + (bias.double().abs()[None, :] if use_bias else 0)
    assert_within(got, exact, 4 * 2.0**-24 * mag, out_dtype, "quant_gemm")
    assert _unchanged(ins, snap)


@given(device=devices, which=st.sampled_from(["K", "a_scale", "b_scale", "a_dtype", "bias", "bits", "out_dtype"]),
       M=st.integers(1, 8), N=st.integers(1, 8), K=st.integers(1, 40))
def test_fuzz_quant_gemm_illegal(device, which, M, N, K):
    require_kernel("quant_gemm", device)
    a = torch.zeros(M, K, dtype=torch.int8, device=device)
    b = torch.zeros(N, K, dtype=torch.int8, device=device)
    sa, sb = torch.ones(M, device=device), torch.ones(N, device=device)
    kw = dict(a_bits=8, b_bits=8, out_dtype=torch.float32, bias=None)
    if which == "K":
        b = torch.zeros(N, K + 1, dtype=torch.int8, device=device)
    elif which == "a_scale":
        sa = torch.ones(M + 1, device=device)
    elif which == "b_scale":
        sb = torch.ones(N, 2, device=device)
    elif which == "a_dtype":
        a = a.to(torch.int16)
    elif which == "bias":
        kw["bias"] = torch.ones(N + 1, device=device)
    elif which == "bits":
        kw["a_bits"] = 6
    else:
        kw["out_dtype"] = torch.int8
    try:
        qk.quant_gemm(a, sa, b, sb, **kw)
    except (ValueError, RuntimeError) as e:
        assert "qsvd.quant_gemm:" in str(e)
    else:
        raise AssertionError(f"illegal {which} was accepted")


@given(device=devices, T=st.integers(0, 12), half_r=st.integers(1, 80), num_blocks=st.integers(1, 5),
       block_size=st.sampled_from([1, 3, 16, 32]), bits=st.sampled_from([4, 8]), dtype=FLOATS,
       clip=st.floats(0.1, 1.0), bad_slot=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_latent_cache_append(device, T, half_r, num_blocks, block_size, bits, dtype, clip, bad_slot, seed):
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(seed)
    r = 2 * half_r
    slots, c = _append_inputs(T, r, num_blocks * block_size, bad_slot, dtype, g)
    T = len(slots)
    fmt = code_format(bits)
    # The cache is the middle of a bigger buffer: one guard block each side.
    buf = torch.randint(0, 127, (num_blocks + 2, block_size, fmt.row_bytes(r)), generator=g).to(fmt.dtype).to(device)
    sbuf = torch.full((num_blocks + 2, block_size), 7.0, device=device)
    cache, scale = buf[1:-1], sbuf[1:-1]
    assert cache.is_contiguous()
    before, sbefore = buf.clone(), sbuf.clone()
    want_cache, want_scale = cache.cpu().clone(), scale.cpu().clone()
    cd, sd = c.to(device), slots.to(device)
    snap = _snapshot([cd, sd])
    if bad_slot and T:
        _refused_untouched(lambda: qk.latent_cache_append(cd, sd, cache, scale, bits, clip), [(buf, before),
                                                                                               (sbuf, sbefore)])
        return
    qk.latent_cache_append(cd, sd, cache, scale, bits, clip)
    R.latent_cache_append_ref(c, slots, want_cache, want_scale, bits, clip)
    assert torch.equal(cache.cpu(), want_cache) and torch.equal(scale.cpu(), want_scale)
    assert torch.equal(buf[0], before[0]) and torch.equal(buf[-1], before[-1])
    assert torch.equal(sbuf[0], sbefore[0]) and torch.equal(sbuf[-1], sbefore[-1])
    assert _unchanged([cd, sd], snap)


@given(device=devices, T=st.integers(0, 12), eighth_r=st.integers(1, 20), num_blocks=st.integers(1, 5),
       block_size=st.sampled_from([1, 3, 16, 32]), bits=st.sampled_from([4, 8]), dtype=FLOATS,
       clip=st.floats(0.1, 1.0), bad_slot=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_latent_cache_append_packed(device, T, eighth_r, num_blocks, block_size, bits, dtype, clip, bad_slot,
                                         seed):
    """Packed rows (cache_scale None): the whole buffer, guard blocks around
    the cache included, equals the reference's bytes after the append."""
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(seed)
    r = 8 * eighth_r  # code bytes per row a multiple of 4 for both widths
    slots, c = _append_inputs(T, r, num_blocks * block_size, bad_slot, dtype, g)
    T = len(slots)
    buf = torch.randint(0, 256, (num_blocks + 2, block_size, packed_row_bytes(bits, r)), dtype=torch.uint8,
                        generator=g)
    want = buf.clone()
    buf = buf.to(device)
    before = buf.clone()
    cache = buf[1:-1]
    assert cache.is_contiguous()
    cd, sd = c.to(device), slots.to(device)
    snap = _snapshot([cd, sd])
    if bad_slot and T:
        _refused_untouched(lambda: qk.latent_cache_append(cd, sd, cache, None, bits, clip), [(buf, before)])
        return
    qk.latent_cache_append(cd, sd, cache, None, bits, clip)
    R.latent_cache_append_ref(c, slots, want[1:-1], None, bits, clip)
    assert torch.equal(buf.cpu(), want)
    assert _unchanged([cd, sd], snap)


@st.composite
def latent_problems(draw):
    B = draw(st.integers(1, 4))
    block_size = draw(st.sampled_from([1, 2, 16, 32]))
    seq_lens = [draw(st.integers(0, 70)) for _ in range(B)]
    H_kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    bits = draw(st.sampled_from([4, 8]))
    r = draw(st.integers(1, 48)) * 2
    rope = draw(st.booleans())
    d = draw(st.integers(1, 40)) * 2
    wdtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int8]))
    q_dtype = draw(FLOATS)
    corrupt = draw(st.sampled_from([None, None, None, "seq_len", "block", "negative"]))
    seed = draw(st.integers(0, 2**31 - 1))
    # Packed rows (cache_scale None) need a multiple of 4 code bytes per row.
    packed = draw(st.booleans())
    if packed:
        r = -(-r // 8) * 8
    return B, block_size, seq_lens, H_kv, group, bits, r, rope, d, wdtype, q_dtype, packed, corrupt, seed


def _latent_inputs(p, device):
    B, block_size, seq_lens, H_kv, group, bits, r, rope, d, wdtype, q_dtype, packed, corrupt, seed = p
    g = torch.Generator().manual_seed(seed)
    pc = make_paged_cache(seq_lens, r, bits, block_size, generator=g)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    cos, sin = R.rope_tables(max(seq_lens) + 1, d) if rope else (None, None)
    q = torch.randn(B, H_kv * group, d, generator=g).to(q_dtype)
    if corrupt == "seq_len":
        pc.seq_lens[0] = pc.block_table.shape[1] * block_size + 1
    elif corrupt == "block":
        pc.seq_lens[0] = max(int(pc.seq_lens[0]), 1)
        pc.block_table[0, 0] = pc.cache.shape[0] + 3
    elif corrupt == "negative":
        pc.seq_lens[0] = -1
    cache = [pack_latent_rows(pc.cache, pc.cache_scale), None] if packed else [pc.cache, pc.cache_scale]
    common = [*cache, pc.block_table, pc.seq_lens, *w, bits]
    return q, common, (cos, sin), d


@given(device=devices, p=latent_problems())
def test_fuzz_latent_attention(device, p):
    require_kernel("latent_attention", device)
    q, common, (cos, sin), d = _latent_inputs(p, device)
    corrupt = p[-2]
    args = [q, *common, 1 / math.sqrt(d), cos, sin]
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    snap = _snapshot(dev)
    if corrupt:
        try:
            qk.latent_attention(*dev)
        except ValueError as e:
            assert "qsvd.latent_attention:" in str(e) and ("`seq_lens`" in str(e) or "`block_table`" in str(e))
        else:
            raise AssertionError(f"corrupt {corrupt} was accepted")
        return
    out, lse = qk.latent_attention(*dev)
    truth = R.latent_attention_ref(q.double(), *args[1:])
    bound = latent_attention_error_bound(q, *args[1:], **LATENT_BOUND[device])
    assert_within(out.cpu(), truth[0], bound[0], q.dtype, "out")
    assert_within(lse.cpu(), truth[1], bound[1], torch.float32, "lse")
    assert _unchanged(dev, snap)


@given(device=devices, p=latent_problems(), out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]))
def test_fuzz_latent_reconstruct_kv(device, p, out_dtype):
    require_kernel("latent_reconstruct_kv", device)
    _, common, (cos, sin), _ = _latent_inputs(p, device)
    corrupt = p[-2]
    args = [*common, cos, sin]
    dev = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    snap = _snapshot(dev)
    if corrupt:
        try:
            qk.latent_reconstruct_kv(*dev, out_dtype=out_dtype)
        except ValueError as e:
            assert "qsvd.latent_reconstruct_kv:" in str(e)
        else:
            raise AssertionError(f"corrupt {corrupt} was accepted")
        return
    k, v = qk.latent_reconstruct_kv(*dev, out_dtype=out_dtype)
    want_dtype = out_dtype or (torch.float16 if common[4].dtype == torch.int8 else common[4].dtype)
    tk, tv = R.latent_reconstruct_kv_ref(*args, out_dtype=torch.float64)
    bk, bv = latent_reconstruct_error_bound(*args, **RECONSTRUCT_BOUND[device])
    assert k.dtype == want_dtype
    assert_within(k.cpu(), tk, bk, want_dtype, "k")
    assert_within(v.cpu(), tv, bv, want_dtype, "v")
    assert _unchanged(dev, snap)
