"""Generation through the QSVD latent cache, as Hugging Face users run it:
greedy, left-padded batches, beam search, sampling, per-sequence stopping,
use_cache=False, decode against recompute, and refusal (never silent
garbage) when the cache cannot be found. CI runs this file under the pinned
transformers and again under the newest release in the supported range."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers")

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.integrations import hf  # noqa: E402
from qsvd_kernels.integrations import models as M  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_llama_compressor):
    return tiny_llama_compressor


@pytest.fixture(scope="module")
def full_rank(llama):
    """The model compressed at full rank without quantization (torch backend):
    it must generate exactly what the original generates."""
    model, comp = llama
    E, L = model.config.hidden_size, model.config.num_hidden_layers
    cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.5), ranks=[E] * L))
    return hf.apply_qsvd(copy.deepcopy(model), cm, backend="torch")


@pytest.fixture(scope="module")
def quantized(llama):
    model, comp = llama
    return {q: comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse(q)),
                             qc.causal_lm_fisher_loss()) for q in ("W8A8", "W4A4", "W8A8L4")}


def _prompt(n=3, length=10, seed=5):
    return M.random_token_batches(256, n, length, batch_size=n, seed=seed)[0]["input_ids"]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_greedy_full_rank_matches_the_original_token_for_token(llama, full_rank):
    model, _ = llama
    prompt = _prompt()
    kw = dict(max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(prompt))
    ref = model.generate(prompt, **kw)
    got, cache = hf.generate(full_rank, prompt, **kw)
    assert torch.equal(got, ref)
    assert cache.get_seq_length() == prompt.shape[1] + 23
    assert cache.seq_lens.tolist() == [prompt.shape[1] + 23] * 3
    # Only the latent is held, never K/V: r fp32 values per token and layer, in whole blocks.
    E, L = model.config.hidden_size, model.config.num_hidden_layers
    assert all(l.pool.tensors[0].shape[1:] == (cache.block_size, E) for l in cache.layers)
    bookkeeping = sum(t.numel() * t.element_size() for t in (cache.block_table, cache.refcount, cache.seq_lens,
                                                              cache.rope_cos, cache.rope_sin))
    assert cache.nbytes() == L * cache.num_blocks * cache.block_size * E * 4 + bookkeeping
    # A plain model.generate() gets a latent cache made by the model itself.
    assert torch.equal(full_rank.generate(prompt, **kw), ref)


@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(llama, full_rank):
    model, _ = llama
    full = _prompt(3, 12, seed=7)
    prompts = [full[0, :12], full[1, :7], full[2, :3]]
    ids, mask = _left_padded(prompts)
    kw = dict(max_new_tokens=12, do_sample=False)
    got, cache = hf.generate(full_rank, ids, attention_mask=mask, **kw)
    assert torch.equal(got, model.generate(ids, attention_mask=mask, **kw))
    # each sequence holds only its own tokens
    assert cache.seq_lens.tolist() == [len(p) + 11 for p in prompts]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[0, len(p):]
        n = len(alone)  # shorter when it stopped at EOS; the batch then pads the sequence
        assert torch.equal(got[i, ids.shape[1] : ids.shape[1] + n], alone), i
        assert bool((got[i, ids.shape[1] + n :] == model.generation_config.pad_token_id).all()), i


@torch.no_grad()
def test_beam_search_matches_and_copies_at_most_a_block_per_beam(llama, full_rank, monkeypatch):
    model, _ = llama
    prompt = _prompt(2, 9, seed=11)
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, attention_mask=torch.ones_like(prompt))
    copies = []
    original = hf.projector.LatentPool.copy_blocks

    def spy(self, src, dst):
        copies.append(src.numel())
        return original(self, src, dst)

    monkeypatch.setattr(hf.projector.LatentPool, "copy_blocks", spy)
    got, cache = hf.generate(full_rank, prompt, block_size=4, **kw)
    assert torch.equal(got, model.generate(prompt, **kw))
    # Reordering remaps block-table rows; only a shared, partly filled last
    # block is copied: one block per copy, at most one per beam and layer per step.
    L, beams = model.config.num_hidden_layers, 2 * 3
    assert copies and all(n == 1 for n in copies)
    assert len(copies) <= 10 * beams * L
    # beams share their common prefix: fewer live blocks than unshared beams would need
    live = int((cache.refcount > 0).sum())
    assert live < beams * -(-(9 + 9) // 4), live
    assert torch.equal(cache.refcount, torch.bincount(
        cache.block_table[torch.arange(cache.block_table.shape[1])[None, :] < cache._blocks_used(
            cache.seq_lens)[:, None]].long(), minlength=cache.num_blocks))


@torch.no_grad()
def test_sampling_with_top_k_top_p_and_several_return_sequences(llama, full_rank):
    model, _ = llama
    prompt = _prompt(2, 8, seed=13)
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, num_return_sequences=3,
              attention_mask=torch.ones_like(prompt))
    torch.manual_seed(1)
    ref = model.generate(prompt, **kw)
    torch.manual_seed(1)
    got, cache = hf.generate(full_rank, prompt, **kw)
    assert got.shape[0] == 6 and torch.equal(got, ref)
    assert cache.batch_size == 6


@torch.no_grad()
def test_per_sequence_stopping_on_eos(llama, full_rank):
    model, _ = llama
    prompt = _prompt(3, 8, seed=17)
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    eos = int(ref[0, 8 + 2])  # sequence 0 stops after three tokens; the others run on
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    want = model.generate(prompt, **kw)
    got, _ = hf.generate(full_rank, prompt, **kw)
    assert torch.equal(got, want)
    assert bool((want[0, 8 + 3:] == 0).all()) and want.shape[1] > 8 + 3


@torch.no_grad()
def test_use_cache_false_recomputes_and_matches(llama, full_rank):
    model, _ = llama
    prompt = _prompt(2, 6, seed=19)
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=False, attention_mask=torch.ones_like(prompt))
    ref = model.generate(prompt, **kw)
    assert torch.equal(full_rank.generate(prompt, **kw), ref)
    got, cache = hf.generate(full_rank, prompt, **kw)
    assert torch.equal(got, ref) and cache is None
    # a cache the caller passes is used whatever use_cache says, as transformers does
    cache = hf.QSVDLatentCache(full_rank)
    full_rank(prompt[:, :-1], **{hf.cache_keyword(): cache})
    step = full_rank(prompt[:, -1:], use_cache=False, **{hf.cache_keyword(): cache}).logits
    assert torch.allclose(step[:, -1], model(prompt).logits[:, -1], atol=1e-5)
    assert cache.get_seq_length() == 6


@pytest.mark.parametrize("backend", ["ops", "torch"])
@pytest.mark.parametrize("qname", ["W8A8", "W4A4", "W8A8L4"])  # W8A8L4: 8-bit activations, a 4-bit latent cache
@torch.no_grad()
def test_decode_through_the_latent_cache_matches_recompute(llama, quantized, backend, qname):
    """Logits of one-token decode steps (latent_attention on the ops) against
    the same compressed model run on the whole sequence at once (prefill:
    latent_reconstruct_kv + SDPA), for a left-padded batch. Both read the
    same quantized latents, so the gap is fp32 attention rounding: O(1e-6)
    relative to the logits' scale."""
    model, _ = llama
    cm = quantized[qname]
    m = hf.apply_qsvd(copy.deepcopy(model), cm, backend=backend)
    full = _prompt(3, 10, seed=23)
    ids, mask = _left_padded([full[0], full[1, :6], full[2, :3]])
    seq, _ = hf.generate(m, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    seq_mask = torch.cat([mask, torch.ones(3, seq.shape[1] - ids.shape[1], dtype=torch.long)], 1)
    pos = _positions(seq_mask)
    whole = m(seq, attention_mask=seq_mask, position_ids=pos).logits
    cache = hf.QSVDLatentCache(m)
    kw = {hf.cache_keyword(): cache}
    P = ids.shape[1]
    steps = [m(seq[:, :P], attention_mask=seq_mask[:, :P], position_ids=pos[:, :P], **kw).logits]
    for t in range(P, seq.shape[1]):
        steps.append(m(seq[:, t : t + 1], attention_mask=seq_mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                       **kw).logits)
    stepped = torch.cat(steps, dim=1)
    real = seq_mask.bool()
    scale = float(whole.abs().max())
    assert torch.allclose(stepped[real], whole[real], rtol=0, atol=1e-5 * max(scale, 1.0)), \
        float((stepped - whole)[real].abs().max())
    if backend == "ops":
        bits = cm.layers[0].quant.latent_bits
        assert cache.token_nbytes() == sum(r * bits / 8 + 4 for r in cm.ranks)
        assert cache.seq_lens.tolist() == seq_mask.sum(1).tolist()


@torch.no_grad()
def test_a_block_that_cannot_find_the_cache_raises_instead_of_computing(llama, quantized):
    model, _ = llama
    m = hf.apply_qsvd(copy.deepcopy(model), quantized["W8A8"])
    prompt = _prompt(2, 6)
    block = m.model.layers[0].self_attn
    x = torch.randn(2, 1, model.config.hidden_size)
    cos, sin = m.model.rotary_emb(x, torch.tensor([[6], [6]]))
    # a decode step handed to the block with no cache (as if a transformers
    # release passed it under a name nothing knows)
    with pytest.raises(RuntimeError, match="found no QSVDLatentCache"):
        block(x, position_embeddings=(cos, sin), attention_mask=None, use_cache=True, some_new_cache_name=object())
    # the decoder stack's hook removed: generate's own cache never reaches the blocks as a QSVD one
    m.model._forward_pre_hooks.clear()
    m.model._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="found no QSVDLatentCache"):
        m.generate(prompt, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(prompt))


@torch.no_grad()
def test_a_failed_step_is_abandoned_and_frees_its_blocks(llama, full_rank, monkeypatch):
    model, _ = llama
    prompt = _prompt(2, 8, seed=29)
    cache = hf.QSVDLatentCache(full_rank, block_size=2)
    kw = {hf.cache_keyword(): cache}
    full_rank(prompt[:, :4], **kw)
    live = int((cache.refcount > 0).sum())
    layer1 = full_rank.model.layers[1].self_attn

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(layer1.projector, "latent", boom)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="injected"):
            full_rank(prompt[:, 4:8], **kw)
    monkeypatch.undo()
    assert int((cache.refcount > 0).sum()) == live and cache.step is None and cache.get_seq_length() == 4
    step = full_rank(prompt[:, 4:8], **kw).logits
    assert torch.allclose(step, model(prompt).logits[:, 4:8], atol=1e-5)


def test_training_with_gradient_checkpointing_is_refused(llama, full_rank):
    m = copy.deepcopy(full_rank)
    if hasattr(m, "activation_checkpointing_enable"):  # transformers 5.2x's name
        m.activation_checkpointing_enable({"use_reentrant": False})
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        m(_prompt(1, 4))


@torch.no_grad()
def test_casting_the_model_keeps_the_ops_operands_fp32(llama, quantized):
    model, _ = llama
    m = hf.apply_qsvd(copy.deepcopy(model), quantized["W8A8"]).to(torch.bfloat16)
    proj = m.model.layers[0].self_attn.projector
    assert proj.signs.dtype == proj.wd_scale.dtype == torch.float32 and proj.wd.dtype == torch.int8
    got, _ = hf.generate(m, _prompt(1, 5), max_new_tokens=3, do_sample=False)
    assert got.shape == (1, 8)


@torch.no_grad()
def test_cache_misuse_is_refused(llama, quantized):
    from transformers import DynamicCache

    model, _ = llama
    cm = quantized["W8A8"]
    m = hf.apply_qsvd(copy.deepcopy(model), cm)
    prompt = _prompt(2, 6)
    # a cache of the uncompressed model, holding K/V: refused, not ignored
    used = DynamicCache(config=model.config)
    model(prompt, **{hf.cache_keyword(): used})
    with pytest.raises(TypeError, match="QSVDLatentCache"):
        m(prompt[:, -1:], **{hf.cache_keyword(): used})
    # padding without position_ids would rotate padding positions
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="position_ids"):
        m(prompt, attention_mask=mask)
    # a refused first step leaves the cache usable for another batch
    fresh = hf.QSVDLatentCache(m)
    with pytest.raises(ValueError, match="position_ids"):
        m(prompt, attention_mask=mask, **{hf.cache_keyword(): fresh})
    m(prompt[:1], **{hf.cache_keyword(): fresh})
    assert fresh.batch_size == 1 and fresh.get_seq_length() == 6
    # a padded history, then a step without its mask
    padded = hf.QSVDLatentCache(m)
    m(prompt, attention_mask=mask, position_ids=_positions(mask), **{hf.cache_keyword(): padded})
    with pytest.raises(ValueError, match="attention_mask is required"):
        m(prompt[:, -1:], **{hf.cache_keyword(): padded})
    # right padding: the prefill is representable, the next column's position is not
    right = torch.ones_like(prompt)
    right[0, -2:] = 0
    rcache = {hf.cache_keyword(): hf.QSVDLatentCache(m)}
    m(prompt, attention_mask=right, position_ids=torch.arange(6).expand(2, 6), **rcache)
    with pytest.raises(ValueError, match="position_ids"):
        m(prompt[:, -1:], attention_mask=torch.cat([right, torch.ones(2, 1, dtype=right.dtype)], 1),
          position_ids=torch.tensor([[6], [6]]), **rcache)
    # a 4D mask
    with pytest.raises(NotImplementedError, match="2D attention_mask"):
        m(prompt, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))
    # a cache of another model, or of another batch size
    other = hf.apply_qsvd(copy.deepcopy(model), cm)
    with pytest.raises(ValueError, match="another model"):
        m(prompt, **{hf.cache_keyword(): hf.QSVDLatentCache(other)})
    cache = hf.QSVDLatentCache(m)
    m(prompt, **{hf.cache_keyword(): cache})
    with pytest.raises(ValueError, match="holds 2 sequences"):
        m(prompt[:1, :1], **{hf.cache_keyword(): cache})
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(3)
    with pytest.raises(ValueError, match="call apply_qsvd"):
        hf.QSVDLatentCache(model)
    with pytest.raises(ValueError, match="already applied"):
        hf.apply_qsvd(m, cm)
    with pytest.raises(ValueError, match="quantized weights, activations and latent"):
        hf.apply_qsvd(copy.deepcopy(model), qc.CompressedModel(cm.site_names, [
            l for l in llama[1].compress(qc.CompressionConfig(qc.Budget("r2", 0.5), allocation="uniform")).layers],
            {}), backend="ops")
