"""Every documented check raises a clear error that names the argument.

Each case starts from valid arguments, breaks one thing, and expects the op
to raise RuntimeError (tensor metadata) or ValueError (values) whose message
names the offending argument in backticks, on every device, and to leave
its mutable arguments untouched.
"""

from __future__ import annotations

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.formats import pack_latent_rows

from conftest import DEVICES
from helpers import make_paged_cache, make_weights


def valid_args(op, device):
    g = torch.Generator().manual_seed(0)
    if op == "hadamard_transform":
        return {"x": torch.randn(4, 64, generator=g), "signs": torch.ones(64)}
    if op == "hadamard_quant":
        return {"x": torch.randn(4, 64, generator=g), "bits": 4, "clip_ratio": 0.9, "signs": torch.ones(64)}
    if op == "quant_gemm":
        return {
            "a": torch.randint(-127, 128, (3, 32), dtype=torch.int8, generator=g),
            "a_scale": torch.rand(3, generator=g),
            "b": R.pack_int4(torch.randint(-7, 8, (5, 32), dtype=torch.int8, generator=g)),
            "b_scale": torch.rand(5, generator=g),
            "a_bits": 8,
            "b_bits": 4,
            "out_dtype": torch.float16,
            "bias": torch.zeros(5, dtype=torch.float16),
        }
    if op == "latent_cache_append":
        return {
            "c": torch.randn(3, 32, generator=g),
            "slot_mapping": torch.tensor([0, 5, -1]),
            "cache": torch.zeros(2, 16, 32, dtype=torch.int8),
            "cache_scale": torch.zeros(2, 16),
            "bits": 8,
            "clip_ratio": 1.0,
        }
    pc = make_paged_cache([20, 3], 32, 8, 16, generator=g, poison=False)
    w_uk, w_uk_scale, w_uv, w_uv_scale = make_weights(2, 32, 64, torch.int8, generator=g)
    cos, sin = R.rope_tables(32, 64)
    common = {
        "cache": pc.cache, "cache_scale": pc.cache_scale, "block_table": pc.block_table, "seq_lens": pc.seq_lens,
        "w_uk": w_uk, "w_uk_scale": w_uk_scale, "w_uv": w_uv, "w_uv_scale": w_uv_scale, "bits": 8,
        "rope_cos": cos, "rope_sin": sin,
    }
    if op == "latent_attention":
        return {"q": torch.randn(2, 4, 64, generator=g), **common, "sm_scale": 0.125}
    return {**common, "out_dtype": None}


def call(op, args, device):
    a = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return getattr(qk, op)(**a), a


def _set(key, value):
    def f(a):
        a[key] = value(a) if callable(value) else value
    return f


RE, VE = RuntimeError, ValueError
CASES = [
    # hadamard_transform
    ("hadamard_transform", "x int", _set("x", lambda a: a["x"].to(torch.int32)), RE, "`x` must have dtype"),
    ("hadamard_transform", "x scalar", _set("x", torch.tensor(1.0)), RE, "`x` must have at least one dimension"),
    ("hadamard_transform", "K=44", _set("x", torch.randn(2, 44)), VE, r"`x`.size\(-1\) = 44 is not a supported"),
    ("hadamard_transform", "K=10", _set("x", torch.randn(2, 10)), VE, r"`x`.size\(-1\) = 10 is not a supported"),
    ("hadamard_transform", "K=65536", _set("x", torch.randn(1, 65536)), VE, r"`x`.size\(-1\) = 65536"),
    ("hadamard_transform", "signs size", _set("signs", torch.ones(32)), RE, r"`signs` must have shape \[64\]"),
    ("hadamard_transform", "signs dtype", _set("signs", torch.ones(64, dtype=torch.float16)), RE, "`signs` must have dtype"),
    ("hadamard_transform", "signs 2-D", _set("signs", torch.ones(1, 64)), RE, "`signs` must have shape"),
    # hadamard_quant
    ("hadamard_quant", "bits 3", _set("bits", 3), VE, "`bits` must be 4 or 8"),
    ("hadamard_quant", "clip 0", _set("clip_ratio", 0.0), VE, r"`clip_ratio` must be in \(0, 1\]"),
    ("hadamard_quant", "clip 1.5", _set("clip_ratio", 1.5), VE, "`clip_ratio`"),
    ("hadamard_quant", "clip nan", _set("clip_ratio", float("nan")), VE, "`clip_ratio`"),
    ("hadamard_quant", "K odd int4", lambda a: a.update(x=torch.randn(2, 1), signs=None), VE, "must be even for bits=4"),
    ("hadamard_quant", "x dtype", _set("x", lambda a: a["x"].double()), RE, "`x` must have dtype"),
    # quant_gemm
    ("quant_gemm", "a_bits 2", _set("a_bits", 2), VE, "`a_bits` must be 4 or 8"),
    ("quant_gemm", "b_bits 16", _set("b_bits", 16), VE, "`b_bits` must be 4 or 8"),
    ("quant_gemm", "a uint8 at 8 bits", _set("a", lambda a: a["a"].view(torch.uint8)), RE, "`a` must be int8 for a_bits=8"),
    ("quant_gemm", "b int8 at 4 bits", _set("b", lambda a: a["b"].view(torch.int8)), RE, r"`b` must be uint8 \(packed INT4\)"),
    ("quant_gemm", "a 3-D", _set("a", lambda a: a["a"][None]), RE, "`a` must be 2-D"),
    ("quant_gemm", "b 1-D", _set("b", lambda a: a["b"][0]), RE, "`b` must be 2-D"),
    ("quant_gemm", "K mismatch", _set("a", lambda a: a["a"][:, :30].contiguous()), RE, "`a` and `b` disagree on K"),
    ("quant_gemm", "a_scale shape", _set("a_scale", torch.rand(4)), RE, r"`a_scale` must have shape \[M\] = \[3\]"),
    ("quant_gemm", "a_scale dtype", _set("a_scale", torch.rand(3).half()), RE, "`a_scale` must have dtype"),
    ("quant_gemm", "b_scale shape", _set("b_scale", torch.rand(5, 1)), RE, r"`b_scale` must have shape \[N\] = \[5\]"),
    ("quant_gemm", "out_dtype int", _set("out_dtype", torch.int32), VE, "`out_dtype` must be float16"),
    ("quant_gemm", "bias shape", _set("bias", torch.zeros(4, dtype=torch.float16)), RE, r"`bias` must have shape \[N\]"),
    ("quant_gemm", "bias dtype", _set("bias", torch.zeros(5)), RE, "`bias` must have dtype `out_dtype`"),
    ("quant_gemm", "K too large", _set("a", torch.zeros(1, 131074, dtype=torch.int8)), RE, "disagree on K"),
    # latent_cache_append
    ("latent_cache_append", "c 1-D", _set("c", torch.randn(32)), RE, "`c` must be 2-D"),
    ("latent_cache_append", "c int", _set("c", torch.zeros(3, 32, dtype=torch.int8)), RE, "`c` must have dtype"),
    ("latent_cache_append", "slots float", _set("slot_mapping", torch.zeros(3)), RE, "`slot_mapping` must have dtype"),
    ("latent_cache_append", "slots count", _set("slot_mapping", torch.tensor([0, 1])), RE, "`slot_mapping` must have one slot per row"),
    ("latent_cache_append", "slot past end", _set("slot_mapping", torch.tensor([0, 32, 1])), VE, r"`slot_mapping`\[1\] = 32 is past the end"),
    ("latent_cache_append", "cache dtype", _set("cache", torch.zeros(2, 16, 32, dtype=torch.uint8)), RE, "`cache` must be int8 for bits=8"),
    ("latent_cache_append", "cache 2-D", _set("cache", torch.zeros(32, 32, dtype=torch.int8)), RE, "`cache` must be 3-D"),
    ("latent_cache_append", "cache width", _set("cache", torch.zeros(2, 16, 16, dtype=torch.int8)), RE, r"`cache`.size\(2\) = 16 must be r = 32"),
    ("latent_cache_append", "cache strided", _set("cache", torch.zeros(2, 32, 32, dtype=torch.int8)[:, ::2]), RE, "`cache` is written in place and must be contiguous"),
    ("latent_cache_append", "scale shape", _set("cache_scale", torch.zeros(2, 8)), RE, r"`cache_scale` must have shape \[num_blocks, block_size\]"),
    ("latent_cache_append", "scale strided", _set("cache_scale", torch.zeros(16, 2).t()), RE, "`cache_scale` is written in place"),
    ("latent_cache_append", "scale dtype", _set("cache_scale", torch.zeros(2, 16, dtype=torch.float16)), RE, "`cache_scale` must have dtype"),
    ("latent_cache_append", "bits 4 odd r", lambda a: a.update(c=torch.randn(3, 31), bits=4, cache=torch.zeros(2, 16, 15, dtype=torch.uint8)), VE, "must be even for bits=4"),
    ("latent_cache_append", "bits 5", _set("bits", 5), VE, "`bits` must be 4 or 8"),
    ("latent_cache_append", "clip", _set("clip_ratio", -1.0), VE, "`clip_ratio`"),
]

for op in ("latent_attention", "latent_reconstruct_kv"):
    CASES += [
        (op, "bits 2", _set("bits", 2), VE, "`bits` must be 4 or 8"),
        (op, "w_uk 2-D", _set("w_uk", lambda a: a["w_uk"][0]), RE, "`w_uk` must be 3-D"),
        (op, "w_uk fp32", _set("w_uk", lambda a: a["w_uk"].float()), RE, "`w_uk` must have dtype"),
        (op, "w_uv shape", _set("w_uv", lambda a: a["w_uv"][:, :16]), RE, "`w_uv` must have the shape of `w_uk`"),
        (op, "w_uv dtype", _set("w_uv", lambda a: a["w_uv"].half()), RE, "`w_uv` must have the dtype of `w_uk`"),
        (op, "w_uk_scale missing", _set("w_uk_scale", None), RE, "`w_uk_scale` is required with int8 weights"),
        (op, "w_uv_scale shape", _set("w_uv_scale", lambda a: a["w_uv_scale"][:1]), RE, r"`w_uv_scale` must have shape \[H_kv, d\]"),
        (op, "scale with fp16 w", lambda a: a.update(w_uk=a["w_uk"].half(), w_uv=a["w_uv"].half()), RE, "`w_uk_scale` must be None"),
        (op, "cache dtype", _set("cache", lambda a: a["cache"].view(torch.uint8)), RE, "`cache` must be int8 for bits=8"),
        (op, "cache width", _set("cache", lambda a: a["cache"][..., :16].contiguous()), RE, r"`cache`.size\(2\) = 16 must be r = 32"),
        (op, "cache_scale shape", _set("cache_scale", lambda a: a["cache_scale"][:, :8]), RE, "`cache_scale` must have shape"),
        (op, "block_table int64", _set("block_table", lambda a: a["block_table"].long()), RE, "`block_table` must have dtype"),
        (op, "seq_lens int64", _set("seq_lens", lambda a: a["seq_lens"].long()), RE, "`seq_lens` must have dtype"),
        (op, "seq_lens count", _set("seq_lens", torch.tensor([1], dtype=torch.int32)), RE, "`seq_lens` must have one length per row"),
        (op, "seq_len negative", _set("seq_lens", torch.tensor([-1, 3], dtype=torch.int32)), VE, r"`seq_lens`\[0\] = -1 is negative"),
        (op, "seq_len too long", _set("seq_lens", torch.tensor([20, 33], dtype=torch.int32)), VE, r"`seq_lens`\[1\] = 33 exceeds what `block_table` can address"),
        (op, "block out of range", lambda a: a["block_table"].__setitem__((0, 1), 99), VE, r"`block_table`\[0, 1\] = 99 is outside"),
        (op, "block negative", lambda a: a["block_table"].__setitem__((1, 0), -1), VE, r"`block_table`\[1, 0\] = -1 is outside"),
        # block_size 0 once divided by zero in the shared index check (SIGFPE).
        (op, "block_size 0", lambda a: a.update(cache=a["cache"][:, :0].contiguous(),
                                                cache_scale=a["cache_scale"][:, :0].contiguous()),
         VE, r"`seq_lens`\[0\] = 20 exceeds what `block_table` can address \(2 blocks of 0 = 0 tokens\)"),
        (op, "rope half", _set("rope_sin", None), RE, "`rope_cos` and `rope_sin` must be given together"),
        (op, "rope widths differ", _set("rope_cos", lambda a: a["rope_cos"][:, :32]), RE, r"`rope_cos` \[.*\] and `rope_sin` \[.*\] must have the same shape"),
        (op, "rope width odd", lambda a: a.update(rope_cos=a["rope_cos"][:, :31], rope_sin=a["rope_sin"][:, :31]), RE, r"`rope_cos` must have shape \[max_position, d_rope\] with d_rope even, 2 <= d_rope <= d"),
        (op, "rope width > d", lambda a: a.update(rope_cos=a["rope_cos"].repeat(1, 2), rope_sin=a["rope_sin"].repeat(1, 2)), RE, r"`rope_cos` must have shape \[max_position, d_rope\]"),
        (op, "rope short", lambda a: a.update(rope_cos=a["rope_cos"][:10], rope_sin=a["rope_sin"][:10]), VE, r"exceeds the RoPE table length `rope_cos`.size\(0\) = 10"),
        (op, "rope dtype", _set("rope_sin", lambda a: a["rope_sin"].double()), RE, "`rope_sin` must have dtype"),
    ]


# Packed rows (cache_scale None): each case turns the valid separate cache
# into packed rows and breaks one thing; the message names `cache`.
def _packed(a):
    return pack_latent_rows(a["cache"], a["cache_scale"])


def _to_packed(cache):
    def f(a):
        a["cache"] = cache(a)
        a["cache_scale"] = None
    return f


PACKED_CASES = [
    ("packed int8", lambda a: _packed(a).view(torch.int8), RE, r"`cache` must be uint8 \(packed rows"),
    ("packed scale None with int8 cache", lambda a: a["cache"], RE, r"`cache` must be uint8 \(packed rows"),
    ("packed width", lambda a: _packed(a)[..., :-2].contiguous(), RE, r"`cache`.size\(2\) = 34 must be r \+ 4 = 36"),
    ("packed separate width", lambda a: a["cache"].view(torch.uint8), RE, r"`cache`.size\(2\) = 32 must be r \+ 4 = 36"),
    ("packed strided", lambda a: torch.cat([_packed(a), _packed(a)], dim=1)[:, ::2], RE,
     r"`cache` with packed rows \(`cache_scale` None\) must be contiguous"),
]
CASES += [
    ("latent_cache_append", what, _to_packed(cache), exc, pattern) for what, cache, exc, pattern in PACKED_CASES
]
for op in ("latent_attention", "latent_reconstruct_kv"):
    CASES += [(op, what, _to_packed(cache), exc, pattern) for what, cache, exc, pattern in PACKED_CASES]
    # r = 30: 30 code bytes per row leave the scale unaligned.
    CASES.append((op, "packed misaligned rows", lambda a: a.update(
        w_uk=a["w_uk"][:, :30], w_uv=a["w_uv"][:, :30], cache=torch.zeros(a["cache"].shape[0], 16, 34, dtype=torch.uint8),
        cache_scale=None), RE, r"`cache` with packed rows \(`cache_scale` None\) needs r = 30 code bytes per row to be a multiple of 4"))
CASES += [
    ("latent_cache_append", "packed misaligned rows", lambda a: a.update(
        c=torch.randn(3, 30), cache=torch.zeros(2, 16, 34, dtype=torch.uint8), cache_scale=None), RE,
     r"`cache` with packed rows \(`cache_scale` None\) needs r = 30 code bytes per row to be a multiple of 4"),
    ("latent_cache_append", "packed int4 misaligned rows", lambda a: a.update(
        c=torch.randn(3, 12), bits=4, cache=torch.zeros(2, 16, 10, dtype=torch.uint8), cache_scale=None), RE,
     r"`cache` with packed rows \(`cache_scale` None\) needs r / 2 = 6 code bytes per row"),
    ("latent_cache_append", "packed int4 width", lambda a: a.update(
        c=torch.randn(3, 16), bits=4, cache=torch.zeros(2, 16, 16, dtype=torch.uint8), cache_scale=None), RE,
     r"`cache`.size\(2\) = 16 must be r / 2 \+ 4 = 12"),
    ("latent_cache_append", "packed strided (written in place)", lambda a: a.update(
        cache=torch.zeros(2, 32, 36, dtype=torch.uint8)[:, ::2], cache_scale=None), RE, "`cache`.* must be contiguous"),
]
CASES += [
    ("latent_attention", "q 2-D", _set("q", lambda a: a["q"][0]), RE, "`q` must be 3-D"),
    ("latent_attention", "q int", _set("q", lambda a: a["q"].to(torch.int8)), RE, "`q` must have dtype"),
    ("latent_attention", "q batch", _set("q", lambda a: a["q"][:1]), RE, r"`q`.size\(0\) = 1 must equal the batch size"),
    ("latent_attention", "q head dim", _set("q", lambda a: a["q"][..., :32]), RE, r"`q`.size\(2\) = 32 must equal the head dim"),
    ("latent_attention", "GQA ratio", _set("q", lambda a: a["q"][:, :3]), RE, r"`q`.size\(1\) = H = 3 must be a positive multiple of H_kv"),
    ("latent_attention", "sm_scale inf", _set("sm_scale", float("inf")), VE, "`sm_scale` must be finite"),
    ("latent_reconstruct_kv", "out_dtype int", _set("out_dtype", torch.int8), VE, "`out_dtype` must be float16"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,what,mutate,exc,pattern", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_raises_naming_the_argument(device, op, what, mutate, exc, pattern):
    if device == "cuda" and not qk.has_kernel(op, "cuda"):
        pytest.skip(f"qsvd.{op} has no cuda kernel in this build")
    args = valid_args(op, device)
    call(op, dict(args), device)  # the valid arguments work
    mutate(args)
    dev_args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    mutable = {k: v.clone() for k, v in dev_args.items() if k in ("cache", "cache_scale") and v is not None}
    with pytest.raises(exc, match=f"qsvd.{op}: .*{pattern}"):
        getattr(qk, op)(**dev_args)
    for k, before in mutable.items():
        assert torch.equal(dev_args[k], before), f"{k} was written before the error"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_are_refused():
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="`signs` is on cpu but `x` is on cuda"):
        qk.hadamard_transform(x, torch.ones(64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["latent_cache_append", "latent_attention", "latent_reconstruct_kv"])
def test_packed_cache_at_an_unaligned_address_is_refused(device, op):
    """Packed rows read and write their fp32 scales in place: a cache that
    starts off a 4-byte boundary (a view into a byte buffer) is refused
    (on the device itself: moving it there would realign it)."""
    if device == "cuda" and not qk.has_kernel(op, "cuda"):
        pytest.skip(f"qsvd.{op} has no cuda kernel in this build")
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in valid_args(op, device).items()}
    packed = _packed(args)
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=device)
    cache = buf[1:].view(packed.shape)
    cache.copy_(packed)
    args.update(cache=cache, cache_scale=None)
    before = buf.clone()
    with pytest.raises(RuntimeError, match=f"qsvd.{op}: `cache` with packed rows .* 4-byte aligned address"):
        getattr(qk, op)(**args)
    assert torch.equal(buf, before)
    # The same rows at an aligned address are accepted.
    args["cache"] = packed
    getattr(qk, op)(**args)
