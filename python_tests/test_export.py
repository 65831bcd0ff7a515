"""`python -m qsvd_kernels export --format vllm`: the model directory a
serving engine loads, and everything it refuses (before writing anything).
Runs wherever transformers is installed (no vLLM needed); serving the
result is python_tests/test_vllm.py's job."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers", reason="export reads Hugging Face model directories (pip install "
                                               "'qsvd-kernels[hf]'); CI sets QSVD_REQUIRE_MINILM=1, so it runs there")

from qsvd_kernels import cli  # noqa: E402
from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.integrations import models as M  # noqa: E402
from qsvd_kernels.integrations.export import export_vllm  # noqa: E402

TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, _, _ = M.tiny_llama(seed=0, **TINY)
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text("{}")  # a side file export must carry along
    comp = qc.Compressor(model, M.random_token_batches(model.config.vocab_size, 16, 32, seed=0), progress=False)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 64), qc.QuantConfig.parse("W8A8"),
                                            allocation="uniform"))
    cm.save(root / "art")
    return root, model, cm


def test_export_writes_a_self_contained_model_directory(made, tmp_path):
    from safetensors.torch import load_file

    root, model, cm = made
    out = tmp_path / "vllm"
    assert cli.main(["export", "--format", "vllm", "--model", str(root / "hf"), "--artefact", str(root / "art"),
                     "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["QSVDLlamaForCausalLM"]
    q = cfg["qsvd"]
    assert q["ranks"] == cm.ranks and q["base_architecture"] == "LlamaForCausalLM" and q["family"] == "llama"
    assert q["quant"] == [l.quant.to_dict() for l in cm.layers]
    assert q["layers"] == [l.spec().to_dict() for l in cm.layers]  # the one schema (model/layer_tensors.py)
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    tensors = load_file(out / "model.safetensors")
    for i, layer in enumerate(cm.layers):
        kt = layer.kernel_tensors()
        prefix = f"model.layers.{i}.self_attn.qsvd."
        assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {n for n, t in kt.items() if t is not None}
        for name, t in kt.items():
            if t is not None:
                assert torch.equal(tensors[prefix + name], t), name
        for proj in ("q_proj", "k_proj", "v_proj"):  # replaced by the latent factors
            assert f"model.layers.{i}.self_attn.{proj}.weight" not in tensors
    sd = model.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight", "model.norm.weight",
                "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(tensors[key], sd[key])


def test_export_refuses_what_it_cannot_serve_and_writes_nothing(made, tmp_path, capsys):
    root, _, _ = made
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no such directory"):
        export_vllm(str(root / "hf"), str(tmp_path / "missing"), str(out))
    # the CLI: one error line, exit status 2
    assert cli.main(["export", "--format", "vllm", "--model", str(root / "hf"), "--artefact",
                     str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    # another architecture
    other = tmp_path / "gpt2"
    shutil.copytree(root / "hf", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*is not served by the vLLM integration"):
        export_vllm(str(other), str(root / "art"), str(out))
    # a corrupt artefact
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "art", corrupt)
    data = bytearray((corrupt / "qsvd_layers.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "qsvd_layers.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        export_vllm(str(root / "hf"), str(corrupt), str(out))
    # an artefact of another model (one layer fewer)
    small = tmp_path / "small"
    model, _, _ = M.tiny_llama(seed=1, num_hidden_layers=1, **TINY)
    model.save_pretrained(small)
    with pytest.raises(ValueError, match="does not match"):
        export_vllm(str(small), str(root / "art"), str(out))
    # an unquantized artefact: the kernels need W8A8 / W4A4
    fp = tmp_path / "fp"
    comp = qc.Compressor(M.tiny_llama(seed=0, **TINY)[0], M.random_token_batches(256, 16, 32, seed=0), progress=False)
    comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 64), qc.QuantConfig.parse("fp"),
                                       allocation="uniform")).save(fp)
    with pytest.raises(ValueError, match="W8A8 or W4A4"):
        export_vllm(str(root / "hf"), str(fp), str(out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qsvd-export-")]
    # an existing, non-empty destination is never overwritten
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_vllm(str(root / "hf"), str(root / "art"), str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_export_refuses_a_k_bias_under_rope(tmp_path):
    """Qwen2 checkpoints carry q/k/v biases. A K bias under RoPE adds a
    position-dependent term to every score after rotation, which
    latent_attention does not model: refused, clearly, before writing."""
    import transformers as tr

    torch.manual_seed(0)
    model = tr.Qwen2ForCausalLM(tr.Qwen2Config(vocab_size=256, num_hidden_layers=1, max_position_embeddings=512,
                                               **TINY)).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.normal_()
    model.save_pretrained(tmp_path / "hf")
    comp = qc.Compressor(model, M.random_token_batches(256, 16, 32, seed=0), progress=False)
    comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 64), qc.QuantConfig.parse("W8A8"),
                                       allocation="uniform")).save(tmp_path / "art")
    with pytest.raises(ValueError, match="K bias under RoPE"):
        export_vllm(str(tmp_path / "hf"), str(tmp_path / "art"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
