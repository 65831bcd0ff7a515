"""The compression pipeline on small local models: the math of each step."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import compress as qc
from qsvd_kernels.formats import code_format
from qsvd_kernels.compress.allocate import _envelope_items
from qsvd_kernels.model.sites import find_attention_sites

from toy_models import ToyEncoder, pooled, toy_batches

U32 = 2.0**-24


@pytest.fixture(scope="module")
def toy():
    model = ToyEncoder(hidden=64, heads=4, kv_heads=2, layers=3).eval()
    batches = toy_batches()
    comp = qc.Compressor(model, batches, progress=False)
    return model, batches, comp


def _random_layer(E=48, H=4, H_kv=2, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    dims = qc.LayerDims(E, H, H_kv, E // H)
    W = [torch.randn(E, n, generator=g) for n in (dims.q_dim, dims.kv_dim, dims.kv_dim)]
    b = torch.randn(dims.out_dim, generator=g) if bias else None
    # Correlated inputs: a random mixing of channels with decaying scales.
    mix = torch.randn(E, E, generator=g) * torch.exp(-torch.arange(E) / 8.0)[:, None]
    X = torch.randn(600, E, generator=g) @ mix
    st = qc.LayerStats(E)
    st.update(X)
    return dims, W, b, X, st


# ---------------------------------------------------------------- budgets


def test_budget_formulas_match_the_paper():
    E = 4096
    dims = [qc.LayerDims(E, 32, 32, 128)] * 4
    r = int(0.75 * E)
    a = qc.achieved([r] * 4, dims, w_bits=8, latent_bits=8)
    assert a["r1"] == pytest.approx(0.50) and a["r2"] == pytest.approx(0.1875)
    assert qc.achieved([r] * 4, dims, 8, 4)["r2"] == pytest.approx(0.09375)
    # GQA: 8 kv heads of 128 -> E_kv = 1024.
    g = qc.LayerDims(E, 32, 8, 128)
    a = qc.achieved([1024], [g])
    assert a["r2"] == pytest.approx(1024 / (2 * 1024))
    assert a["r1"] == pytest.approx(1024 * (2 * E + 2 * 1024) / (E * (E + 2 * 1024)))
    assert a["cache_bytes_per_token"] == 1024 * 2 and qc.achieved([1024], [g], 8, 8)["cache_bytes_per_token"] == 1028


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="r2", value=1.0), "below 100 %"),
    (dict(kind="r1", value=1.5), "below 100 %"),
    (dict(kind="r2", value=0.0), "positive"),
    (dict(kind="r2", value=float("nan")), "positive finite"),
    (dict(kind="bogus", value=0.2), "budget kind"),
    (dict(kind="r2", value=0.2, latent_bits=3), "latent_bits"),
])
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qc.Budget(**kwargs)


# ------------------------------------------------------------- allocation


def test_allocation_meets_the_budget_exactly():
    dims = [qc.LayerDims(256, 4, 4, 64)] * 5
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(256, generator=g).sort(descending=True).values * (l + 1) for l in range(5)]
    for value in (0.1, 0.17, 0.225, 0.3):
        budget = qc.Budget("r2", value)
        ranks = qc.allocate_ranks(scores, dims, budget, align=16)
        limit = value * 5 * 2 * 256
        assert sum(ranks) == math.floor(limit / 16) * 16, (value, ranks)
        assert all(r % 16 == 0 and 16 <= r <= 256 for r in ranks)
        assert qc.achieved(ranks, dims)["r2"] <= value
    ranks = qc.allocate_ranks(scores, dims, qc.Budget("mean_rank", 100), align=8)
    assert sum(ranks) == 496
    # Deterministic.
    assert ranks == qc.allocate_ranks([s.clone() for s in scores], dims, qc.Budget("mean_rank", 100), align=8)


def test_allocation_r1_with_gqa_layers_of_different_cost():
    dims = [qc.LayerDims(256, 8, 8, 32), qc.LayerDims(256, 8, 2, 32), qc.LayerDims(256, 8, 4, 32)]
    scores = [torch.linspace(2, 0, 256) for _ in dims]
    budget = qc.Budget("r1", 0.4, w_bits=8)
    ranks = qc.allocate_ranks(scores, dims, budget, align=16)
    cost, limit = budget.rank_units(dims)
    spent = sum(c * r for c, r in zip(cost, ranks))
    assert spent <= limit and limit - spent < min(cost) * 16  # not one more block fits
    assert qc.achieved(ranks, dims, w_bits=8)["r1"] <= 0.4


def test_allocation_follows_the_scores():
    dims = [qc.LayerDims(128, 2, 2, 64)] * 3
    scores = [torch.full((128,), 1.0), torch.full((128,), 100.0), torch.full((128,), 10.0)]
    ranks = qc.allocate_ranks(scores, dims, qc.Budget("mean_rank", 64), align=16)
    assert ranks[1] == 128 and ranks[2] > ranks[0] >= 16


def test_envelope_never_skips_a_cheap_block_before_a_valuable_one():
    # Block gains 1, 10: the envelope merges them (mean 5.5) ahead of a flat 5.
    assert _envelope_items([1.0, 10.0, 0.5]) == [(0, 2, 5.5), (2, 1, 0.5)]
    dims = [qc.LayerDims(64, 1, 1, 64)] * 2
    a = torch.cat([torch.full((16,), 1.0), torch.full((16,), 1.0), torch.full((16,), 10.0), torch.zeros(16)])
    b = torch.full((64,), 5.0)
    ranks = qc.allocate_ranks([a, b], dims, qc.Budget("mean_rank", 40), align=16)
    assert ranks == [48, 32]


def test_exact_allocation_is_optimal_against_brute_force():
    """Equal block costs: the dynamic programme keeps the most importance of
    all prefix choices that fit (checked exhaustively on small cases)."""
    import itertools

    dims = [qc.LayerDims(64, 1, 1, 64)] * 3
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        scores = [torch.rand(64, generator=g) ** 3 * 10 for _ in dims]
        mean_rank = int(torch.randint(17, 63, (1,), generator=g))
        ranks = qc.allocate_ranks(scores, dims, qc.Budget("mean_rank", mean_rank), align=16)
        kept = lambda rs: sum(float(s[:r].sum()) for s, r in zip(scores, rs))  # noqa: E731
        limit = mean_rank * 3
        best = max((rs for rs in itertools.product([16, 32, 48, 64], repeat=3) if sum(rs) <= limit), key=kept)
        assert kept(ranks) >= kept(best) - 1e-9 and sum(ranks) <= limit
    # A case where a greedy pass over merged groups goes wrong.
    a = torch.cat([torch.full((16,), 100.0), torch.full((16,), 1.0), torch.full((16,), 10.0), torch.zeros(16)])
    b = torch.cat([torch.full((16,), 100.0), torch.full((16,), 5.0), torch.full((16,), 5.0), torch.zeros(16)])
    assert qc.allocate_ranks([a, b], dims[:2], qc.Budget("mean_rank", 24), align=16) == [16, 32]


def test_budget_bits_come_from_the_quantization_setting():
    cfg = qc.CompressionConfig(qc.Budget("r2", 0.3), qc.QuantConfig.parse("W8A4"))
    assert (cfg.budget.w_bits, cfg.budget.latent_bits) == (8, 4)
    cfg = qc.CompressionConfig(qc.Budget("r2", 0.3, w_bits=16, latent_bits=16), qc.QuantConfig.parse("W8A4"))
    assert (cfg.budget.w_bits, cfg.budget.latent_bits) == (16, 16)
    # R1 counts the real widths when the query width differs from E.
    d = qc.LayerDims(1024, 16, 8, 128)  # E_q = 2048, E_kv = 1024
    assert qc.achieved([256], [d])["r1"] == pytest.approx(256 * (1024 + 4096) / (1024 * 4096))


def test_allocation_errors():
    dims = [qc.LayerDims(64, 1, 1, 64)] * 2
    s = [torch.ones(64)] * 2
    with pytest.raises(ValueError, match="below what the minimum rank allows"):
        qc.allocate_ranks(s, dims, qc.Budget("mean_rank", 8), align=16)
    with pytest.raises(ValueError, match="at or above full rank"):
        qc.allocate_ranks(s, dims, qc.Budget("mean_rank", 64), align=16)
    with pytest.raises(ValueError, match="at or above full rank"):  # a rank budget: nothing compressed
        qc.allocate_ranks(s, dims, qc.Budget("r2", 0.5, 16, 16), align=16)
    # with an 8-bit latent the same ranks halve the cache: the budget is met at full rank
    for alloc in (qc.allocate_ranks, lambda s_, *a, **k: qc.uniform_ranks(*a, **k)):
        assert alloc(s, dims, qc.Budget("r2", 0.25, 8, 8), align=16) == [64, 64]
    with pytest.raises(ValueError, match="NaN"):
        qc.allocate_ranks([torch.full((64,), float("nan"))] * 2, dims, qc.Budget("mean_rank", 32))
    with pytest.raises(ValueError, match="min_rank"):
        qc.allocate_ranks(s, dims, qc.Budget("mean_rank", 32), align=16, min_rank=20)


# ------------------------------------------------------------ joint SVD


@pytest.mark.parametrize("whitening", ["none", "diag", "cholesky"])
def test_full_rank_reproduces_qkv(whitening):
    """At full rank with no quantization the compressed layer gives the
    original Q/K/V to fp32 rounding of the stored factors: each output is a
    sum of E x r products of factors rounded once to fp32, so its error is at
    most (r + 2) u32 |x| |W_d| |W_u| (entrywise absolute values)."""
    dims, (W_q, W_k, W_v), b, X, st = _random_layer()
    svd = qc.joint_svd(W_q, W_k, W_v, dims, qc.make_whitening(st, whitening), b)
    layer = qc.CompressedQKV.build(svd, svd.max_rank, 0.5, qc.QuantConfig(), seed=0)
    x = X[:20]
    q, k, v = layer.project(x.double())
    want = x.double() @ torch.cat([W_q, W_k, W_v], 1).double() + b.double()
    got = torch.cat([q, k, v], -1)
    bound = (dims.hidden + 2) * U32 * (x.double().abs() @ layer.wd.double().abs().T @ layer.wu.double().abs().T)
    assert bool(((got - want).abs() <= bound + 1e-12).all())


def test_error_decreases_with_rank_and_whitening_helps():
    dims, (W_q, W_k, W_v), b, X, st = _random_layer()
    errs = {}
    for kind in ("none", "diag", "cholesky"):
        svd = qc.joint_svd(W_q, W_k, W_v, dims, qc.make_whitening(st, kind), b)
        errs[kind] = [svd.output_error(X, r) for r in range(4, 49, 4)]
        assert all(a >= b - 1e-12 for a, b in zip(errs[kind], errs[kind][1:])), kind
        assert errs[kind][-1] < 1e-10
    # Cholesky whitening is optimal for the output error on the calibration
    # rows; both whitenings beat plain truncation at every intermediate rank.
    for i in range(len(errs["none"]) - 1):
        assert errs["cholesky"][i] <= errs["diag"][i] + 1e-12
        assert errs["cholesky"][i] < errs["none"][i]
    # And the Cholesky error is exactly the discarded whitened spectrum.
    svd = qc.joint_svd(W_q, W_k, W_v, dims, qc.make_whitening(st, "cholesky"), b)
    r = 20
    Y = X.double() @ svd.W_cat
    predicted = float(svd.sigma[r:].pow(2).sum().sqrt()) * math.sqrt(X.shape[0]) / float(Y.norm())
    assert svd.output_error(X, r) == pytest.approx(predicted, rel=1e-4)


def test_gqa_factor_shapes_and_beta_split():
    dims, (W_q, W_k, W_v), b, X, st = _random_layer(E=64, H=8, H_kv=2)
    svd = qc.joint_svd(W_q, W_k, W_v, dims, qc.make_whitening(st, "cholesky"), b)
    for beta in (0.0, 0.3, 1.0):
        W_d, W_u = svd.factors(24, beta)
        assert W_d.shape == (64, 24) and W_u.shape == (24, 64 + 2 * 16)
        ref_d, ref_u = svd.factors(24, 0.5)
        assert torch.allclose(W_d @ W_u, ref_d @ ref_u, atol=1e-9)


def test_rank_deficient_gram_gets_jitter_and_bad_weights_are_refused():
    E = 32
    st = qc.LayerStats(E)
    st.update(torch.randn(10, E))  # 10 tokens < 32 channels: singular Gram
    w = qc.make_whitening(st, "cholesky")
    assert w.jitter > 0
    dims = qc.LayerDims(E, 2, 2, 16)
    W = torch.randn(E, E)
    bad = W.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="W_k has 1 NaN or Inf"):
        qc.joint_svd(W, bad, W, dims, w)
    with pytest.raises(ValueError, match="calibration inputs contain NaN"):
        st.update(torch.full((2, E), float("inf")))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        qc.make_whitening(None, "diag")


def test_stats_ignore_padding(toy):
    model, batches, comp = toy
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert comp.stats[0].count == real


# ------------------------------------------------------------- scores


@pytest.mark.parametrize("form,metric", [("qkv", "none"), ("kv", "none"), ("qkv", "attention"), ("kv", "attention")])
def test_scores_equal_brute_force_per_sample_gradients(toy, form, metric):
    """I_i = mean_n (sigma_i u_i^T S^-T G_n T^-T v_i)^2 with G_n (the gradient
    of the covered columns: all of q, k, v, or k, v) from one backward pass
    per sample, against the hooks' single batched pass; T the output metric."""
    model, batches, comp = toy
    batch = batches[0]
    svds = comp.svds("cholesky", form=form, output_metric=metric)
    assert all((s.metric is not None) == (metric != "none") and s.form == form for s in svds)
    sites = comp.sites
    fast = qc.importance_scores(model, sites, svds, qc.random_projection_loss(lambda m, b: pooled(m, b), seed=3),
                                [batch], progress=False)
    gen = torch.Generator().manual_seed(3)
    f = pooled(model, batch)
    z = torch.randn(f.shape, generator=gen)
    brute = [torch.zeros(s.max_rank, dtype=torch.float64) for s in svds]
    for n in range(f.shape[0]):
        model.zero_grad()
        f = pooled(model, batch)
        (z[n] * f[n]).sum().backward()
        for l, (site, svd) in enumerate(zip(sites, svds)):
            G = torch.cat([lin.weight.grad.T for lin in site.linears], dim=1).double()  # dL/dW_cat [E, out]
            G = G[:, svd.latent_dims.first_col :]  # the columns the latent covers
            Gw = svd.whitening.solve(G) if svd.whitening.kind != "cholesky" else torch.linalg.solve_triangular(
                svd.whitening.upper.T, G, upper=False)  # S^-T G
            if svd.metric is not None:
                Gw = svd.metric.solve(Gw)  # S^-T G T^-T (T symmetric)
            proj = torch.einsum("ei,eo,io->i", svd.U, Gw, svd.Vh)
            brute[l] += (svd.sigma * proj) ** 2
    model.zero_grad()
    for l in range(len(svds)):
        want = brute[l] / f.shape[0]
        assert torch.allclose(fast[l], want, rtol=1e-3, atol=1e-6 * float(want.max())), l
        assert float(want.max()) > 0


def test_losses_have_nonzero_gradients(toy):
    model, batches, comp = toy
    s = comp.scores(qc.random_projection_loss(pooled))
    assert all(bool((x > 0).any()) for x in s)


# ---------------------------------------------------- quantized layer


@pytest.mark.parametrize("qname", ["W8A8", "W8A4", "W4A4"])
def test_packed_tensors_run_on_the_ops(qname):
    """kernel_tensors() fed to the qsvd ops reproduce the layer's simulation:
    codes bit-exact (hadamard_quant), latent and attention within fp32."""
    dims, (W_q, W_k, W_v), b, X, st = _random_layer(E=64, H=4, H_kv=2)
    svd = qc.joint_svd(W_q, W_k, W_v, dims, qc.make_whitening(st, "cholesky"), b)
    quant = qc.QuantConfig.parse(qname)
    layer = qc.CompressedQKV.build(svd, 32, 0.4, quant, seed=5)
    kt = layer.kernel_tensors()
    x = X[:24].float()
    codes, scale = qk.hadamard_quant(x, quant.a_bits, quant.a_clip, kt["signs"])
    c = qk.quant_gemm(codes, scale, kt["wd"], kt["wd_scale"], quant.a_bits, quant.w_bits, torch.float32)
    c_sim = layer.latent(x)
    assert torch.allclose(c.double(), c_sim, rtol=4 * U32, atol=4 * U32 * float(c_sim.abs().max()))
    # The latent goes through the paged cache; q from the cached codes.
    T, r = x.shape[0], layer.rank
    fmt = code_format(quant.latent_bits)
    cache = torch.zeros(2, 16, fmt.row_bytes(r), dtype=fmt.dtype)
    cache_scale = torch.zeros(2, 16)
    qk.latent_cache_append(c, torch.arange(T), cache, cache_scale, quant.latent_bits, quant.latent_clip)
    flat, flat_scale = cache.view(32, -1)[:T], cache_scale.view(32)[:T]
    q = qk.quant_gemm(flat, flat_scale, kt["wuq"], kt["wuq_scale"], quant.latent_bits, quant.w_bits, torch.float32,
                      kt["bq"])
    q_sim, k_sim, v_sim = layer.project(x.double())
    assert torch.allclose(q.double(), q_sim, rtol=1e-5, atol=1e-5 * float(q_sim.abs().max()))
    # Decode attention of the last token over all T, against the simulated K/V.
    d, H, H_kv = dims.head_dim, dims.num_heads, dims.num_kv_heads
    out, _ = qk.latent_attention(q[-1:].view(1, H, d), cache, cache_scale, torch.tensor([[0, 1]], dtype=torch.int32),
                                 torch.tensor([T], dtype=torch.int32), kt["wuk"], kt["wuk_scale"], kt["wuv"],
                                 kt["wuv_scale"], quant.latent_bits, d**-0.5)
    out = out + kt["bv"].view(1, H_kv, 1, d).expand(1, H_kv, H // H_kv, d).reshape(1, H, d)  # V bias after softmax
    kk = k_sim.view(T, H_kv, d).repeat_interleave(H // H_kv, 1)
    vv = v_sim.view(T, H_kv, d).repeat_interleave(H // H_kv, 1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q_sim[-1].view(H, d), kk) * d**-0.5, -1)
    want = torch.einsum("ht,thd->hd", p, vv)
    assert torch.allclose(out[0].double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("qname,tol", [("W8A8", 0.03), ("W8A4", 0.25), ("W4A4", 0.3)])
def test_quantized_layer_tracks_the_original(qname, tol):
    """E = 48 = 12 * 4 uses a non-symmetric Hadamard base, so a rotation
    folded the wrong way round (H instead of H^T) would show here: the
    quantized full-rank layer must stay within quantization noise of x W_cat
    (measured: 1 %, 14 %, 19 %; a wrongly folded rotation gives 190 %)."""
    g = torch.Generator().manual_seed(0)
    dims = qc.LayerDims(48, 4, 2, 12)
    W = [torch.randn(48, n, generator=g) for n in (48, 24, 24)]
    b = torch.randn(96, generator=g)
    X = torch.randn(600, 48, generator=g)
    st = qc.LayerStats(48)
    st.update(X)
    svd = qc.joint_svd(*W, dims, qc.make_whitening(st, "cholesky"), b)
    q = qc.QuantConfig.parse(qname)
    quant = qc.QuantConfig(q.w_bits, q.a_bits, q.latent_bits, a_clip=1.0, latent_clip=1.0)
    layer = qc.CompressedQKV.build(svd, svd.max_rank, 0.5, quant, seed=1)
    x = X[:64]
    want = x.double() @ svd.W_cat + svd.bias
    err = float((layer.project_cat(x) - want).norm() / want.norm())
    assert err < tol, err


def test_beta_search_beats_every_fixed_choice(toy):
    """The searched layer's output error on the calibration rows is no larger
    than that of layers built independently at fixed betas and clips."""
    model, batches, comp = toy
    quant = qc.QuantConfig.parse("W4A4")
    cfg = qc.CompressionConfig(qc.Budget("mean_rank", 32), quant, allocation="uniform")
    cm = comp.compress(cfg)
    for i, (layer, svd, st) in enumerate(zip(cm.layers, comp.config_svds(cfg, cm.info["latent_form"]),
                                             comp.stats)):
        X = st.rows
        Y = X.double() @ svd.W_cat + svd.bias
        err = lambda l: float(((l.project_cat(X) - Y) ** 2).sum())  # noqa: E731
        chosen = err(layer)
        for beta in (0.0, 0.5, 1.0):
            for clip in (1.0, 0.9):
                other = qc.CompressedQKV.build(svd, layer.rank, beta, qc.QuantConfig(4, 4, 4, 1.0, clip), layer.seed)
                assert chosen <= err(other) + 1e-9, (i, beta, clip)


def test_pipeline_is_deterministic_and_artefact_round_trips(toy, tmp_path):
    model, batches, comp = toy
    loss = qc.random_projection_loss(pooled, seed=0)
    cfg = qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse("W8A4"), seed=7)
    cm = qc.compress_model(model, batches, cfg, loss_fn=loss, progress=False)
    cm2 = qc.compress_model(model, batches, cfg, loss_fn=qc.random_projection_loss(pooled, seed=0), progress=False)
    assert cm.ranks == cm2.ranks and cm.betas == cm2.betas
    for a, b in zip(cm.layers, cm2.layers):
        for k, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[k])
    cm.save(str(tmp_path))
    cfg_json = json.loads((tmp_path / "qsvd_config.json").read_text())
    assert cfg_json["info"]["ranks"] == cm.ranks and "achieved" in cfg_json["info"]
    assert cfg_json["info"]["config"]["seed"] == 7
    loaded = qc.CompressedModel.load(str(tmp_path))
    x = batches[0]
    with qc.swapped_projections(model, cm):
        y1 = pooled(model, x)
    with qc.swapped_projections(model, loaded):
        y2 = pooled(model, x)
    assert torch.equal(y1, y2)
    # The swap is undone: the original model is back.
    y0 = pooled(model, x)
    assert not torch.equal(y0, y1)
    assert all(isinstance(l, torch.nn.Linear) for s in find_attention_sites(model) for l in s.linears)


def test_corrupt_or_mismatched_artefacts_are_refused(toy, tmp_path):
    model, batches, comp = toy
    cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.3), allocation="uniform"))
    cm.save(str(tmp_path))
    tensor_file = tmp_path / "qsvd_layers.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        qc.CompressedModel.load(str(tmp_path))
    with pytest.raises(ValueError, match="not a qsvd-kernels artefact"):
        qc.CompressedModel.load(str(tmp_path / "nowhere"))
    other = ToyEncoder(hidden=64, heads=4, kv_heads=4, layers=3)
    with pytest.raises(ValueError, match="the compressed layer is"):
        with qc.swapped_projections(other, cm):
            pass
    (tmp_path / "qsvd_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt JSON"):
        qc.CompressedModel.load(str(tmp_path))


def test_allocation_plot_is_written(toy, tmp_path):
    model, batches, comp = toy
    cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.3)), qc.random_projection_loss(pooled))
    path = qc.plot_allocation(cm, str(tmp_path / "ranks.png"))
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="no supported attention layers"):
        qc.Compressor(torch.nn.Sequential(torch.nn.Linear(4, 4)), [torch.randn(1, 4)], progress=False)


# ------------------------------------------------------- output metric


def _rope_matrix(inv_freq, delta):
    """The rotate-half rotation R (column vectors: x' = R x) at distance delta."""
    h = inv_freq.numel()
    c, s = torch.cos(delta * inv_freq), torch.sin(delta * inv_freq)
    R = torch.zeros(2 * h, 2 * h, dtype=torch.float64)
    idx = torch.arange(h)
    R[idx, idx], R[idx + h, idx + h], R[idx, idx + h], R[idx + h, idx] = c, c, -s, s
    return R


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rope_average_is_the_mean_over_distances(sign):
    """metric.rope_average's closed form against the explicit mean of
    R(sign delta) C R(sign delta)^T over delta = 0 .. context - 1, for a
    random PSD C and frequencies from fast to slow (base 1e4, d = 16)."""
    from qsvd_kernels.compress.metric import rope_average, rope_expectations

    d, context = 16, 300
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = A @ A.T
    want = sum(_rope_matrix(inv_freq, sign * t) @ C @ _rope_matrix(inv_freq, sign * t).T for t in range(context))
    got = rope_average(C, rope_expectations(inv_freq, context, sign))
    assert torch.allclose(got, want / context, rtol=1e-10, atol=1e-10 * float(C.abs().max()))


def test_attention_metric_weights_key_errors_by_what_queries_see():
    """A key error along a direction no query ever points to costs nothing
    under the metric (up to its eigenvalue floor), one along the queries'
    direction costs its score change; the metric's blocks are T^(1/2) with a
    working inverse, and plain output energy is kept per projection."""
    from qsvd_kernels.compress.metric import attention_output_metric

    E, H, Hk, d = 8, 2, 1, 4
    dims = qc.LayerDims(E, H, Hk, d)
    g = torch.Generator().manual_seed(1)
    Wq = torch.zeros(E, H * d, dtype=torch.float64)
    Wq[0, 0] = 1.0  # both query heads only ever read x_0 into their dim 0
    Wq[0, d] = 2.0
    Wk = torch.randn(E, d, generator=g, dtype=torch.float64)
    Wv = torch.randn(E, d, generator=g, dtype=torch.float64)
    W_cat = torch.cat([Wq, Wk, Wv], 1)
    gram = torch.eye(E, dtype=torch.float64)
    m = attention_output_metric(dims, "kv", W_cat, None, gram, None, None, None)
    assert m.blocks.shape == (2, d, d)  # one k head, one v head
    eye = torch.eye(2 * d, dtype=torch.float64)
    assert torch.allclose(m.solve(m.apply(eye)), eye, atol=1e-6)
    Tk = m.blocks[0]
    seen = Tk @ torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    unseen = Tk @ torch.tensor([0, 1.0, 0, 0], dtype=torch.float64)
    assert float(unseen.norm()) < 1e-2 * float(seen.norm())
    # kept energy: tr(T C_k T) = tr(C_k) with C_k = Wk^T Wk
    Ck = Wk.T @ Wk
    assert torch.allclose(torch.trace(Tk @ Ck @ Tk), torch.trace(Ck), rtol=1e-9)


def test_quant_setting_names_parse_back():
    """Every setting's name parses to the same setting (the CLI's --quant takes
    them), the latent's own width included; anything else is one clear error."""
    for q in (qc.QuantConfig(), qc.QuantConfig(8, 8, 8), qc.QuantConfig(8, 4, 4), qc.QuantConfig(4, 4, 4),
              qc.QuantConfig(8, 8, 4), qc.QuantConfig(4, 4, 8)):
        assert qc.QuantConfig.parse(q.name) == q, q.name
    assert qc.QuantConfig.parse("w8a8l4") == qc.QuantConfig(8, 8, 4)
    for bad in ("W8A8L2", "W8", "int8", "W8A8L"):
        with pytest.raises(ValueError, match="unknown quantization setting"):
            qc.QuantConfig.parse(bad)
