"""The engine-neutral attention step (integrations/core.py): one step that
mixes a decode, a prefill, a chunked prefill over a cached prefix and a
padding row gives, row for row, what each sequence gets in a step of its own,
and writes the same cache; padding rows give zeros and are not stored; the
torch simulation (no fused decode) routes decodes through the prefill path
over the same rows. Runs on cpu, and on cuda when present."""

from __future__ import annotations

import pytest
import torch

from qsvd_kernels import has_kernel
from qsvd_kernels import reference as R
from qsvd_kernels.compress import QuantConfig
from qsvd_kernels.compress.layer import CompressedQKV
from qsvd_kernels.compress.svd import JointSVD
from qsvd_kernels.compress.whitening import Whitening
from qsvd_kernels.integrations.core import step_metadata
from qsvd_kernels.integrations.hf.projector import OpsProjector, TorchProjector
from qsvd_kernels.model.dims import LayerDims

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPS = ("hadamard_quant", "quant_gemm", "latent_cache_append", "latent_attention", "latent_reconstruct_kv")
BLOCK = 4


def _layer(quant: str, rank: int = 24, bias: bool = False) -> CompressedQKV:
    """A random layer; ``bias``: q and v biases (no K bias: refused under RoPE)."""
    dims = LayerDims(64, 4, 2, 16)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(dims.hidden, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(dims.out_dim, rank, generator=g, dtype=torch.float64))
    b = None
    if bias:
        b = torch.randn(dims.out_dim, generator=g, dtype=torch.float64)
        b[dims.q_dim : dims.q_dim + dims.num_kv_heads * dims.head_dim] = 0
    svd = JointSVD(dims, Whitening("none"), U, torch.linspace(2, 1, rank, dtype=torch.float64), V.T.contiguous(),
                   None, b)
    return CompressedQKV.build(svd, rank, 0.5, QuantConfig.parse(quant), seed=0)


class _Sequences:
    """Paged storage for 3 sequences (sequence b owns blocks 4b..4b+3)."""

    def __init__(self, projector, device):
        self.p, self.device = projector, device
        self.pool = projector.new_pool(12, BLOCK, device)
        self.block_table = torch.arange(12, dtype=torch.int32, device=device).view(3, 4)
        self.lens = [0, 0, 0]
        d = projector.dims.head_dim
        self.cos, self.sin = R.rope_tables(16, d, device=device)

    def step(self, x: torch.Tensor, rows_of_seq: list[list[int]],
             prefill_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Run one step of x [N, E]; rows not listed are padding."""
        N = x.shape[0]
        slots = torch.full((N,), -1, dtype=torch.long)
        positions = torch.zeros(N, dtype=torch.long)
        new_lens = list(self.lens)
        for b, rows in enumerate(rows_of_seq):
            for i, row in enumerate(rows):
                t = self.lens[b] + i
                slots[row] = int(self.block_table[b, t // BLOCK]) * BLOCK + t % BLOCK
                positions[row] = t
            new_lens[b] += len(rows)
        dev = self.device
        meta = step_metadata(slots.to(dev), positions.to(dev), self.block_table,
                             torch.tensor(new_lens, dtype=torch.int32, device=dev), rows_of_seq, new_lens)
        out = self.p.core.run(self.p.latent(x), self.p.cache_view(self.pool), meta, self.cos, self.sin, 0.25,
                              prefill_dtype=prefill_dtype)
        self.lens = new_lens
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", ["W8A8", "W4A4", "W8A4"])
def test_a_mixed_step_gives_each_sequence_what_its_own_step_gives(device, quant):
    if not all(has_kernel(op, device) for op in OPS):
        pytest.skip(f"the ops have no {device} kernels in this build")
    layer = _layer(quant)
    projector = OpsProjector(layer).to(device)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(3, 64, generator=g).to(device)  # sequence 1's cached prefix
    x = torch.randn(9, 64, generator=g).to(device)
    # The mixed step: row 0 decodes sequence 0 (after 2 cached tokens), rows
    # 1-4 prefill sequence 2 from nothing, row 5 is padding, rows 6-8 are a
    # chunk of sequence 1 after its 3-token prefix.
    mixed = _Sequences(projector, device)
    mixed.step(torch.cat([x[:2], prefix]), [[0, 1], [2, 3, 4], []])
    got = mixed.step(x, [[0], [6, 7, 8], [1, 2, 3, 4]])

    alone = _Sequences(projector, device)
    alone.step(torch.cat([x[:2], prefix]), [[0, 1], [2, 3, 4], []])
    want = torch.zeros_like(got)
    want[0] = alone.step(x[:1], [[0], [], []])[0]
    want[6:9] = alone.step(x[6:9], [[], [0, 1, 2], []])
    want[1:5] = alone.step(x[1:5], [[], [], [0, 1, 2, 3]])

    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.count_nonzero(got[5]) == 0, "a padding row must give zeros"
    for a, b in zip(mixed.pool.tensors, alone.pool.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_torch_simulation_decodes_through_the_prefill_path():
    """No fused decode: a decode row attends over its whole context through
    keys_values + SDPA, the same rows the ops' latent_attention reads."""
    projector = TorchProjector(_layer("W8A8"))
    seqs = _Sequences(projector, "cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 64, generator=g)
    seqs.step(x[:5], [[0, 1, 2], [3, 4], []])
    calls = []
    original = projector.core.keys_values

    def spy(cache, block_table, seq_lens, cos, sin, dtype):
        calls.append(seq_lens.tolist())
        return original(cache, block_table, seq_lens, cos, sin, dtype)

    projector.core.keys_values = spy
    out = seqs.step(x[5:], [[0], [], []])
    assert calls == [[4]], calls
    assert torch.isfinite(out).all() and torch.count_nonzero(out) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_rows_attend_causally_from_their_positions(device):
    """The prefill rows of a chunk after a cached prefix against float64
    attention over the same K/V (the op's latent_reconstruct_kv) with the
    mask written from the rows' positions, key j <= position: a wrong offset
    or a future key shows here. Bound: fp32 SDPA on the same inputs, scores
    off by (d + 2) u S (S = scale sum_j |q_j k_j|), weights by twice that,
    the weighted sum of L values by (L + 8) u max|v|."""
    if not all(has_kernel(op, device) for op in OPS):
        pytest.skip(f"the ops have no {device} kernels in this build")
    projector = OpsProjector(_layer("W8A8")).to(device)
    core, d = projector.core, projector.dims
    seqs = _Sequences(projector, device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 64, generator=g).to(device)
    seqs.step(x[:3], [[0, 1, 2], [], []])
    proj = projector.latent(x[3:])
    got = seqs.step(x[3:], [[0, 1, 2, 3], [], []])  # positions 3..6 over 7 keys

    cache = projector.cache_view(seqs.pool)
    slots = (seqs.block_table[0, torch.arange(3, 7) // BLOCK].long() * BLOCK + torch.arange(3, 7) % BLOCK).to(device)
    q = core.queries(proj, core.read_rows(cache, slots)).view(4, d.num_heads, d.head_dim)
    pos = torch.arange(3, 7, device=device)
    q = R.apply_rope_ref(q, seqs.cos[pos][:, None], seqs.sin[pos][:, None]).double()
    k, v = core.keys_values(cache, seqs.block_table[:1], torch.tensor([7], dtype=torch.int32, device=device),
                            seqs.cos, seqs.sin)
    rep = d.num_heads // d.num_kv_heads
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)  # [7, H, d]
    scores = 0.25 * torch.einsum("nhd,lhd->nhl", q, k)
    allowed = torch.arange(7, device=device)[None, :] <= pos[:, None]  # key j <= the row's position
    want = torch.einsum("nhl,lhd->nhd", scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1), v)

    u = 2.0**-24
    S = 0.25 * torch.einsum("nhd,lhd->nhl", q.abs(), k.abs()).amax(-1)  # [n, H]
    vmax = v.abs().amax()
    bound = (2 * (d.head_dim + 2) * u * S + (7 + 8) * u) * vmax
    err = (got.double() - want).abs().amax(-1)
    assert (err <= bound).all(), (err.max().item(), bound.min().item())
    # and the bound is tight enough to see a mask that admits one more key
    leaky = torch.einsum("nhl,lhd->nhd", scores.masked_fill(
        ~(torch.arange(7, device=device)[None, :] <= pos[:, None] + 1)[:, None], float("-inf")).softmax(-1), v)
    assert ((leaky[:3] - want[:3]).abs().amax(-1) > bound[:3]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_plans_latent_attention_once_per_layer_shape(device, monkeypatch):
    """The step's metadata carries the decode plans: the first layer of a
    shape makes it (latent_attention_plan), the next layers of that shape
    run it, a layer of another rank makes its own; and the outputs are those
    of calls that plan themselves."""
    if not all(has_kernel(op, device) for op in OPS):
        pytest.skip(f"the ops have no {device} kernels in this build")
    from qsvd_kernels import ops

    made, run_with = [], []
    plan_op, attention_op = ops.latent_attention_plan, ops.latent_attention

    def plan_spy(*args):
        made.append(args[5].shape[1])  # the rank of w_uk
        return plan_op(*args)

    PLAN = 14  # latent_attention's plan argument (then rope_keys)

    def attention_spy(*args):
        run_with.append(args[PLAN])
        return attention_op(*args)

    projector = OpsProjector(_layer("W8A8")).to(device)
    seqs = _Sequences(projector, device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 64, generator=g).to(device)
    seqs.step(x[:5], [[0, 1, 2], [3, 4], []])
    slots = torch.tensor([int(seqs.block_table[0, 0]) * BLOCK + 3, int(seqs.block_table[1, 0]) * BLOCK + 2], device=device)
    meta = step_metadata(slots, torch.tensor([3, 2], device=device), seqs.block_table,
                         torch.tensor([4, 3, 0], dtype=torch.int32, device=device), [[0], [1], []], [4, 3, 0])
    cache = projector.cache_view(seqs.pool)
    monkeypatch.setattr(ops, "latent_attention_plan", plan_spy)
    monkeypatch.setattr(ops, "latent_attention", attention_spy)
    proj = projector.latent(x[5:7])
    outs = [projector.core.run(proj, cache, meta, seqs.cos, seqs.sin, 0.25) for _ in range(3)]  # three layers
    assert made == [24] and len(meta.plans) == 1
    assert all(p is run_with[0] for p in run_with) and len(run_with) == 3
    other = OpsProjector(_layer("W8A8", rank=16)).to(device)  # a layer of another rank: its own plan
    other.core.run(other.latent(x[5:7]), other.cache_view(other.new_pool(12, BLOCK, device)), meta, seqs.cos,
                   seqs.sin, 0.25)
    assert made == [24, 16] and len(meta.plans) == 2 and run_with[-1] is not run_with[0]
    # Without the plans (a metadata whose plans the core does not see) the same numbers.
    monkeypatch.setattr(ops, "latent_attention", lambda *a: attention_op(*a[:PLAN], None, *a[PLAN + 1:]))
    want = projector.core.run(proj, cache, meta, seqs.cos, seqs.sin, 0.25)
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,prefix", [(1, 0), (1, 40), (7, 0), (192, 0), (193, 5), (401, 0), (300, 123)])
def test_causal_attention_within_its_derived_bound(device, dtype, n, prefix):
    """The prefill rows' attention (core.causal_attention) against the
    float64 reference, within the bound derived from its arithmetic, in fp32
    and in a model's bf16 / fp16 (on the CPU, bf16 runs as chunks of GEMMs:
    one chunk, a chunk edge at 192 rows, several chunks, over a cached
    prefix); GQA (4 query heads on 2 kv heads)."""
    from qsvd_kernels import testing as T
    from qsvd_kernels.integrations.core import CAUSAL_CHUNK_ROWS, causal_attention

    assert CAUSAL_CHUNK_ROWS == 192  # the n values above straddle its chunks
    g = torch.Generator().manual_seed(n + prefix)
    L, d = n + prefix, 32
    q, k, v = (torch.randn(*shape, generator=g).to(device) for shape in ((4, n, d), (2, L, d), (2, L, d)))
    scale = d**-0.5
    out = causal_attention(q, k, v, scale, dtype)
    assert out.dtype == torch.float32 and out.shape == (4, n, d)
    bound = T.causal_attention_bound(q, k, v, scale, dtype)
    T.assert_within(out, R.causal_attention_ref(q, k, v, scale), bound, torch.float32, f"causal_attention {dtype}")
    # not vacuous: an output is a convex combination of v's rows, so a bound
    # near max |v| would pass anything
    W = v.double().abs().amax(1, keepdim=True).repeat_interleave(2, 0)
    assert (bound / W).max() < (0.25 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_masks_exactly_the_future_keys(device, dtype):
    """Causality, exactly: a key changed (to a huge value the row would
    see) leaves every row before it bit-identical and moves its own row, at
    the chunk edges of the CPU's bf16 GEMM chunks (rows 191, 192, 193, 383,
    384) and over a cached prefix."""
    from qsvd_kernels.integrations.core import causal_attention

    g = torch.Generator().manual_seed(0)
    n, prefix, d = 400, 17, 16
    L = n + prefix
    q, k, v = (torch.randn(*shape, generator=g).to(device) for shape in ((4, n, d), (2, L, d), (2, L, d)))
    base = causal_attention(q, k, v, 0.25, dtype)
    for row in (0, 191, 192, 193, 383, 384, 399):
        j = prefix + row  # the first key this row sees and no earlier row does
        k2, v2 = k.clone(), v.clone()
        k2[:, j] = 4 * q.view(2, 2, n, d)[:, 0, row]  # sharp for this row
        v2[:, j] = 100.0
        got = causal_attention(q, k2, v2, 0.25, dtype)
        assert torch.equal(got[:, :row], base[:, :row]), f"row {row}: an earlier row saw key {j}"
        assert (got[0, row] - base[0, row]).abs().min() > 10, f"row {row} did not see its own key {j}"


@pytest.mark.parametrize("bias", [False, True])
def test_a_step_attends_its_prefill_rows_in_the_dtype_asked(device, bias, monkeypatch):
    """``run(..., prefill_dtype=bf16)`` (what the vLLM layer passes for a
    bf16 model) reaches causal_attention with the same q, and with K and V
    equal to the fp32 step's rounded once to bf16 (the V bias added before
    that rounding); each prefill row gets its call's output; decode rows
    are bit-identical (latent_attention does not take the dtype)."""
    from qsvd_kernels.integrations import core

    if not all(has_kernel(op, device) for op in OPS):
        pytest.skip(f"the ops have no {device} kernels in this build")
    projector = OpsProjector(_layer("W8A8", bias=bias)).to(device)
    assert (projector.core._t("bv") is not None) == bias
    g = torch.Generator().manual_seed(3)
    first, x = torch.randn(5, 64, generator=g).to(device), torch.randn(8, 64, generator=g).to(device)
    calls = []
    real = core.causal_attention

    def spy(q, k, v, sm_scale, dtype):
        out = real(q, k, v, sm_scale, dtype)
        calls.append((dtype, q, k, v, out))
        return out

    monkeypatch.setattr(core, "causal_attention", spy)
    got, second = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        seqs = _Sequences(projector, device)
        seqs.step(first, [[0, 1], [2, 3, 4], []])
        mark = len(calls)
        # row 0 decodes sequence 0; rows 5-7 are a chunk of sequence 1; rows 1-4 prefill sequence 2
        got[dtype] = seqs.step(x, [[0], [5, 6, 7], [1, 2, 3, 4]], prefill_dtype=dtype)
        second[dtype] = calls[mark:]
    f32, b16 = second[torch.float32], second[torch.bfloat16]
    assert len(f32) == len(b16) == 2 and all(c[0] == torch.bfloat16 for c in b16)
    for (_, q, k, v, _), (_, qb, kb, vb, outb), rows in zip(f32, b16, ([5, 6, 7], [1, 2, 3, 4])):
        assert torch.equal(qb, q)
        assert kb.dtype == vb.dtype == torch.bfloat16
        assert torch.equal(kb, k.to(torch.bfloat16)) and torch.equal(vb, v.to(torch.bfloat16))
        assert torch.equal(got[torch.bfloat16][rows], outb.transpose(0, 1))
    assert torch.equal(got[torch.bfloat16][0], got[torch.float32][0])


def test_causal_attention_refuses_more_rows_than_keys():
    from qsvd_kernels.integrations.core import causal_attention

    with pytest.raises(ValueError, match="3 new rows but only 2 keys"):
        causal_attention(torch.zeros(2, 3, 8), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), 1.0)
