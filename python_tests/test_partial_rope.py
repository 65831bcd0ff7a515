"""Partial RoPE end to end (issue 22): a compressed layer keeps only some
rotary pairs (CompressedQKV.with_rope_pairs; CompressedModel.with_rope_dims;
CompressionConfig(rope_dims=)); the Hugging Face integration runs it on the
ops (latent_attention with narrow RoPE tables) and in the torch simulation.

What it must compute: the compressed model with the dropped pairs' rotation
turned off (cos 1, sin 0: their frequency set to zero in the model's own
rotary embedding), in the original head-dim layout. The permuted layout and
the narrow tables are an implementation choice that must not show."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers")

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.integrations import hf, models as M  # noqa: E402


@pytest.fixture(scope="module")
def w8a8(tiny_llama_compressor):
    model, comp = tiny_llama_compressor
    return comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse("W8A8"), beta=0.5,
                                            allocation="uniform"))


def _ids(seed=7, n=2, length=12):
    return M.random_token_batches(256, n, length, batch_size=n, seed=seed)[0]["input_ids"]


def _zero_frequencies(model, keep_pairs: int):
    """The model with every rotary pair from ``keep_pairs`` on unrotated."""
    m = copy.deepcopy(model)
    rot = m.model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        t = getattr(rot, name, None)
        if isinstance(t, torch.Tensor):
            t[keep_pairs:] = 0
    return m


@pytest.mark.parametrize("backend", ["torch", "ops"])
@pytest.mark.parametrize("rope_dims", [8, 2, 0])
@torch.no_grad()
def test_partial_rope_is_the_model_with_the_other_pairs_unrotated(tiny_llama_compressor, w8a8, backend, rope_dims):
    model, _ = tiny_llama_compressor
    d = w8a8.layers[0].dims.head_dim
    partial = w8a8.with_rope_dims(rope_dims)
    assert all(l.rope_pairs == tuple(range(rope_dims // 2)) for l in partial.layers)
    ids = _ids()
    # The rebuilt form: the same arithmetic as full RoPE (the cached form
    # rounds K's rotary part to fp16: test_the_cached_form_* below).
    form = {"rope_key_cache": "rebuilt"} if backend == "ops" else {}
    got = hf.apply_qsvd(copy.deepcopy(model), partial, backend=backend, **form)(ids).logits
    want = hf.apply_qsvd(_zero_frequencies(model, rope_dims // 2), w8a8, backend=backend)(ids).logits
    full = hf.apply_qsvd(copy.deepcopy(model), w8a8, backend=backend)(ids).logits
    tol = 1e-4 * float(want.abs().max())
    # The same arithmetic up to fp32 summation order (the permuted head dims).
    assert torch.allclose(got, want, rtol=0, atol=tol), float((got - want).abs().max())
    if rope_dims < d:  # and the dropped rotation shows, well above that tolerance
        assert float((full - want).abs().max()) > 4 * tol


@pytest.mark.parametrize("form", ["cached", "rebuilt"])
@torch.no_grad()
def test_decode_through_the_cache_matches_recompute_with_partial_rope(tiny_llama_compressor, w8a8, form):
    """latent_attention (decode, narrow tables) against the whole sequence
    at once (latent_reconstruct_kv + SDPA), as test_generation does for full
    RoPE, with K's rotary part cached (both read the same stored keys) and
    rebuilt."""
    model, _ = tiny_llama_compressor
    m = hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="ops", rope_key_cache=form)
    ids = _ids(seed=9, n=2, length=6)
    seq, _ = hf.generate(m, ids, max_new_tokens=6, do_sample=False)
    whole = m(seq).logits
    cache = hf.QSVDLatentCache(m)
    kw = {hf.cache_keyword(): cache}
    steps = [m(seq[:, :6], **kw).logits] + [m(seq[:, t : t + 1], **kw).logits for t in range(6, seq.shape[1])]
    stepped = torch.cat(steps, dim=1)
    scale = float(whole.abs().max())
    assert torch.allclose(stepped, whole, rtol=0, atol=1e-5 * max(scale, 1.0)), float((stepped - whole).abs().max())


def test_full_rope_dims_is_the_model_itself_and_artefacts_round_trip(w8a8, tmp_path):
    d = w8a8.layers[0].dims.head_dim
    assert w8a8.with_rope_dims(None) is w8a8 and w8a8.with_rope_dims(d).layers == w8a8.layers
    partial = w8a8.with_rope_dims(4)
    partial.save(str(tmp_path / "p"))
    loaded = qc.CompressedModel.load(str(tmp_path / "p"))
    for a, b in zip(partial.layers, loaded.layers):
        assert a.rope_pairs == b.rope_pairs == (0, 1)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
        assert b.spec().rope_pairs == (0, 1) and b.spec().d_rope == 4
    for bad in (3, -2, d + 2, "auto"):
        with pytest.raises(ValueError, match="rope_dims must be"):
            w8a8.with_rope_dims(bad)
    with pytest.raises(ValueError, match="already has partial RoPE"):
        partial.layers[0].with_rope_pairs([0])


def test_an_older_artefact_cannot_name_rope_pairs(w8a8, tmp_path):
    import json

    w8a8.with_rope_dims(4).save(str(tmp_path / "p"))
    path = tmp_path / "p" / "qsvd_config.json"
    cfg = json.loads(path.read_text())
    cfg["format_version"] = 2
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 2 has no partial RoPE"):
        qc.CompressedModel.load(str(tmp_path / "p"))
    cfg["format_version"] = 3
    cfg["layers"][0]["rope_pairs"] = [0, 0]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pairs must be distinct"):
        qc.CompressedModel.load(str(tmp_path / "p"))


def test_swapped_projections_refuse_partial_rope(tiny_llama_compressor, w8a8):
    model, _ = tiny_llama_compressor
    with pytest.raises(ValueError, match="partial RoPE, which changes the attention step"):
        with qc.swapped_projections(model, w8a8.with_rope_dims(4)):
            pass


def test_compression_config_rope_dims(tiny_llama_compressor):
    model, comp = tiny_llama_compressor
    with pytest.raises(ValueError, match="rope_dims must be None, .auto. or an even number"):
        qc.CompressionConfig(qc.Budget("mean_rank", 32), rope_dims=5)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse("W8A8"), beta=0.5,
                                            allocation="uniform", rope_dims=4))
    assert all(l.rope_pairs == (0, 1) for l in cm.layers) and cm.info["rope_dims"] == 4


@torch.no_grad()
def test_rope_dims_auto_picks_the_fewest_dims_within_the_tolerance(tiny_llama_compressor):
    """rope_dims="auto" measures each candidate's calibration perplexity
    against full RoPE's and keeps the fewest rotary dims within the
    tolerance; every measured ratio is the one the partial model itself
    gives (run through the HF integration on the same calibration batch)."""
    model, comp = tiny_llama_compressor
    base = dict(budget=qc.Budget("mean_rank", 32), quant=qc.QuantConfig.parse("W8A8"), beta=0.5,
                allocation="uniform", latent="qkv", rope_choice_batches=1)
    cm = comp.compress(qc.CompressionConfig(**base, rope_dims="auto", rope_tolerance=0.02))
    choice = cm.info["rope_choice"]
    ratios = {int(k): v for k, v in choice["perplexity_ratio"].items()}
    d = model.config.hidden_size // model.config.num_attention_heads
    assert sorted(ratios) == sorted({d, d // 2, d // 4, d // 8, 0} - {1})
    assert ratios[d] == 1.0
    assert choice["chosen"] == min(k for k, v in ratios.items() if v <= 1.02)
    assert cm.info["rope_dims"] == choice["chosen"]

    batch = comp.calibration[0]
    full = comp.compress(qc.CompressionConfig(**base))

    def nll(c):
        logits = hf.apply_qsvd(copy.deepcopy(model), c, backend="torch")(**batch).logits.double()
        ids = batch["input_ids"]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        return float(-logp.mean())  # random token batches: no padding

    # Keeping every pair turning is the full-RoPE model itself (the ratio 1 the choice records unmeasured).
    assert comp.calibration_nll(full, 1, d // 2) == comp.calibration_nll(full, 1)
    reference = nll(full)
    for k in (d // 2, 0):
        assert ratios[k] == pytest.approx(math.exp(nll(full.with_rope_dims(k)) - reference), rel=1e-6)
    # The two ends of the tolerance: none keeps full RoPE (unless a candidate
    # is no worse), any keeps none of it.
    strict = comp.compress(qc.CompressionConfig(**base, rope_dims="auto", rope_tolerance=0.0))
    assert strict.info["rope_dims"] == min(k for k, v in ratios.items() if v <= 1.0)
    loose = comp.compress(qc.CompressionConfig(**base, rope_dims="auto", rope_tolerance=1e9))
    assert loose.info["rope_dims"] == 0 and all(l.rope_pairs == () for l in loose.layers)
    with pytest.raises(ValueError, match="rope_tolerance must be a number >= 0"):
        qc.CompressionConfig(qc.Budget("mean_rank", 32), rope_dims="auto", rope_tolerance=-1)
    with pytest.raises(ValueError, match="rope_dims must be None, 'auto' or an even number"):
        qc.CompressionConfig(qc.Budget("mean_rank", 32), rope_dims="fast")


def test_cli_rope_dims():
    from qsvd_kernels import cli

    args = cli.build_parser().parse_args(["compress", "--model", "smollm2", "--out", "x", "--rope-dims", "auto",
                                          "--rope-tolerance", "0.05"])
    assert (cli._parse_rope_dims(args.rope_dims), args.rope_tolerance) == ("auto", 0.05)
    assert cli._parse_rope_dims("16") == 16 and cli._parse_rope_dims(None) is None
    with pytest.raises(SystemExit, match="--rope-dims must be a number of head dims or auto, got 'half'"):
        cli._parse_rope_dims("half")


def _generate(model, compressed, ids, **form):
    m = hf.apply_qsvd(copy.deepcopy(model), compressed, backend="ops", **form)
    seq, cache = hf.generate(m, ids, max_new_tokens=5, do_sample=False)
    return m, seq, cache


@torch.no_grad()
def test_the_cached_form_stores_each_tokens_rotary_keys(tiny_llama_compressor, w8a8):
    """Partial RoPE caches K's rotary part by default ("auto"): after a
    padded generation every layer's pool holds, for each real token, the
    keys of its own latent row at its own position (reference, within the
    derived fp32-then-fp16 bound), its bytes are counted, and the full-RoPE
    and no-RoPE layers cache none."""
    from helpers import rope_keys_bound

    from qsvd_kernels import reference as R

    model, _ = tiny_llama_compressor
    partial = w8a8.with_rope_dims(4)
    ids = _ids(seed=3, n=2, length=7).clamp(min=1)  # no pad token (0) among the real ones
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: sequence 1 has 4 prompt tokens
    m = hf.apply_qsvd(copy.deepcopy(model), partial, backend="ops")
    seq, cache = hf.generate(m, ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    spec = partial.layers[0].spec()
    lens = cache.seq_lens.tolist()
    assert lens == [11, 8]  # 7 and 4 prompt tokens, 4 fed back (the 5th new token is never cached)
    slots = torch.cat([cache.block_table[b, torch.arange(n) // cache.block_size].long() * cache.block_size
                       + torch.arange(n) % cache.block_size for b, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    for layer, compressed in zip(cache.layers, partial.layers):
        codes, scale, keys = layer.pool.tensors
        p = layer.projector
        assert keys.dtype == torch.float16 and keys.shape[2:] == (spec.num_kv_heads, 4)
        cos, sin = R.select_rope_pairs(cache.rope_cos, cache.rope_sin, compressed.rope_pairs)
        exact = R.latent_rope_keys_ref(codes, scale, slots, pos, p.wuk, p.wuk_scale, spec.latent_bits, cos, sin)
        got = keys.view(-1, spec.num_kv_heads, 4)[slots].double()
        assert bool(((got - exact).abs() <= rope_keys_bound(codes, scale, slots, p.wuk, p.wuk_scale,
                                                            spec.latent_bits, exact)).all())
        assert float(exact.abs().max()) > 0
        assert p.token_nbytes == spec.cache_row_bytes + 2 * spec.num_kv_heads * 4
    assert cache.token_nbytes() == sum(l.projector.token_nbytes for l in cache.layers)
    for rope_dims in (None, 0):  # full RoPE rebuilds; no RoPE has nothing to cache
        m = hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(rope_dims), backend="ops")
        _, other = hf.generate(m, ids, max_new_tokens=2, do_sample=False)
        assert all(len(l.pool.tensors) == 2 for l in other.layers)


@pytest.mark.parametrize("form", ["cached", "rebuilt"])
@torch.no_grad()
def test_the_cached_form_reads_the_keys_and_rebuilds_none(tiny_llama_compressor, w8a8, monkeypatch, form):
    """Every attention call of the cached form reads rope_keys (decode and
    the prefill's reconstruction), each step appends them once per layer;
    the rebuilt form passes none."""
    from qsvd_kernels import ops

    model, _ = tiny_llama_compressor
    seen = {"attention": [], "reconstruct": [], "append": 0}
    orig_att, orig_rec, orig_app = ops.latent_attention, ops.latent_reconstruct_kv, ops.latent_rope_keys_append

    def att(*a, **k):
        seen["attention"].append(a[15] if len(a) > 15 else k.get("rope_keys"))
        return orig_att(*a, **k)

    def rec(*a, **k):
        seen["reconstruct"].append(a[13] if len(a) > 13 else k.get("rope_keys"))
        return orig_rec(*a, **k)

    def app(*a, **k):
        seen["append"] += 1
        return orig_app(*a, **k)

    monkeypatch.setattr(ops, "latent_attention", att)
    monkeypatch.setattr(ops, "latent_reconstruct_kv", rec)
    monkeypatch.setattr(ops, "latent_rope_keys_append", app)
    _, seq, cache = _generate(model, w8a8.with_rope_dims(4), _ids(seed=5, n=2, length=6), rope_key_cache=form)
    layers = len(cache.layers)
    assert len(seen["attention"]) == 4 * layers and len(seen["reconstruct"]) == layers  # 1 prefill + 4 decodes
    cached = form == "cached"
    assert all((t is not None) == cached for t in seen["attention"] + seen["reconstruct"])
    assert seen["append"] == (5 * layers if cached else 0)


@torch.no_grad()
def test_beam_search_copies_the_rotary_keys_with_the_latent(tiny_llama_compressor, w8a8, monkeypatch):
    """Beam search remaps block tables and copies a shared, partly filled
    last block on write: the keys go with the latent, so beams decoded
    through the cache pick what recomputing each step from scratch
    (use_cache=False: a fresh cache per step) picks."""
    model, _ = tiny_llama_compressor
    m = hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="ops")
    m.generation_config.eos_token_id = None
    prompt = _ids(seed=13, n=2, length=7).clamp(min=1)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, attention_mask=torch.ones_like(prompt))
    copied = []
    original = hf.projector.LatentPool.copy_blocks

    def spy(self, src, dst):
        copied.append(len(self.tensors))
        return original(self, src, dst)

    monkeypatch.setattr(hf.projector.LatentPool, "copy_blocks", spy)
    got, _ = hf.generate(m, prompt, block_size=4, **kw)
    assert copied and all(n == 3 for n in copied)  # codes, scales and rotary keys
    assert torch.equal(got, m.generate(prompt, use_cache=False, **kw))


def test_the_rotary_key_form_is_checked(tiny_llama_compressor, w8a8):
    model, _ = tiny_llama_compressor
    with pytest.raises(ValueError, match="rope_key_cache must be one of"):
        hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="ops", rope_key_cache="yes")
    with pytest.raises(ValueError, match="rope_key_cache must be one of"):
        hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="torch", rope_key_cache="yes")
    with pytest.raises(ValueError, match="rope_key_cache='cached': this layer has no rotary dims"):
        hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(0), backend="ops", rope_key_cache="cached")
    with pytest.raises(ValueError, match="rope_key_cache='cached' is a form of the ops backend"):
        hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="torch", rope_key_cache="cached")
    # a cache of the other form is refused, never read stale or rebuilt silently
    from qsvd_kernels.integrations.core import LatentCache

    projector = hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="ops")._qsvd_stack.projectors[0]
    pool = projector.new_pool(1, 4, "cpu")
    assert len(pool.tensors) == 3
    with pytest.raises(ValueError, match="the cache has no rope_keys"):
        projector.core._rope_keys(LatentCache(*pool.tensors[:2]))
    rebuilt = hf.apply_qsvd(copy.deepcopy(model), w8a8.with_rope_dims(4), backend="ops",
                            rope_key_cache="rebuilt")._qsvd_stack.projectors[0]
    with pytest.raises(ValueError, match="a cache with rope_keys would never be written"):
        rebuilt.core._rope_keys(LatentCache(*pool.tensors))
