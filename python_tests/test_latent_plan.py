"""latent_attention's plan object (torch.ops.qsvd.latent_attention_plan):
made once per batch shape, it runs exactly what a call without it runs,
reads no knob when it runs, is refused (ValueError naming ``plan``) by a call
it was not made for, and cannot be edited into a kernel. Runs on cpu, and on
cuda when present. The CUDA plans' replay is checked for 229k shapes on any
machine by ctest (cpp_tests/test_latent_plan.cpp)."""

from __future__ import annotations

import math

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import ops
from qsvd_kernels import reference as R

from conftest import require_kernel
from helpers import make_paged_cache, make_weights

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _call(device, seq_lens, bits=8, wdtype=torch.float16, rope=True, H=8, H_kv=2, r=48, d=64, block_size=16,
          packed=False, seed=0, rope_len=None):
    """The arguments of a latent_attention call (without sm_scale and what follows)."""
    g = torch.Generator().manual_seed(seed)
    pc = make_paged_cache(seq_lens, r, bits, block_size, generator=g, poison=False)
    w = make_weights(H_kv, r, d, wdtype, generator=g)
    q = torch.randn(len(seq_lens), H, d, generator=g)
    cos, sin = R.rope_tables(rope_len or max(max(seq_lens), 1) + 5, d) if rope else (None, None)
    cache, scale = pc.cache, pc.cache_scale
    if packed:
        from qsvd_kernels.formats import pack_latent_rows

        cache, scale = pack_latent_rows(cache, scale), None
    args = [q, cache, scale, pc.block_table, pc.seq_lens, *w, bits]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    tables = tuple(t.to(device) if t is not None else None for t in (cos, sin))
    return args, tables


def _run(args, tables, plan=None, d=64):
    return ops.latent_attention(*args, 1.0 / math.sqrt(d), *tables, True, plan)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,wdtype,rope,packed", [(8, torch.float16, True, False), (4, torch.int8, True, True),
                                                     (8, torch.bfloat16, False, False), (4, torch.float16, False, True),
                                                     (8, torch.int8, False, False)])
def test_a_plan_runs_exactly_what_the_call_plans_itself(device, bits, wdtype, rope, packed):
    require_kernel("latent_attention", device)
    args, tables = _call(device, [37, 0, 300, 5], bits, wdtype, rope, packed=packed)
    plan = ops.latent_attention_plan(*args, *tables)
    assert plan.device.type == "cpu" and plan.dtype == torch.int64
    want = _run(args, tables)
    got = _run(args, tables, plan)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # The same plan serves another layer of the same shape, and other lengths.
    args2, _ = _call(device, [3, 300, 1, 64], bits, wdtype, rope, packed=packed, seed=1)
    args2[3] = args[3]  # the block table of the plan (its token capacity); other codes, weights and lengths
    args2[1], args2[2] = args[1], args[2]
    want2 = _run(args2, tables)
    got2 = _run(args2, tables, plan)
    assert torch.equal(got2[0], want2[0]) and torch.equal(got2[1], want2[1])


@pytest.mark.parametrize("device", DEVICES)
def test_a_call_the_plan_was_not_made_for_is_refused(device):
    require_kernel("latent_attention", device)
    args, tables = _call(device, [37, 0, 20])
    plan = ops.latent_attention_plan(*args, *tables)

    def refused(args, tables, match):
        with pytest.raises(ValueError, match=match):
            _run(args, tables, plan)

    refused([args[0][:2], *args[1:3], args[3][:2], args[4][:2], *args[5:]], tables, "plan was made for B = 3")
    other, t = _call(device, [37, 0, 20], r=64)
    refused(other, t, "plan was made for r = 48")
    other, t = _call(device, [37, 0, 20], rope=False)
    refused(other, t, "plan was made for d_rope = 64, but the call has d_rope = 0")
    if device == "cpu":  # partial RoPE (CPU only): another d_rope, another plan
        refused(args, tuple(x[:, :32] for x in tables), "plan was made for d_rope = 64, but the call has d_rope = 32")
    other, t = _call(device, [37, 0, 20], wdtype=torch.bfloat16)
    refused(other, t, "plan was made for weight_dtype")
    other, t = _call(device, [37, 0, 20], bits=4)
    refused(other, t, "plan was made for bits = 8")
    other, t = _call(device, [37, 0, 20], H=4)
    refused(other, t, "plan was made for H = 8")
    # A wider block table than planned for: its splits would not cover it.
    wide = list(args)
    wide[3] = torch.cat([args[3], args[3]], dim=1)
    longer = _call(device, [37, 0, 20], rope_len=400)[1]
    refused(wide, longer, r"plan was made for a token capacity of 42 \(.*\), but the call's is 96")
    # A narrower one is served (a plan for the step's widest table serves all).
    narrow, t = _call(device, [10, 0, 3], rope_len=42)  # capacity 16 (one block), the plan's 48
    p2 = ops.latent_attention_plan(*args, *longer)
    got = ops.latent_attention(*narrow, 0.125, *t, True, p2)
    want = ops.latent_attention(*narrow, 0.125, *t)
    assert torch.equal(got[0], want[0])
    if device == "cuda":  # a CPU plan on a CUDA call
        cpu_args, cpu_tables = _call("cpu", [37, 0, 20])
        with pytest.raises(ValueError, match="plan was made for CPU device 0, but the call runs on CUDA"):
            _run(args, tables, ops.latent_attention_plan(*cpu_args, *cpu_tables))


@pytest.mark.parametrize("device", DEVICES)
def test_a_tensor_that_is_not_a_plan_is_refused(device):
    require_kernel("latent_attention", device)
    args, tables = _call(device, [37, 0, 20])
    plan = ops.latent_attention_plan(*args, *tables)
    for bad, match in ((plan.int(), "plan must be the int64 CPU tensor"), (plan[:-1], "plan must be the int64"),
                       (torch.zeros_like(plan), "not a latent_attention_plan of this version")):
        with pytest.raises(ValueError, match=match):
            _run(args, tables, bad)
    fields = qk._C.latent_attention_plan_fields()
    edited = plan.clone()
    if device == "cpu":
        edited[1 + fields.index("cpu_path")] = 2  # an absorbed path for a RoPE call
        match = "plan's CPU path"
    else:
        edited[1 + fields.index("split_tokens")] += 32
        match = "plan cannot run"
    with pytest.raises(ValueError, match=match):
        _run(args, tables, edited)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="int64 CPU tensor"):
            _run(args, tables, plan.cuda())


def test_the_cpu_plan_reads_the_knob_when_made_not_when_run(monkeypatch):
    """QSVD_CPU_LATENT_GEMM is read by latent_attention_plan; a call given the
    plan reads no knob (a bad value then set raises only without a plan)."""
    require_kernel("latent_attention", "cpu")
    args, tables = _call("cpu", [300, 7], rope=False)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "fp32")
    plan = ops.latent_attention_plan(*args, *tables)
    info = ops.describe_latent_attention_plan(plan)
    assert info["cpu_path"] == "absorbed_fp32" and info["device"] == "cpu" and info["d_rope"] == 0
    assert (info["B"], info["H"], info["H_kv"], info["r"], info["d"], info["bits"]) == (2, 8, 2, 48, 64, 8)
    want = _run(args, tables)
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "bogus")
    got = _run(args, tables, plan)
    assert torch.equal(got[0], want[0])
    with pytest.raises(RuntimeError, match="QSVD_CPU_LATENT_GEMM must be"):
        _run(args, tables)
    with pytest.raises(RuntimeError, match="QSVD_CPU_LATENT_GEMM must be"):
        ops.latent_attention_plan(*args, *tables)
    paths = qk._C.cpu_paths()
    if paths["latent_digit_scores"] != "none":  # the split path exists here: a plan keeps it
        monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "split")
        split_plan = ops.latent_attention_plan(*args, *tables)
        split = _run(args, tables)
        monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", "fp32")
        assert torch.equal(_run(args, tables, split_plan)[0], split[0])
        assert ops.describe_latent_attention_plan(split_plan)["cpu_path"] == "absorbed_split"
    assert ops.describe_latent_attention_plan(ops.latent_attention_plan(*_call("cpu", [3])[0], *_call("cpu", [3])[1])
                                              )["cpu_path"] == "rope"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_cuda_plan_is_explains_plan_and_ignores_later_knobs(monkeypatch):
    """The plan op makes the launcher's plan (explain() reports the same), and
    a knob set after planning does not change what the plan runs."""
    require_kernel("latent_attention", "cuda")
    from qsvd_kernels import tuning

    args, tables = _call("cuda", [300, 1000, 7], rope=True, r=256, d=128, H=32, H_kv=8, rope_len=1100)
    plan = ops.latent_attention_plan(*args, *tables)
    info = ops.describe_latent_attention_plan(plan)
    cap = info["token_capacity"]
    ex = tuning.explain("latent_attention", B=3, H=32, H_kv=8, r=256, d=128, bits=8, rope=True, weight_dtype="f16",
                        token_capacity=cap)
    for key in ("split_kernel", "splits", "split_tokens", "tile_tokens", "heads_per_cta", "source"):
        assert info[key] == ex[key], key
    want = ops.latent_attention(*args, 0.1, *tables)
    monkeypatch.setenv("QSVD_LATENT_SPLITS", "1" if info["splits"] > 1 else "3")
    got = ops.latent_attention(*args, 0.1, *tables, True, plan)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_a_plan_names_whether_the_rotary_keys_are_cached(device):
    """Calls that read K's rotary part from rope_keys run another CUDA split
    kernel, so the plan's signature carries it: a plan made without the keys
    is refused by a call with them, and the other way round; a plan made
    with them runs exactly what the call plans itself."""
    require_kernel("latent_rope_keys_append", device)
    g = torch.Generator().manual_seed(3)
    seq_lens, H, H_kv, r, d, n = [37, 0, 70], 8, 2, 48, 64, 16
    pc = make_paged_cache(seq_lens, r, 8, 16, generator=g, poison=False)
    w = make_weights(H_kv, r, d, torch.float16, generator=g)
    cos, sin = R.rope_tables(80, d, pairs=range(n // 2))
    keys = torch.zeros(pc.cache.shape[0], 16, H_kv, n, dtype=torch.float16)
    args = [torch.randn(3, H, d, generator=g), pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    cos, sin, keys = cos.to(device), sin.to(device), keys.to(device)
    slots = torch.arange(pc.cache.shape[0] * 16, device=device)
    ops.latent_rope_keys_append(args[1], args[2], slots, slots % 80, args[5], args[6], 8, cos, sin, keys)
    with_keys = ops.latent_attention_plan(*args, cos, sin, keys)
    assert ops.describe_latent_attention_plan(with_keys)["rope_keys"] == 1
    if device == "cuda":
        assert ops.describe_latent_attention_plan(with_keys)["split_kernel"] == "simt"
    want = ops.latent_attention(*args, 0.125, cos, sin, True, None, keys)
    got = ops.latent_attention(*args, 0.125, cos, sin, True, with_keys, keys)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    full_cos, full_sin = R.rope_tables(80, d)
    plain = ops.latent_attention_plan(*args, full_cos.to(device), full_sin.to(device))
    with pytest.raises(ValueError, match="plan was made for d_rope = 64, but the call has d_rope = 16"):
        ops.latent_attention(*args, 0.125, cos, sin, True, plain, keys)
    if device == "cpu":  # CUDA refuses the rebuilt partial form before reading a plan
        rebuilt = ops.latent_attention_plan(*args, cos, sin)
        with pytest.raises(ValueError, match="plan was made for rope_keys = 0, but the call has rope_keys = 1"):
            ops.latent_attention(*args, 0.125, cos, sin, True, rebuilt, keys)
        with pytest.raises(ValueError, match="plan was made for rope_keys = 1, but the call has rope_keys = 0"):
            ops.latent_attention(*args, 0.125, cos, sin, True, with_keys)


def test_the_cuda_plan_with_cached_rotary_keys():
    """The CUDA plan of calls that read rope_keys (any machine: the
    planner is plain C++): the CUDA-core split kernel (the tensor-core ones
    do not read the keys; forcing them says so), with shared memory for
    q's rotary dims beside q_lat."""
    shape = dict(B=4, H=32, H_kv=8, r=960, d=128, bits=8, weight="i8", token_capacity=4096, sm_count=132,
                 smem_limit=227 * 1024)
    auto = qk._C.plan_latent_attention_shape(**shape, rope=True, rope_key_dims=32)
    absorbed = qk._C.plan_latent_attention_shape(**shape, rope=False, kernel="simt")
    assert auto["ok"] and auto["split_kernel"] == "simt"
    assert auto["split_smem"] == absorbed["split_smem"] + 4 * auto["heads_per_cta"] * 32
    forced = qk._C.plan_latent_attention_shape(**shape, rope=True, rope_key_dims=32, kernel="tc")
    assert not forced["ok"] and "do not read cached rotary keys" in forced["reason"]
    with pytest.raises(RuntimeError, match="rope_key_dims must be in"):
        qk._C.plan_latent_attention_shape(**shape, rope=False, rope_key_dims=32)
