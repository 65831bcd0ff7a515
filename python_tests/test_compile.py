"""torch.compile(fullgraph=True) traces and runs every op, and agrees with eager."""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import pack_latent_rows

from conftest import require_kernel
from helpers import make_paged_cache, make_weights


def decode_step(x, signs, w_d, w_d_scale, slots, cache, cache_scale, block_table, seq_lens, w_uk, w_uv, q, cos, sin):
    """One compressed-attention decode step, every op in one graph."""
    x_rot = qk.hadamard_transform(x, signs)
    codes, x_scale = qk.hadamard_quant(x_rot, 8, 1.0, None)
    c = qk.quant_gemm(codes, x_scale, w_d, w_d_scale, 8, 8, torch.float32)
    qk.latent_cache_append(c, slots, cache, cache_scale, 8)
    out, lse = qk.latent_attention(q, cache, cache_scale, block_table, seq_lens, w_uk, None, w_uv, None, 8, 0.125,
                                   cos, sin)
    k, v = qk.latent_reconstruct_kv(cache, cache_scale, block_table, seq_lens, w_uk, None, w_uv, None, 8, cos, sin,
                                    torch.float32)
    return out, lse, k, v


@pytest.mark.parametrize("layout", ["separate", "packed"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend, layout):
    for op in qk.OPS:
        require_kernel(op, device)
    if backend == "inductor" and device == "cpu":
        pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(0)
    E, r, d = 128, 32, 64
    x = torch.randn(2, E, generator=g)
    signs = torch.randint(0, 2, (E,), generator=g).float() * 2 - 1
    w_d = torch.randint(-127, 128, (r, E), dtype=torch.int8, generator=g)
    w_d_scale = torch.rand(r, generator=g) * 0.01
    pc = make_paged_cache([9, 17], r, 8, 16, generator=g, poison=False)
    w = make_weights(2, r, d, torch.float16, generator=g)
    slots = torch.stack([pc.block_table[0, 0].long() * 16 + 9, pc.block_table[1, 1].long() * 16 + 1])
    seq_lens = pc.seq_lens + 1
    q = torch.randn(2, 4, d, generator=g)
    cos, sin = R.rope_tables(64, d)
    # Packed rows: one uint8 cache tensor, cache_scale None.
    cache = [pack_latent_rows(pc.cache, pc.cache_scale), None] if layout == "packed" else [pc.cache, pc.cache_scale]
    args = [x, signs, w_d, w_d_scale, slots, *cache, pc.block_table, seq_lens, w[0], w[2], q, cos, sin]
    args = [a.to(device) if a is not None else None for a in args]
    eager_cache = [a.clone() if a is not None else None for a in args]
    compiled = torch.compile(decode_step, fullgraph=True, backend=backend)
    got = compiled(*args)
    want = decode_step(*eager_cache)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(args[5], eager_cache[5])  # same cache writes
    if layout == "separate":
        assert torch.equal(args[6], eager_cache[6])
    else:
        assert args[6] is None
        assert not torch.equal(args[5], pack_latent_rows(pc.cache, pc.cache_scale).to(device))  # the append landed
