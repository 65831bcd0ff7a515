"""The model-family table: every family it lists is recognised from a real
transformers model built from a small config, with the right projections,
head counts, kind and part; unknown blocks are duck-typed and say so."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers")

import transformers as tr  # noqa: E402

from qsvd_kernels.model import FAMILIES, find_attention_sites, select_sites  # noqa: E402
from qsvd_kernels.model.families import family_of  # noqa: E402

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _llava():
    vis = tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = tr.LlavaConfig(vision_config=vis, text_config=tr.LlamaConfig(**TEXT), image_token_id=127,
                         vision_feature_layer=-1)
    return tr.LlavaForConditionalGeneration(cfg)


def _idefics3():
    vis = tr.Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    return tr.Idefics3ForConditionalGeneration(tr.Idefics3Config(vision_config=vis, text_config=tr.LlamaConfig(**TEXT),
                                                                 scale_factor=2, image_token_id=127))


# (family, model factory, expected (H, H_kv, d), kind, part) — one row per entry of the table
CASES = {
    "llama": (lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**TEXT)), (4, 2, 16), "decoder", "language"),
    "mistral": (lambda: tr.MistralForCausalLM(tr.MistralConfig(**TEXT)), (4, 2, 16), "decoder", "language"),
    "qwen2": (lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**TEXT)), (4, 2, 16), "decoder", "language"),
    "bert": (lambda: tr.BertModel(tr.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128)),
             (4, 4, 16), "encoder", "text"),
    "clip": (lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=2, image_size=32, patch_size=8)),
             (2, 2, 16), "encoder", "vision"),
    "siglip": (lambda: tr.SiglipVisionModel(tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=2, num_attention_heads=2,
                                                                  image_size=32, patch_size=8)),
               (2, 2, 16), "encoder", "vision"),
    "idefics3-vision": (_idefics3, (2, 2, 16), "encoder", "vision"),
}


def test_every_family_in_the_table_has_a_case():
    assert sorted(f.name for f in FAMILIES) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_is_recognised(name):
    make, heads, kind, part = CASES[name]
    torch.manual_seed(0)
    sites = [s for s in find_attention_sites(make()) if s.family.name == name]
    assert len(sites) == 2
    for s in sites:
        assert (s.dims.num_heads, s.dims.num_kv_heads, s.dims.head_dim) == heads
        assert s.family.kind == kind and s.part == part and not s.family.duck_typed
        assert s.keeps_cache == (kind == "decoder")
        assert all(isinstance(l, nn.Linear) for l in s.linears)


@pytest.mark.parametrize("make,vision,language", [(_llava, "model.vision_tower.", "model.language_model."),
                                                  (_idefics3, "model.vision_model.", "model.text_model.")])
def test_vision_language_parts_and_layer_selection(make, vision, language):
    model = make()
    sites = find_attention_sites(model)
    assert {s.part for s in sites} == {"vision", "language"}
    assert all(s.name.startswith(vision) for s in sites if s.part == "vision")
    assert all(s.name.startswith(language) and s.keeps_cache for s in sites if s.part == "language")
    assert [s.name for s in select_sites(model, "language")] == [s.name for s in sites if s.part == "language"]
    assert [s.name for s in select_sites(model, "vision")] == [s.name for s in sites if s.part == "vision"]
    assert len(select_sites(model, "all")) == len(sites) == 4
    picked = select_sites(model, lambda s: s.part == "language" and s.name.endswith("0.self_attn"))
    assert [s.name for s in picked] == [language + "layers.0.self_attn"]
    with pytest.raises(ValueError, match="layers must be one of"):
        select_sites(model, "text-only")
    with pytest.raises(ValueError, match="selects none"):
        select_sites(model, lambda s: False)


def test_unknown_blocks_are_duck_typed_and_say_so():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = 2, 8
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, 16) for _ in range(3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MyAttention()

    (site,) = find_attention_sites(Net())
    assert site.family.duck_typed and site.family.name == "duck-typed (MyAttention)"
    assert not site.keeps_cache and site.dims.num_heads == 2
    assert family_of(nn.Linear(4, 4)) is None


def test_an_unsupported_decoder_feature_is_refused_naming_the_family():
    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations import hf
    from qsvd_kernels.integrations import models as M

    if not hasattr(tr, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    cfg = tr.Qwen3Config(**{**TEXT, "head_dim": 16})
    model = tr.Qwen3ForCausalLM(cfg).eval()
    comp = qc.Compressor(model, M.random_token_batches(128, 8, 16, seed=0), progress=False)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), allocation="uniform"))
    with pytest.raises(NotImplementedError, match=r"duck-typed \(Qwen3Attention\)\) uses q_norm"):
        hf.apply_qsvd(model, cm, backend="torch")


def test_a_duck_typed_decoder_needs_an_opt_in():
    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations import hf
    from qsvd_kernels.integrations import models as M

    # LLaMA attention under a class the table does not know (a custom model's block)
    my_attention = type("MyAttention", (nn.Module,), {"forward": tr.models.llama.modeling_llama.LlamaAttention.forward})
    model = tr.LlamaForCausalLM(tr.LlamaConfig(**TEXT)).eval()
    for layer in model.model.layers:
        layer.self_attn.__class__ = my_attention
    comp = qc.Compressor(model, M.random_token_batches(128, 8, 16, seed=0), progress=False)
    assert all(s.family.duck_typed for s in comp.sites)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), allocation="uniform"))
    with pytest.raises(NotImplementedError, match="not in the model-family table"):
        hf.apply_qsvd(model, cm, backend="torch")
    hf.apply_qsvd(model, cm, backend="torch", allow_duck_typed=True)
    assert model(torch.ones(1, 4, dtype=torch.long)).logits.shape == (1, 4, 128)


@pytest.mark.parametrize("make", [
    lambda: tr.MistralForCausalLM(tr.MistralConfig(**TEXT, sliding_window=4)),  # window on the config
    lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**TEXT, sliding_window=4, use_sliding_window=True,
                                               max_window_layers=0)),  # window on the module
])
def test_a_context_past_the_sliding_window_is_refused(make):
    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations import hf
    from qsvd_kernels.integrations import models as M

    torch.manual_seed(0)
    model = make().eval()
    comp = qc.Compressor(model, M.random_token_batches(128, 8, 16, seed=0), progress=False)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), allocation="uniform"))
    hf.apply_qsvd(model, cm, backend="torch")
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long))  # within the window: served
        with pytest.raises(NotImplementedError, match="sliding window"):
            model(torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize("extra, refused", [
    (dict(attn_logit_softcapping=30.0), "soft-capping"),
    (dict(clip_qkv=8.0), "clip_qkv"),
    (dict(partial_rotary_factor=0.5), "partial rotary"),
    (dict(llama_4_scaling={"beta": 0.1}), "Llama-4"),
])
def test_one_rule_refuses_config_features_for_every_integration(extra, refused):
    """The family table's config rule is the one every integration asks (the
    HF block through its module's config, vLLM's plugin from the config
    alone): the same features refused, by name, and none on a plain config."""
    from qsvd_kernels.model.families import family_of_architecture

    fam = family_of_architecture("LlamaForCausalLM")
    assert fam.config_unsupported(tr.LlamaConfig(**TEXT)) == []
    cfg = tr.LlamaConfig(**TEXT)
    for k, v in extra.items():
        setattr(cfg, k, v)
    found = fam.config_unsupported(cfg)
    assert len(found) == 1 and refused in found[0]
    module = tr.LlamaForCausalLM(tr.LlamaConfig(**TEXT)).model.layers[0].self_attn
    module.config = cfg
    assert fam.unsupported(module) == found


def test_one_rule_reads_a_configs_sliding_window():
    """Mistral: the config's window; Qwen2: only with use_sliding_window,
    and only on the layers layer_types marks; Llama: none."""
    from qsvd_kernels.model.families import config_sliding_window

    assert config_sliding_window(tr.LlamaConfig(**TEXT)) is None
    assert config_sliding_window(tr.MistralConfig(**TEXT, sliding_window=4)) == 4
    assert config_sliding_window(tr.Qwen2Config(**TEXT, sliding_window=4)) is None  # use_sliding_window=False
    qwen = tr.Qwen2Config(**TEXT, sliding_window=4, use_sliding_window=True, max_window_layers=1)
    assert [config_sliding_window(qwen, i) for i in range(2)] == [
        4 if t == "sliding_attention" else None for t in qwen.layer_types]
    assert config_sliding_window(qwen) == (4 if "sliding_attention" in qwen.layer_types else None)


def test_dual_encoder_text_and_vision_towers_are_told_apart():
    cfg = tr.CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    model = tr.CLIPModel(cfg)
    parts = {s.name: s.part for s in find_attention_sites(model)}
    assert sorted(parts.values()) == ["text", "vision"]
    assert [s.name for s in select_sites(model, "vision")] == [n for n, p in parts.items() if p == "vision"]
