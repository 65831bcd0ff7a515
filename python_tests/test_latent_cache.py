"""latent_cache_append: bit-exact per-token quantization into the paged cache."""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R

from conftest import require_kernel


def _empty_cache(num_blocks, block_size, r, bits, device):
    last = r // 2 if bits == 4 else r
    dtype = torch.uint8 if bits == 4 else torch.int8
    # Sentinel contents: every slot not written must keep them.
    cache = torch.full((num_blocks, block_size, last), 0x5A, dtype=dtype, device=device)
    scale = torch.full((num_blocks, block_size), -123.0, device=device)
    return cache, scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 64, 256])
@pytest.mark.parametrize("r", [2, 96, 512, 1000])
def test_append_matches_reference(device, bits, dtype, block_size, r):
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
