"""Vision-language models end to end, the paper's target: LLaVA (CLIP tower,
projector, LLaMA) and SmolVLM/Idefics3 (SigLIP-style tower, LLaMA), built
from local configs with random weights. Compressed in one call, then
``generate()`` with ``pixel_values`` through the latent cache, with the
vision tower's attention on the ops too."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers")

import transformers as tr  # noqa: E402

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.integrations import hf  # noqa: E402
from qsvd_kernels.model import ProjectionSlot, find_attention_sites  # noqa: E402

IMAGE_TOKEN = 299
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _llava():
    vis = tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = tr.LlavaConfig(vision_config=vis, text_config=tr.LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1)
    return tr.LlavaForConditionalGeneration(cfg).eval(), 16, (3, 32, 32)


def _idefics3():
    vis = tr.Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    cfg = tr.Idefics3Config(vision_config=vis, text_config=tr.LlamaConfig(**TEXT), scale_factor=2,
                            image_token_id=IMAGE_TOKEN)
    return tr.Idefics3ForConditionalGeneration(cfg).eval(), 4, (1, 3, 32, 32)


def _batch(image_tokens, pixel_shape, n, seed, text=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n, image_tokens), IMAGE_TOKEN), torch.randint(3, IMAGE_TOKEN, (n, text), generator=g)],
                    1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n, *pixel_shape, generator=g)}


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def vlm(request):
    torch.manual_seed(0)
    model, image_tokens, pixel_shape = {"llava": _llava, "idefics3": _idefics3}[request.param]()
    model.generation_config.pad_token_id = 0
    calib = [_batch(image_tokens, pixel_shape, 4, seed) for seed in range(4)]
    comp = qc.Compressor(model, calib, progress=False)
    return request.param, model, comp, _batch(image_tokens, pixel_shape, 2, 100)


@torch.no_grad()
def test_full_rank_vlm_generates_the_original_tokens_with_an_image(vlm):
    name, model, comp, batch = vlm
    ranks = [s.dims.max_rank for s in comp.sites]
    assert {s.part for s in comp.sites} == {"vision", "language"}  # both compressed, in one call
    cm = comp.compress(qc.CompressionConfig(qc.Budget("r1", 0.5), ranks=ranks))
    m = hf.apply_qsvd(copy.deepcopy(model), cm, backend="torch")
    kw = dict(max_new_tokens=10, do_sample=False)
    ref = model.generate(**batch, **kw)
    got, cache = hf.generate(m, **batch, **kw)
    assert torch.equal(got, ref), name
    L = batch["input_ids"].shape[1]
    assert cache.seq_lens.tolist() == [L + 9] * 2 and cache.nbytes() > 0


@torch.no_grad()
def test_w8a8_vlm_on_the_ops_vision_tower_included(vlm):
    name, model, comp, batch = vlm
    cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.2), qc.QuantConfig.parse("W8A8")),
                       qc.causal_lm_fisher_loss())
    m = hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops")
    vision = [s for s in find_attention_sites(model) if s.part == "vision"]
    for s in vision:  # the tower's q/k/v now come from quant_gemm on the quantized latent
        assert isinstance(getattr(m.get_submodule(s.name), s.attrs[0]), ProjectionSlot)
    got, cache = hf.generate(m, **batch, max_new_tokens=6, do_sample=False)
    assert got.shape == (2, batch["input_ids"].shape[1] + 6)
    assert cache.token_nbytes() == sum(r + 4 for r, s in zip(cm.ranks, comp.sites) if s.keeps_cache)
    # R2 counts only the decoder layers (they keep a cache); R1 counts all.
    a, lang = cm.info["achieved"], [s.keeps_cache for s in comp.sites]
    assert cm.info["keeps_cache"] == lang
    assert a["r2"] == pytest.approx(sum(r for r, k in zip(cm.ranks, lang) if k) * 8 /
                                    sum(2 * s.dims.kv_dim * 16 for s in comp.sites if s.keeps_cache))
    assert a["r2"] <= 0.2
    lat = [qc.LatentDims(s.dims, cm.info["latent_form"]) for s in comp.sites]  # the form "auto" chose
    assert a["r1"] == pytest.approx(sum(r * (d.hidden + d.cols) + d.fixed_weights for r, d in zip(cm.ranks, lat))
                                    * 8 / sum(s.dims.hidden * s.dims.out_dim * 16 for s in comp.sites))
    # the tower's layers are not counted by R2, so they keep their largest aligned rank
    assert all(r == (d.max_rank // 16) * 16 for r, d, s in zip(cm.ranks, lat, comp.sites) if not s.keeps_cache)
    # decode through the latent cache against recomputing the whole sequence
    seq = got[:, :-1]
    kw = {k: v for k, v in batch.items() if k != "input_ids" and k != "attention_mask"}
    whole = m(input_ids=seq, attention_mask=torch.ones_like(seq), **kw).logits[:, -1]
    c = {hf.cache_keyword(): hf.QSVDLatentCache(m)}
    m(input_ids=seq[:, :-1], attention_mask=torch.ones_like(seq[:, :-1]), **kw, **c)
    step = m(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq), **c).logits[:, -1]
    assert torch.allclose(step, whole, rtol=0, atol=1e-5 * max(1.0, float(whole.abs().max())))


@torch.no_grad()
@pytest.mark.parametrize("layers", ["language", "vision"])
def test_compressing_one_part_only(vlm, layers):
    name, model, comp, batch = vlm
    c = qc.Compressor(model, comp.calibration, progress=False, layers=layers)
    assert c.sites and all((s.part == "vision") == (layers == "vision") for s in c.sites)
    budget = qc.Budget("r2", 0.2) if layers == "language" else qc.Budget("r1", 0.5)
    cm = c.compress(qc.CompressionConfig(budget, qc.QuantConfig.parse("W8A8"), allocation="uniform"))
    assert cm.info["layers"] == layers
    m = hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops")
    kw = dict(max_new_tokens=4, do_sample=False)
    if layers == "language":
        got, cache = hf.generate(m, **batch, **kw)
        assert cache.nbytes() > 0
    else:  # no decoder block compressed: the model keeps its own KV cache
        assert getattr(m, "_qsvd_stack", None) is None
        got = m.generate(**batch, **kw)
        with pytest.raises(ValueError, match="no QSVD decoder attention"):
            hf.QSVDLatentCache(m)
    assert got.shape[1] == batch["input_ids"].shape[1] + 4
    if layers == "vision":  # a vision tower keeps no cache: an R2 budget has nothing to count
        with pytest.raises(ValueError, match="R2 budget counts only the layers that keep a KV cache"):
            c.compress(qc.CompressionConfig(qc.Budget("r2", 0.2), allocation="uniform"))
