"""Hugging Face models on the qsvd ops: biases, refused variants, backends,
artefacts, encoders, and the CLI end to end (generation: test_generation.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers")

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.cli import main as cli_main  # noqa: E402
from qsvd_kernels.integrations import hf  # noqa: E402
from qsvd_kernels.integrations import models as M  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_llama_compressor):
    model, comp = tiny_llama_compressor
    prompt = M.random_token_batches(model.config.vocab_size, 3, 10, batch_size=3, seed=5)[0]["input_ids"]
    return model, comp, prompt


def _gen(model, prompt, n=16, cache=True):
    kw = dict(max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        if cache:
            return hf.generate(model, prompt, **kw)
        return model.generate(prompt, **kw), None


def test_v_bias_on_the_ops_decoder():
    """A model with a V bias (and a zero K bias, which RoPE would rotate): the
    ops decoder adds b_v after softmax; it must match the torch backend."""
    model, _, _ = M.tiny_llama(seed=3, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.v_proj.bias.normal_()
    comp = qc.Compressor(model, M.random_token_batches(256, 16, 32, seed=0), progress=False)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse("W8A8"),
                                            allocation="uniform"))
    prompt = M.random_token_batches(256, 2, 9, batch_size=2, seed=1)[0]["input_ids"]
    outs = []
    for backend in ("ops", "torch"):
        m = hf.apply_qsvd(copy.deepcopy(model), cm, backend=backend)
        with torch.no_grad():
            cache = hf.QSVDLatentCache(m)
            m(prompt[:, :-1], **{hf.cache_keyword(): cache})
            outs.append(m(prompt[:, -1:], **{hf.cache_keyword(): cache}).logits)  # the decode path
    assert torch.allclose(outs[0], outs[1], atol=1e-4 * float(outs[1].abs().max()))
    with pytest.raises(NotImplementedError, match="K bias under RoPE"):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.model.layers[0].self_attn.k_proj.bias.fill_(0.1)
        comp2 = qc.Compressor(bad, M.random_token_batches(256, 16, 32, seed=0), progress=False)
        hf.apply_qsvd(bad, comp2.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32),
                                                               qc.QuantConfig.parse("W8A8"), allocation="uniform")))


def test_ops_and_torch_backends_agree(llama):
    model, comp, prompt = llama
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse("W8A8")),
                       qc.causal_lm_fisher_loss())
    with torch.no_grad():
        a = hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops")(prompt).logits
        b = hf.apply_qsvd(copy.deepcopy(model), cm, backend="torch")(prompt).logits
    assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def test_save_load_then_generate(llama, tmp_path):
    model, comp, prompt = llama
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 48), qc.QuantConfig.parse("W8A4")),
                       qc.causal_lm_fisher_loss())
    cm.save(str(tmp_path))
    loaded = qc.CompressedModel.load(str(tmp_path))
    a, _ = _gen(hf.apply_qsvd(copy.deepcopy(model), cm), prompt)
    b, _ = _gen(hf.apply_qsvd(copy.deepcopy(model), loaded), prompt)
    assert torch.equal(a, b)


def test_vision_encoder_runs_on_the_ops():
    """A SigLIP-style vision tower (no RoPE, no cache): compress, then run it
    on the ops; its output matches the compressed model's torch simulation."""
    tr = pytest.importorskip("transformers")
    cfg = tr.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = tr.SiglipVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g)} for _ in range(4)]
    pooled = lambda m, b: m(**b).pooler_output  # noqa: E731
    cm = qc.compress_model(model, calib, qc.CompressionConfig(qc.Budget("r2", 0.2), qc.QuantConfig.parse("W8A8")),
                           loss_fn=qc.random_projection_loss(pooled), progress=False)
    x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    with torch.no_grad():
        ref = model(**x).pooler_output
        with qc.swapped_projections(model, cm):
            sim = model(**x).pooler_output
        got = hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops")(**x).pooler_output
    assert torch.allclose(got, sim, atol=1e-4 * float(sim.abs().max()))
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert bool((cos > 0.9).all()), cos


def test_cli_compress_eval_bench_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    assert cli_main(["compress", "--model", "tiny-llama", "--out", out, "--budget", "r2=40%", "--quant", "W8A8",
                     "--calib-samples", "16", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "ranks" in text and os.path.exists(os.path.join(out, "ranks.png"))
    assert cli_main(["eval", "--model", "tiny-llama", "--artefact", out]) == 0
    res = json.loads(capsys.readouterr().out)
    # R2 with bits (W8A8), as the paper counts: spent to within one rank block.
    assert res["backend"] == "ops" and 0 <= res["next_token_agreement"] <= 1 and 0.3 < res["r2"] <= 0.4
    assert res["cache_bytes_per_token"] < res["fp16_kv_bytes_per_token"]
    assert cli_main(["bench", "--hidden", "256", "--heads", "4", "--rank", "64", "--context", "64",
                     "--steps", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kv_bytes_ratio"] == pytest.approx((64 + 4) / (2 * 256 * 2))
    assert res["qsvd_step_ms"] > 0 and res["baseline_step_ms"] > 0


def test_cli_compress_and_eval_minilm(tmp_path, capsys):
    out = str(tmp_path / "minilm")
    assert cli_main(["compress", "--model", "minilm", "--out", out, "--budget", "r2=0.15", "--quant", "W8A8",
                     "--calib-samples", "128", "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--model", "minilm", "--artefact", out, "--eval-samples", "128"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mean_cosine"] > 0.98 and res["backend"] == "ops"


@pytest.mark.parametrize("argv,message", [
    (["compress", "--model", "tiny-llama", "--out", "X", "--budget", "r2=1.5"], "below 100 %"),
    (["compress", "--model", "tiny-llama", "--out", "X", "--budget", "r2=0.001"], "below what the minimum rank"),
    (["compress", "--model", "tiny-llama", "--out", "X", "--budget", "nonsense"], "--budget must look like"),
    (["compress", "--model", "tiny-llama", "--out", "X", "--quant", "W3A3"], "unknown quantization setting"),
    (["compress", "--model", "/no/such/dir", "--out", "X"], "not 'minilm', 'smollm2', 'tiny-llama' or a local model"),
    (["eval", "--model", "tiny-llama", "--artefact", "/no/such/dir"], "not a qsvd-kernels artefact"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a if a != "X" else str(tmp_path / "x") for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and message in err


def test_cli_refuses_an_unsupported_architecture(tmp_path):
    tr = pytest.importorskip("transformers")
    cfg = tr.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    tr.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    out = subprocess.run([sys.executable, "-m", "qsvd_kernels", "compress", "--model", str(tmp_path / "gpt2"),
                          "--out", str(tmp_path / "o"), "--calib-samples", "8"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "no supported attention layers" in out.stderr
