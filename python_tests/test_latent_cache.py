"""latent_cache_append: bit-exact per-token quantization into the paged cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import code_format, pack_latent_rows, packed_row_bytes, split_latent_rows

from conftest import require_kernel
from helpers import make_paged_cache, make_weights


def _empty_cache(num_blocks, block_size, r, bits, device):
    fmt = code_format(bits)
    # Sentinel contents: every slot not written must keep them.
    cache = torch.full((num_blocks, block_size, fmt.row_bytes(r)), 0x5A, dtype=fmt.dtype, device=device)
    scale = torch.full((num_blocks, block_size), -123.0, device=device)
    return cache, scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 64, 256])
@pytest.mark.parametrize("r", [2, 96, 512, 1000])
def test_append_matches_reference(device, bits, dtype, block_size, r, isa):
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(r * 7 + block_size + bits)
    T = 9
    num_blocks = max(6, 2 * T // block_size)
    c = (torch.randn(T, r, generator=g) * 5).to(dtype)
    c[2] = 0.0  # all-zero row
    c[4] *= 1e4  # large magnitude
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[5] = -1  # padding
    cache, scale = _empty_cache(num_blocks, block_size, r, bits, device)
    want_cache, want_scale = cache.cpu().clone(), scale.cpu().clone()
    for slot_dtype in (torch.int64, torch.int32):
        qk.latent_cache_append(c.to(device), slots.to(slot_dtype).to(device), cache, scale, bits, 0.9)
    R.latent_cache_append_ref(c, slots, want_cache, want_scale, bits, 0.9)
    assert torch.equal(cache.cpu(), want_cache)
    assert torch.equal(scale.cpu(), want_scale)
    # Slot 5 was padding: the only untouched slots are the sentinels.
    written = set(int(s) for s in slots if s >= 0)
    flat_scale = scale.cpu().view(-1)
    for s in range(num_blocks * block_size):
        assert (flat_scale[s] == -123.0) == (s not in written)
    assert float(flat_scale[int(slots[2])]) == 0.0


def test_out_of_range_slot_raises_before_any_write(device):
    require_kernel("latent_cache_append", device)
    cache, scale = _empty_cache(2, 16, 64, 8, device)
    before = cache.clone(), scale.clone()
    c = torch.randn(3, 64, device=device)
    with pytest.raises(ValueError, match=r"`slot_mapping`\[2\] = 32 is past the end of the cache"):
        qk.latent_cache_append(c, torch.tensor([0, 1, 32], device=device), cache, scale, 8)
    assert torch.equal(cache, before[0]) and torch.equal(scale, before[1])


def test_the_cpu_checks_indices_even_when_the_caller_vouches_for_them():
    """check_indices=False skips a CUDA sync; the CPU kernels index host
    memory without device-side guards, so they check regardless."""
    require_kernel("latent_cache_append", "cpu")
    cache, scale = _empty_cache(2, 16, 64, 8, "cpu")
    before = cache.clone(), scale.clone()
    with pytest.raises(ValueError, match=r"`slot_mapping`\[2\] = 32 is past the end of the cache"):
        qk.latent_cache_append(torch.randn(3, 64), torch.tensor([0, 1, 32]), cache, scale, 8, check_indices=False)
    assert torch.equal(cache, before[0]) and torch.equal(scale, before[1])
    g = torch.Generator().manual_seed(0)
    pc = make_paged_cache([5, 3], 64, 8, 16, generator=g)
    w = make_weights(2, 64, 32, torch.float16, generator=g)
    bad_table = pc.block_table.clone()
    bad_table[1, 0] = pc.cache.shape[0] + 3
    for call in (lambda: qk.latent_attention(torch.randn(2, 4, 32), pc.cache, pc.cache_scale, bad_table, pc.seq_lens,
                                             *w, 8, 32**-0.5, check_indices=False),
                 lambda: qk.latent_reconstruct_kv(pc.cache, pc.cache_scale, bad_table, pc.seq_lens, *w, 8,
                                                  check_indices=False)):
        with pytest.raises(ValueError, match="block_table"):
            call()


def test_empty_append_is_a_no_op(device):
    require_kernel("latent_cache_append", device)
    cache, scale = _empty_cache(2, 16, 64, 4, device)
    before = cache.clone()
    qk.latent_cache_append(torch.empty(0, 64, device=device), torch.empty(0, dtype=torch.long, device=device),
                           cache, scale, 4)
    assert torch.equal(cache, before)


def test_roundtrip_error_is_half_a_step(device):
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(0)
    c = torch.randn(32, 256, generator=g)
    for bits in (8, 4):
        cache, scale = _empty_cache(2, 16, 256, bits, device)
        qk.latent_cache_append(c.to(device), torch.arange(32, device=device), cache, scale, bits)
        deq = R.dequantize_rows_ref(cache.cpu().view(32, -1), scale.cpu().view(32), bits)
        assert bool(((deq - c.double()).abs() <= scale.cpu().view(32, 1).double() / 2 * (1 + 1e-6)).all())


# ---------------------------------------------------------------------------
# CUDA against the CPU kernel, bit for bit (both implement numerics.h).
# ---------------------------------------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _same_bits(a, b):
    """Bitwise equality, except that any NaN matches any NaN: the CPU keeps
    the input NaN's payload, a GPU returns its canonical NaN."""
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a].view(torch.int32), b[~nan_b].view(torch.int32))


def _guarded_cache(num_blocks, block_size, r, bits, device, shift, generator):
    """A contiguous cache inside a bigger buffer, with a guard block on each
    side, filled with random bytes (a stray write of any code shows). `shift`
    moves it by one element, so its rows lose their 4/8-byte alignment and
    the kernel's scalar path runs. Returns (buf, sbuf, cache, scale)."""
    fmt = code_format(bits)
    last = fmt.row_bytes(r)
    n = num_blocks * block_size * last
    buf = torch.randint(0, 256, ((num_blocks + 2) * block_size * last + 1,), dtype=torch.uint8, generator=generator)
    buf = buf.view(fmt.dtype)
    sbuf = torch.full(((num_blocks + 2) * block_size + 1,), -123.0)
    buf, sbuf = buf.to(device), sbuf.to(device)
    start, sstart = block_size * last + shift, block_size + shift
    cache = buf[start : start + n].view(num_blocks, block_size, last)
    scale = sbuf[sstart : sstart + num_blocks * block_size].view(num_blocks, block_size)
    return buf, sbuf, cache, scale


def _special_rows(T, r, dtype, generator):
    """Random rows with the cases the rules single out: a zero row, NaN, +-Inf,
    NaN and Inf together, tiny and huge magnitudes."""
    c = torch.randn(T, r, generator=generator) * 4
    c[1] = 0.0
    c[3, r // 2] = float("nan")
    c[5, 0] = float("inf")
    c[6, -1] = float("-inf")
    c[7, 0], c[7, -1] = float("nan"), float("inf")
    c[8] *= 1e-6
    c[9] *= 1e4
    return c.to(dtype)


def _c_layout(c, layout):
    """c as the kernel may receive it: contiguous, rows with a padded stride,
    or shifted by one element (16-byte loads impossible)."""
    if layout == "contiguous":
        return c
    T, r = c.shape
    if layout == "strided_rows":
        big = torch.zeros(T, r + 8, dtype=c.dtype, device=c.device)
        big[:, :r] = c
        return big[:, :r]
    flat = torch.zeros(T * r + 1, dtype=c.dtype, device=c.device)
    flat[1:] = c.reshape(-1)
    return flat[1:].view(T, r)


APPEND_RANKS = [(8, 1), (8, 7), (8, 33), (8, 96), (8, 1000), (8, 1024), (8, 1031), (8, 1536), (8, 4096), (8, 4104),
                (8, 5120), (4, 2), (4, 34), (4, 130), (4, 512), (4, 1024), (4, 1026), (4, 4096), (4, 6144)]


@CUDA
@pytest.mark.parametrize("bits,r", APPEND_RANKS, ids=[f"b{b}-r{r}" for b, r in APPEND_RANKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_append_bit_exact_with_cpu(bits, r, dtype):
    """Warp-per-row (r <= 1024) and block-per-row kernels, vector and scalar
    paths, int32/int64 slots, padding slots: codes, scales and the guard
    bytes around the cache all equal the CPU kernel's, bit for bit."""
    require_kernel("latent_cache_append", "cuda")
    require_kernel("latent_cache_append", "cpu")
    g = torch.Generator().manual_seed(r * 3 + bits)
    T, num_blocks, block_size = 23, 4, 16
    c = _special_rows(T, r, dtype, g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[2], slots[10], slots[11] = -1, -1, -7
    for slot_dtype in (torch.int64, torch.int32):
        for layout, shift in (("contiguous", 0), ("strided_rows", 0), ("shifted", 1)):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            got = _guarded_cache(num_blocks, block_size, r, bits, "cuda", shift, torch.Generator().manual_seed(seed))
            want = _guarded_cache(num_blocks, block_size, r, bits, "cpu", shift, torch.Generator().manual_seed(seed))
            qk.latent_cache_append(_c_layout(c.cuda(), layout), slots.to(slot_dtype).cuda(), got[2], got[3], bits, 0.9)
            qk.latent_cache_append(c, slots.to(slot_dtype), want[2], want[3], bits, 0.9)
            what = f"{slot_dtype} {layout}"
            assert _same_bits(got[0], want[0]), f"codes or guard bytes differ ({what})"
            assert _same_bits(got[1], want[1]), f"scales or guard scales differ ({what})"
    scale = want[3].view(-1)
    assert bool(torch.isnan(scale[slots[3]])) and bool(torch.isinf(scale[slots[5]]))
    assert float(scale[slots[1]]) == 0.0


@CUDA
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("r", [512, 1536])
def test_cuda_append_prefill_batch_bit_exact(bits, r):
    """A prefill-sized batch (thousands of rows, many blocks of each kernel)."""
    require_kernel("latent_cache_append", "cuda")
    require_kernel("latent_cache_append", "cpu")
    g = torch.Generator().manual_seed(r + bits)
    T, num_blocks, block_size = 4096, 40, 128
    c = (torch.randn(T, r, generator=g) * 3).to(torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].to(torch.int32)
    got = _empty_cache(num_blocks, block_size, r, bits, "cuda")
    want = _empty_cache(num_blocks, block_size, r, bits, "cpu")
    qk.latent_cache_append(c.cuda(), slots.cuda(), *got, bits)
    qk.latent_cache_append(c, slots, *want, bits)
    assert _same_bits(got[0], want[0]) and _same_bits(got[1], want[1])


@CUDA
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_cuda_bad_slot_raises_before_any_write(slot_dtype):
    """The valid rows before the bad one must not land either."""
    require_kernel("latent_cache_append", "cuda")
    cache, scale = _empty_cache(2, 16, 64, 8, "cuda")
    before = cache.clone(), scale.clone()
    c = torch.randn(4, 64, device="cuda")
    slots = torch.tensor([0, 5, 32, 1], dtype=slot_dtype, device="cuda")
    with pytest.raises(ValueError, match=r"`slot_mapping`\[2\] = 32 is past the end of the cache "
                                         r"\(2 blocks of 16 = 32 slots\)"):
        qk.latent_cache_append(c, slots, cache, scale, 8)
    assert torch.equal(cache, before[0]) and torch.equal(scale, before[1])


# With check_indices=False (the argument an engine passes) or
# QSVD_SKIP_INDEX_CHECKS=1 (read once per process, hence the subprocess)
# the CUDA launchers skip the host validation; the kernels must still keep
# every access in bounds: bad slots are skipped, bad blocks read as zeros,
# lengths are clamped to what block_table and the RoPE table address.
_UNCHECKED_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import code_format
from helpers import assert_within, latent_reconstruct_error_bound, make_paged_cache, make_weights

g = torch.Generator().manual_seed(0)
KW = {"check_indices": False} if sys.argv[2] == "argument" else {}

# latent_cache_append: slots past the end are skipped, nothing outside the cache changes.
for bits, slot_dtype, bad in ((8, torch.int64, [32, 33, 10**6, 2**40, -(2**40)]),
                              (4, torch.int32, [32, 2**31 - 1, -(2**31)])):
    nb, bs, r = 2, 16, 64
    fmt = code_format(bits)
    last = fmt.row_bytes(r)
    buf = torch.randint(0, 256, ((nb + 2) * bs * last,), dtype=torch.uint8, generator=g).view(fmt.dtype)
    sbuf = torch.full(((nb + 2) * bs,), -123.0)
    good = [0, 31, 7]
    slots = torch.tensor(good + bad, dtype=slot_dtype)
    c = torch.randn(len(slots), r, generator=g)
    gbuf, gsbuf = buf.cuda(), sbuf.cuda()
    cache = gbuf[bs * last : (nb + 1) * bs * last].view(nb, bs, last)
    scale = gsbuf[bs : (nb + 1) * bs].view(nb, bs)
    qk.latent_cache_append(c.cuda(), slots.cuda(), cache, scale, bits, **KW)
    torch.cuda.synchronize()
    want = buf[bs * last : (nb + 1) * bs * last].view(nb, bs, last)
    want_scale = sbuf[bs : (nb + 1) * bs].view(nb, bs)
    R.latent_cache_append_ref(c[: len(good)], slots[: len(good)], want, want_scale, bits)
    assert torch.equal(gbuf.cpu(), buf), "append: codes outside the written slots changed"
    assert torch.equal(gsbuf.cpu(), sbuf), "append: scales outside the written slots changed"

# latent_reconstruct_kv: bad block ids give zero rows, bad lengths are clamped.
bs, r, d, H_kv = 16, 64, 64, 2
pc = make_paged_cache([40, 20, 3, 5], r, 8, bs, generator=g)
w = make_weights(H_kv, r, d, torch.float16, generator=g)
cos, sin = R.rope_tables(200, d)
clean = [pc.cache, pc.cache_scale, pc.block_table.clone(), pc.seq_lens.clone(), *w, 8, cos, sin]
capacity = pc.block_table.shape[1] * bs
table, lens = pc.block_table.clone(), pc.seq_lens.clone()
table[0, 1] = pc.cache.shape[0] + 7   # tokens 16..31 of sequence 0
table[1, 0] = -5                      # tokens 0..15 of sequence 1
lens[2] = capacity + 100              # clamped to capacity
lens[3] = -4                          # clamped to 0
args = [pc.cache, pc.cache_scale, table, lens, *w, 8, cos, sin]
k, v = qk.latent_reconstruct_kv(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args], **KW)
torch.cuda.synchronize()
assert k.shape == (40 + 20 + capacity, H_kv, d), k.shape
k, v = k.cpu(), v.cpu()
for rows in (slice(16, 32), slice(40, 56)):
    assert bool((k[rows] == 0).all()) and bool((v[rows] == 0).all()), "a bad block must read as zeros"
tk, tv = R.latent_reconstruct_kv_ref(*clean, out_dtype=torch.float64)
bk, bv = latent_reconstruct_error_bound(*clean, tensor_cores=True)
for rows in (slice(0, 16), slice(32, 40), slice(56, 60)):
    assert_within(k[rows], tk[rows], bk[rows], torch.float16, "k")
    assert_within(v[rows], tv[rows], bv[rows], torch.float16, "v")
print("unchecked ok")
"""


@CUDA
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_cuda_unchecked_bad_indices_stay_in_bounds(how):
    require_kernel("latent_cache_append", "cuda")
    require_kernel("latent_reconstruct_kv", "cuda")
    env = dict(os.environ, QSVD_SKIP_INDEX_CHECKS="1") if how == "environment" else dict(os.environ)
    if how == "argument":
        env.pop("QSVD_SKIP_INDEX_CHECKS", None)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _UNCHECKED_SCRIPT, here, how], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "unchecked ok" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------
# Packed rows (cache_scale None): one uint8 tensor [num_blocks, block_size,
# row_bytes + 4], each row its codes then its fp32 scale. Bit-exact with the
# separate layout and the reference, on every device.
# ---------------------------------------------------------------------------

def _packed_in_guarded_buffer(num_blocks, block_size, r, bits, device, generator):
    """A packed cache [num_blocks, block_size, row_bytes + 4] (contiguous) in
    the middle of a buffer with one guard block on each side, every byte
    random: any stray write, or any write of a skipped row, shows.
    Returns (buf, cache)."""
    width = packed_row_bytes(bits, r)
    buf = torch.randint(0, 256, (num_blocks + 2, block_size, width), dtype=torch.uint8, generator=generator)
    buf = buf.to(device)
    cache = buf[1:-1]
    assert cache.is_contiguous()
    return buf, cache


PACKED_RANKS = [(8, 4), (8, 96), (8, 1000), (8, 1536), (4, 8), (4, 96), (4, 520), (4, 1024)]


@pytest.mark.parametrize("bits,r", PACKED_RANKS, ids=[f"b{b}-r{r}" for b, r in PACKED_RANKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_packed_append_bit_exact_with_separate_and_reference(device, bits, r, dtype, block_size, isa):
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(r * 5 + bits + block_size)
    T = 11
    num_blocks = max(4, 2 * T // block_size)
    c = _special_rows(T, r, dtype, g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[4], slots[7] = -1, -9  # padding: skipped
    buf, cache = _packed_in_guarded_buffer(num_blocks, block_size, r, bits, device, g)
    want_buf, orig = buf.cpu().clone(), buf.cpu().clone()
    sep_cache, sep_scale = _empty_cache(num_blocks, block_size, r, bits, device)
    for slot_dtype in (torch.int64, torch.int32):
        qk.latent_cache_append(c.to(device), slots.to(slot_dtype).to(device), cache, None, bits, 0.9)
        qk.latent_cache_append(c.to(device), slots.to(slot_dtype).to(device), sep_cache, sep_scale, bits, 0.9)
    # The reference on the packed layout itself: every byte of the buffer
    # (guard blocks, unwritten rows, padding rows) must match.
    R.latent_cache_append_ref(c, slots, want_buf[1:-1], None, bits, 0.9)
    assert _same_bits(buf, want_buf)
    # The written rows hold exactly the separate layout's codes and scales.
    codes, scale = split_latent_rows(cache.cpu(), bits, r)
    keep = slots[slots >= 0]
    flat_codes, flat_scale = codes.reshape(-1, codes.shape[-1]), scale.reshape(-1)
    assert _same_bits(flat_codes[keep], sep_cache.cpu().view(-1, sep_cache.shape[-1])[keep])
    assert _same_bits(flat_scale[keep], sep_scale.cpu().view(-1)[keep])
    # Everything but the written rows keeps its random bytes (guards included).
    untouched = torch.ones(num_blocks + 2, block_size, dtype=torch.bool)
    untouched[1:-1].view(-1)[keep] = False
    assert torch.equal(buf.cpu()[untouched], orig[untouched])
    assert not torch.equal(buf.cpu()[~untouched], orig[~untouched])
    # pack_latent_rows of the separate layout reproduces the written rows.
    repacked = pack_latent_rows(sep_cache.cpu(), sep_scale.cpu()).view(num_blocks * block_size, -1)
    assert torch.equal(cache.cpu().view(num_blocks * block_size, -1)[keep], repacked[keep])


def test_packed_out_of_range_slot_raises_before_any_write(device):
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(3)
    for bits in (8, 4):
        buf, cache = _packed_in_guarded_buffer(2, 16, 64, bits, device, g)
        before = buf.clone()
        c = torch.randn(3, 64, device=device)
        with pytest.raises(ValueError, match=r"`slot_mapping`\[2\] = 32 is past the end of the cache"):
            qk.latent_cache_append(c, torch.tensor([0, 1, 32], device=device), cache, None, bits)
        assert torch.equal(buf, before)


def test_packed_roundtrip_and_helpers(device):
    """split_latent_rows gives views (writes land in the packed tensor) and
    pack_latent_rows inverts it; the appended rows dequantize within half a step."""
    require_kernel("latent_cache_append", device)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(32, 256, generator=g)
    for bits in (8, 4):
        assert packed_row_bytes(bits, 256) == (256 if bits == 8 else 128) + 4
        cache = torch.zeros(2, 16, packed_row_bytes(bits, 256), dtype=torch.uint8, device=device)
        qk.latent_cache_append(c.to(device), torch.arange(32, device=device), cache, None, bits)
        codes, scale = split_latent_rows(cache, bits, 256)
        assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8) and scale.dtype == torch.float32
        assert codes.data_ptr() == cache.data_ptr() and scale.data_ptr() == cache.data_ptr() + codes.shape[-1]
        assert torch.equal(pack_latent_rows(codes, scale), cache)
        deq = R.dequantize_rows_ref(codes.cpu().reshape(32, -1), scale.cpu().reshape(32), bits)
        assert bool(((deq - c.double()).abs() <= scale.cpu().reshape(32, 1).double() / 2 * (1 + 1e-6)).all())
        scale[0, 0] = 2.5  # a view: the write lands in the packed row's last 4 bytes
        assert torch.equal(cache[0, 0, -4:].cpu(), torch.tensor([2.5]).view(torch.uint8))


PACKED_CUDA_RANKS = [(8, 8), (8, 96), (8, 1000), (8, 1024), (8, 1032), (8, 4096), (4, 8), (4, 136), (4, 1024),
                     (4, 1032), (4, 6144)]


@CUDA
@pytest.mark.parametrize("bits,r", PACKED_CUDA_RANKS, ids=[f"b{b}-r{r}" for b, r in PACKED_CUDA_RANKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_packed_append_bit_exact_with_cpu(bits, r, dtype):
    """Packed rows on the GPU (warp- and block-per-row kernels; vector paths
    with 4-byte code stores at the stride r + 4, scalar paths for strided or
    shifted c): every byte of the buffer, guard blocks included, equals the
    CPU kernel's (NaN payloads aside)."""
    require_kernel("latent_cache_append", "cuda")
    require_kernel("latent_cache_append", "cpu")
    g = torch.Generator().manual_seed(r * 3 + bits + 1)
    T, num_blocks, block_size = 23, 4, 16
    c = _special_rows(T, r, dtype, g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[2], slots[10], slots[11] = -1, -1, -7
    for slot_dtype in (torch.int64, torch.int32):
        for layout in ("contiguous", "strided_rows", "shifted"):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            got = _packed_in_guarded_buffer(num_blocks, block_size, r, bits, "cuda", torch.Generator().manual_seed(seed))
            want = _packed_in_guarded_buffer(num_blocks, block_size, r, bits, "cpu", torch.Generator().manual_seed(seed))
            qk.latent_cache_append(_c_layout(c.cuda(), layout), slots.to(slot_dtype).cuda(), got[1], None, bits, 0.9)
            qk.latent_cache_append(c, slots.to(slot_dtype), want[1], None, bits, 0.9)
            got_codes, got_scale = split_latent_rows(got[0].cpu(), bits, r)
            want_codes, want_scale = split_latent_rows(want[0], bits, r)
            what = f"{slot_dtype} {layout}"
            assert _same_bits(got_codes, want_codes), f"codes or guard bytes differ ({what})"
            assert _same_bits(got_scale, want_scale), f"scales or guard scales differ ({what})"
