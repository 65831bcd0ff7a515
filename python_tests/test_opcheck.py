"""torch.library.opcheck on every op: schema (incl. mutation annotations),
fake kernels, autograd registration and AOT dispatch."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import pack_latent_rows, packed_row_bytes

from conftest import require_kernel
from helpers import make_paged_cache, make_weights


def _samples(device):
    g = torch.Generator().manual_seed(0)
    s = {}
    x = torch.randn(3, 5, 96, generator=g).to(torch.bfloat16).to(device)
    signs = (torch.randint(0, 2, (96,), generator=g).float() * 2 - 1).to(device)
    s["hadamard_transform"] = [(x, None), (x.float(), signs)]
    s["hadamard_quant"] = [(x, 8, 1.0, None), (x.half(), 4, 0.9, signs)]
    a8 = torch.randint(-127, 128, (5, 64), dtype=torch.int8, generator=g)
    b4 = R.pack_int4(torch.randint(-7, 8, (7, 64), dtype=torch.int8, generator=g))
    sa, sb = torch.rand(5, generator=g), torch.rand(7, generator=g)
    s["quant_gemm"] = [
        tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in (a8, sa, b4, sb, 8, 4, torch.float16, None)),
        tuple(t.to(device) if isinstance(t, torch.Tensor) else t
              for t in (a8, sa, torch.randint(-127, 128, (7, 64), dtype=torch.int8, generator=g), sb, 8, 8,
                        torch.float32, torch.randn(7, generator=g))),
        # K = 102 and N = 19: the CUDA launcher's K-padding and padded-output paths.
        tuple(t.to(device) if isinstance(t, torch.Tensor) else t
              for t in (R.pack_int4(torch.randint(-7, 8, (33, 102), dtype=torch.int8, generator=g)),
                        torch.rand(33, generator=g), torch.randint(-127, 128, (19, 102), dtype=torch.int8, generator=g),
                        torch.rand(19, generator=g), 4, 8, torch.bfloat16,
                        torch.randn(19, generator=g).to(torch.bfloat16))),
    ]
    cache = torch.zeros(4, 16, 32, dtype=torch.int8, device=device)
    scale = torch.zeros(4, 16, device=device)
    cache4 = torch.zeros(4, 16, 16, dtype=torch.uint8, device=device)
    c = torch.randn(5, 32, generator=g).to(device)
    s["latent_cache_append"] = [
        (c, torch.tensor([0, 3, -1, 17, 63], device=device), cache, scale, 8, 1.0),
        (c.half(), torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32, device=device), cache4, scale.clone(), 4, 0.9),
        # Packed rows: cache_scale None, one mutable uint8 tensor.
        (c, torch.tensor([0, 3, -1, 17, 63], device=device),
         torch.zeros(4, 16, packed_row_bytes(8, 32), dtype=torch.uint8, device=device), None, 8, 1.0),
        (c.bfloat16(), torch.tensor([5, 4, 3, 2, 1], dtype=torch.int32, device=device),
         torch.zeros(4, 16, packed_row_bytes(4, 32), dtype=torch.uint8, device=device), None, 4, 0.9),
    ]
    attn, recon = [], []
    for bits, wdtype, rope in ((8, torch.float16, False), (4, torch.int8, True), (8, torch.bfloat16, True)):
        pc = make_paged_cache([20, 0, 5], 32, bits, 16, generator=g, poison=False)
        w = make_weights(2, 32, 64, wdtype, generator=g)
        cos, sin = R.rope_tables(32, 64) if rope else (None, None)
        common = [pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w]
        common = [t.to(device) if isinstance(t, torch.Tensor) else t for t in common]
        rope_args = tuple(t.to(device) if t is not None else None for t in (cos, sin))
        q = torch.randn(3, 4, 64, generator=g).to(device)
        attn.append((q, *common, bits, 0.125, *rope_args))
        recon.append((*common, bits, *rope_args, None))
        # The same cache as packed rows (cache_scale None).
        packed = [pack_latent_rows(pc.cache, pc.cache_scale).to(device), None, *common[2:]]
        attn.append((q, *packed, bits, 0.125, *rope_args))
        recon.append((*packed, bits, *rope_args, torch.float32))
    # With a plan (made for the call; an int64 CPU tensor whatever the device).
    plans = [torch.ops.qsvd.latent_attention_plan(*a[:10], *a[11:13]) for a in attn]
    attn += [(*a, True, p) for a, p in zip(attn, plans)]
    # Cached rotary keys (partial RoPE): append them, then read them (with
    # and without a plan made with them), and reconstruct K and V from them.
    pc = make_paged_cache([20, 0, 5], 32, 8, 16, generator=g, poison=False)
    w = make_weights(2, 32, 64, torch.int8, generator=g)
    cos, sin = R.rope_tables(32, 64, pairs=range(8))
    keys = torch.zeros(pc.cache.shape[0], 16, 2, 16, dtype=torch.float16)
    slots = torch.tensor([int(pc.block_table[0, 0]) * 16 + t for t in range(5)] + [-1])
    cached = [t.to(device) for t in (pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w)]
    cos, sin, keys, slots = cos.to(device), sin.to(device), keys.to(device), slots.to(device)
    s["latent_rope_keys_append"] = [(cached[0], cached[1], slots, torch.arange(6, device=device), cached[4], cached[5],
                                     8, cos, sin, keys)]
    q = torch.randn(3, 4, 64, generator=g).to(device)
    keys_plan = torch.ops.qsvd.latent_attention_plan(q, *cached, 8, cos, sin, keys)
    attn += [(q, *cached, 8, 0.125, cos, sin, True, None, keys), (q, *cached, 8, 0.125, cos, sin, True, keys_plan, keys)]
    recon.append((*cached, 8, cos, sin, torch.float32, True, keys))
    s["latent_attention"] = attn
    s["latent_attention_plan"] = [(*a[:10], *a[11:13]) for a in attn[: len(plans)]] + [(q, *cached, 8, cos, sin, keys)]
    s["latent_reconstruct_kv"] = recon
    return s


@pytest.mark.parametrize("op", qk.OPS)
def test_opcheck(device, op):
    require_kernel(op, device)
    for args in _samples(device)[op]:
        opcheck(getattr(torch.ops.qsvd, op).default, args)
