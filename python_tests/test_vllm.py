"""Serving QSVD models on vLLM (qsvd_kernels.integrations.vllm), on the CPU.

Runs in the vLLM venv (requirements-vllm.txt; CI's third pass sets
QSVD_REQUIRE_VLLM=1 so nothing here can skip there); skipped where vLLM is
not installed. Each engine runs in its own process
(``qsvd_kernels.integrations.vllm.run``): one vLLM engine per process.

The yardstick is the Hugging Face integration on the same artefact: greedy
tokens must be equal, token for token, under chunked prefill, prefix-cache
hits, a batch of different lengths, INT8 and INT4, both latent forms (the
W8A8 artefact is in the "kv" form, the W4A4 one in the paper's "qkv"), and
tensor parallelism. On the real SmolLM2-135M, whose greedy choices can be
near-ties that one rounding flips, vLLM's tokens and log-probabilities are
checked against the HF integration's logits on the same sequences.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

if not os.environ.get("QSVD_REQUIRE_VLLM"):
    pytest.importorskip("vllm", reason="vLLM is not installed here: these tests run in the vLLM venv (README "
                                       "'Serving on vLLM'; CI's vLLM pass sets QSVD_REQUIRE_VLLM=1)")
    pytest.importorskip("transformers", reason="the vLLM tests compare against the Hugging Face integration")

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels import formats  # noqa: E402
from qsvd_kernels.integrations import hf  # noqa: E402
from qsvd_kernels.integrations import models as M  # noqa: E402
from qsvd_kernels.integrations.export import export_vllm  # noqa: E402

KV_SPACE_GIB = 1
BLOCK = 32  # vLLM's CPU attention (the uncompressed baseline) takes multiples of 32
MAX_TOKENS = 10
# hidden 128, 4 heads of 32 (vLLM's CPU attention, the uncompressed baseline, needs d >= 32), 2 kv heads
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
CHUNK = 32  # max_num_batched_tokens: the 40- and 70-token prompts are prefilled in chunks


def _prompts():
    g = torch.Generator().manual_seed(7)
    first = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 19, 40, 70)]
    # The second round shares 64 tokens (4 blocks) with the 70-token prompt: a prefix-cache hit.
    second = [first[3][:64] + torch.randint(1, 256, (n,), generator=g).tolist() for n in (3, 9)]
    return [first, second]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model, _, _ = M.tiny_llama(seed=0, **TINY)
    model.save_pretrained(root / "hf")
    comp = qc.Compressor(model, M.random_token_batches(model.config.vocab_size, 32, 48, seed=0), progress=False)
    out = {"root": root, "model": model}
    for q, form in (("W8A8", "kv"), ("W4A4", "qkv")):
        cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 64), qc.QuantConfig.parse(q), latent=form),
                           qc.causal_lm_fisher_loss())
        assert cm.info["latent_form"] == form
        cm.save(root / f"art-{q}")
        export_vllm(str(root / "hf"), str(root / f"art-{q}"), str(root / f"vllm-{q}"))
        out[q] = cm
    # Partial RoPE (issue 22): d/4 of each head's dims rotary, the rest absorbed.
    partial = out["W8A8"].with_rope_dims(8)
    partial.save(root / "art-W8A8-rope8")
    export_vllm(str(root / "hf"), str(root / "art-W8A8-rope8"), str(root / "vllm-W8A8-rope8"))
    out["W8A8-rope8"] = partial
    return out


def _hf_greedy(exported, quant: str, prompts, max_tokens: int = MAX_TOKENS,
               rope_key_cache: str = "auto") -> list[list[int]]:
    """The Hugging Face integration's greedy tokens, one prompt at a time."""
    model = hf.apply_qsvd(copy.deepcopy(exported["model"]), exported[quant], backend="ops",
                          rope_key_cache=rope_key_cache)
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos: both generate MAX_TOKENS
    got = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out, _ = hf.generate(model, ids, max_new_tokens=max_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(ids))
            got.append(out[0, len(p):].tolist())
    return got


def _run_vllm(tmp_path, spec: dict, env_extra: dict | None = None, expect_ok: bool = True):
    spec = {"dtype": "float32", "max_model_len": 256, "block_size": BLOCK, "max_tokens": MAX_TOKENS, **spec}
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=str(KV_SPACE_GIB), **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "qsvd_kernels.integrations.vllm.run", str(spec_path),
                           str(out_path)], env=env, capture_output=True, text=True, timeout=600)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out_path.read_text())


@pytest.mark.parametrize("quant", ["W8A8", "W4A4"])
def test_greedy_tokens_equal_the_hf_integration_under_chunked_prefill_and_prefix_caching(exported, quant,
                                                                                         tmp_path):
    rounds = _prompts()
    assert max(len(p) for p in rounds[0]) > CHUNK  # some prompts are prefilled in chunks
    got = _run_vllm(tmp_path, {"model": str(exported["root"] / f"vllm-{quant}"), "rounds": rounds,
                               "max_num_batched_tokens": CHUNK, "max_num_seqs": 8, "enable_prefix_caching": True})
    for r, prompts in enumerate(rounds):
        assert got["rounds"][r]["tokens"] == _hf_greedy(exported, quant, prompts), f"round {r}"
    # The second round really hit the prefix cache (whole blocks of the shared 64 tokens).
    assert min(got["rounds"][1]["num_cached_tokens"]) >= BLOCK, got["rounds"][1]["num_cached_tokens"]


@pytest.mark.parametrize("form", ["auto", "rebuilt"])
def test_partial_rope_serves_the_hf_integrations_tokens(exported, tmp_path, form):
    """A layer with partial RoPE (8 of 32 head dims rotary: narrow RoPE tables
    into latent_attention, the other dims absorbed) under chunked prefill,
    token for token against the HF integration on the same artefact, in
    both forms of K's rotary part: cached beside the latent ("auto" for
    partial RoPE: a second page per layer, which vLLM counts) and rebuilt
    (``additional_config``). The second round hits the prefix cache: its
    shared blocks' keys were written by the first."""
    from qsvd_kernels.integrations.core import cache_token_bytes

    rounds = _prompts()
    got = _run_vllm(tmp_path, {"model": str(exported["root"] / "vllm-W8A8-rope8"), "rounds": rounds,
                               "max_num_batched_tokens": CHUNK, "max_num_seqs": 8, "enable_prefix_caching": True,
                               "additional_config": {"qsvd": {"rope_key_cache": form}}})
    for r, prompts in enumerate(rounds):
        assert got["rounds"][r]["tokens"] == _hf_greedy(exported, "W8A8-rope8", prompts, rope_key_cache=form), r
    assert min(got["rounds"][1]["num_cached_tokens"]) >= BLOCK, got["rounds"][1]["num_cached_tokens"]
    config = json.loads((exported["root"] / "vllm-W8A8-rope8" / "config.json").read_text())
    assert all(spec["rope_pairs"] == [0, 1, 2, 3] for spec in config["qsvd"]["layers"])  # what vLLM's layers read
    specs = [l.spec() for l in exported["W8A8-rope8"].layers]
    token_bytes = sum(cache_token_bytes(s, form) for s in specs)
    assert token_bytes == sum(s.cache_row_bytes + (2 * s.num_kv_heads * 8 if form == "auto" else 0) for s in specs)
    assert got["num_blocks"] == KV_SPACE_GIB * 2**30 // (BLOCK * token_bytes)  # vLLM counted the keys' pages


def test_an_unknown_qsvd_serving_option_is_refused(exported, tmp_path):
    proc = _run_vllm(tmp_path, {"model": str(exported["root"] / "vllm-W8A8-rope8"), "rounds": [[[1, 2, 3]]],
                                "additional_config": {"qsvd": {"rope_key_cache": "sometimes"}}}, expect_ok=False)
    assert proc.returncode != 0 and "rope_key_cache must be one of" in proc.stderr + proc.stdout


@pytest.mark.parametrize("quant", ["W8A8", "W8A8-rope8"])
def test_greedy_tokens_equal_the_hf_integration_with_tensor_parallelism(exported, tmp_path, quant):
    """Two ranks, each with half the heads: full RoPE, and partial RoPE with
    each rank's rotary keys cached for its own kv heads."""
    rounds = _prompts()[:1]
    got = _run_vllm(tmp_path, {"model": str(exported["root"] / f"vllm-{quant}"), "rounds": rounds,
                               "tensor_parallel_size": 2},
                    {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    assert got["rounds"][0]["tokens"] == _hf_greedy(exported, quant, rounds[0])


def test_kv_capacity_vllm_reports_equals_the_byte_model(exported, tmp_path):
    """Blocks that fit in VLLM_CPU_KVCACHE_SPACE: QSVD's packed latent rows
    (codes + fp32 scale per token and layer) against the uncompressed
    model's K and V, both as vLLM itself reports them."""
    space = KV_SPACE_GIB * 2**30
    prompts = [[1, 2, 3]]
    cm = exported["W8A8"]
    qsvd = _run_vllm(tmp_path, {"model": str(exported["root"] / "vllm-W8A8"), "rounds": [prompts]})
    row_bytes = sum(formats.packed_row_bytes(l.quant.latent_bits, l.rank) for l in cm.layers)
    assert qsvd["num_blocks"] == space // (BLOCK * row_bytes)
    base = _run_vllm(tmp_path, {"model": str(exported["root"] / "hf"), "rounds": [prompts]})
    cfg = exported["model"].config
    d = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d * 4  # fp32 K and V
    assert base["num_blocks"] == space // (BLOCK * kv_bytes)
    assert qsvd["num_blocks"] > base["num_blocks"]


def test_a_checkpoint_without_qsvd_tensors_is_refused_by_vllm(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    src, bad = exported["root"] / "vllm-W8A8", tmp_path / "no-qsvd"
    shutil.copytree(src, bad)
    tensors = {k: v for k, v in load_file(bad / "model.safetensors").items() if ".qsvd.wuk" not in k}
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    proc = _run_vllm(tmp_path, {"model": str(bad), "rounds": [[[1, 2, 3]]]}, expect_ok=False)
    assert proc.returncode != 0
    assert "lacks QSVD tensors ['wuk', 'wuk_scale']" in proc.stderr + proc.stdout


def test_a_config_feature_the_layer_would_drop_is_refused_by_vllm(exported, tmp_path):
    """The plugin asks the family table's config rule (the one the HF
    integration asks): attention logit soft-capping in config.json is one
    clear error naming it, not a model that ignores it."""
    src, bad = exported["root"] / "vllm-W8A8", tmp_path / "softcapped"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["attn_logit_softcapping"] = 30.0
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = _run_vllm(tmp_path, {"model": str(bad), "rounds": [[[1, 2, 3]]]}, expect_ok=False)
    assert proc.returncode != 0
    assert "attention logit soft-capping (attn_logit_softcapping) is not implemented" in proc.stderr + proc.stdout


def test_an_unsupported_vllm_version_is_one_clear_error():
    from qsvd_kernels.integrations import vllm as qv

    with pytest.raises(RuntimeError, match=r"supports vllm >= 0\.32\.0, < 0\.33\.0; vllm 0\.31\.2 is installed"):
        qv.check_vllm_version("0.31.2")
    with pytest.raises(RuntimeError, match="0.33.1"):
        qv.check_vllm_version("0.33.1")
    assert qv.check_vllm_version("0.32.0") == "0.32.0"


def test_the_plugin_registers_every_causal_lm_of_the_family_table():
    from vllm import ModelRegistry

    from qsvd_kernels.integrations import vllm as qv
    from qsvd_kernels.model.families import causal_lm_architectures

    qv.register()
    qv.register()  # vLLM runs plugins in every process, maybe more than once
    archs = set(ModelRegistry.get_supported_archs())
    assert {"QSVD" + a for a in causal_lm_architectures()} <= archs
    assert {"QSVDLlamaForCausalLM", "QSVDMistralForCausalLM", "QSVDQwen2ForCausalLM"} <= archs


def test_the_openai_server_serves_a_qsvd_model(exported, tmp_path):
    """vLLM's OpenAI-compatible server, its engine core in its own process (the
    plugin arrives there through the entry point), returns the HF
    integration's greedy tokens. (vllm-cpu 0.32.0's `vllm serve` command looks
    up the metadata of a package named `vllm` and exits; its server module is
    the same server.)"""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = str(exported["root"] / "vllm-W8A8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(KV_SPACE_GIB))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                               "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "256",
                               "--enforce-eager", "--block-size", str(BLOCK), "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up in 300 s"
                time.sleep(2)
        prompt = _prompts()[0][1]
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["choices"][0]["token_ids"] == _hf_greedy(exported, "W8A8", [prompt])[0]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_the_mistral_and_qwen2_variants_serve_the_hf_integrations_tokens(family, tmp_path):
    """The other causal LMs of the family table: built from their configs
    (random weights; Qwen2's q/k/v biases start at zero, so its K bias is
    zero: a nonzero one is refused, see test_export.py), compressed, exported
    and served; greedy tokens equal the HF integration's."""
    import transformers as tr

    cls, cfg_cls = {"mistral": (tr.MistralForCausalLM, tr.MistralConfig),
                    "qwen2": (tr.Qwen2ForCausalLM, tr.Qwen2Config)}[family]
    torch.manual_seed(0)
    model = cls(cfg_cls(vocab_size=256, num_hidden_layers=2, max_position_embeddings=512, **TINY)).eval()
    model.save_pretrained(tmp_path / "hf")
    comp = qc.Compressor(model, M.random_token_batches(256, 16, 32, seed=0), progress=False)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 64), qc.QuantConfig.parse("W8A8"),
                                            allocation="uniform"))
    cm.save(tmp_path / "art")
    export_vllm(str(tmp_path / "hf"), str(tmp_path / "art"), str(tmp_path / "vllm"))
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["architectures"] == ["QSVD" + cls.__name__]
    prompts = _prompts()[0][:3]
    got = _run_vllm(tmp_path, {"model": str(tmp_path / "vllm"), "rounds": [prompts]})
    assert got["rounds"][0]["tokens"] == _hf_greedy({"model": model, "W8A8": cm}, "W8A8", prompts)


def test_a_step_without_its_metadata_or_with_a_foreign_cache_raises(monkeypatch):
    """Never computing without the state a step needs: a layer vLLM built no
    metadata for, and a cache that is not this layer's page layout (wrong
    row bytes, wrong dtype, not one contiguous buffer) are errors naming the
    layer, before anything is computed."""
    from types import SimpleNamespace

    from qsvd_kernels.integrations.vllm import model as vm

    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", spec=SimpleNamespace(cache_row_bytes=68),
                            rope_keys=None, attend=lambda *a: pytest.fail("attend ran without metadata"))
    ctx = SimpleNamespace(no_compile_layers={layer.layer_name: layer}, attn_metadata={"model.layers.1": object()})
    monkeypatch.setattr(vm, "get_forward_context", lambda: ctx)
    c, pos, out = torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), torch.zeros(2, 128)
    with pytest.raises(RuntimeError, match="model.layers.0.self_attn.attn: vLLM built no attention metadata"):
        vm._qsvd_latent_attention(c, c.new_empty(0), pos, out, layer.layer_name)

    for kv, what in [(torch.zeros(4, 32, 72, dtype=torch.uint8), "expected uint8 \\[num_blocks, block_size, 68\\]"),
                     (torch.zeros(4, 32, 68, dtype=torch.bfloat16), "expected uint8"),
                     (torch.zeros(4, 68, 32, dtype=torch.uint8).transpose(1, 2), "not one contiguous buffer")]:
        layer.kv_cache = kv
        with pytest.raises(RuntimeError, match=what):
            vm.QSVDAttention.page(layer)


def test_smollm2_served_on_vllm_gives_the_hf_integrations_tokens(tmp_path):
    """The real SmolLM2-135M (30 layers, GQA 9/3, RoPE base 1e5), compressed
    to W8A8 at R2 = 25 % (the latent form chosen by measurement: "kv" on this
    model), exported and served by vLLM's engine with chunked prefill, against
    the HF integration on the same artefact.

    Not token for token: vLLM's RMSNorm, MLP and sums round differently from
    Hugging Face's, so now and then an activation code moves one step, and on
    a real model greedy choices can be near-ties (the tiny random model above
    has none at its few tokens). Instead, teacher-forced on vLLM's own
    sequences, every token vLLM chose is the HF integration's argmax or within
    T.QUANTIZED_LM_LOGIT_DRIFT of the scale of it, and vLLM's log-probabilities
    of its top 5 tokens at every step equal HF's within twice that (a
    log-softmax moves by at most twice its logits' largest move). A cache that
    lost or misplaced tokens, or misread a layer, is off by the logits' scale."""
    from qsvd_kernels import testing as T
    from qsvd_kernels.integrations.smollm2 import gguf_path

    try:
        gguf_path()
    except ImportError as e:
        if os.environ.get("QSVD_REQUIRE_VLLM"):
            raise
        pytest.skip(str(e))
    model, tok, _ = M.load_model("smollm2")
    calib, _, _ = M.lm_calibration(tok, n=64, seq_len=256)
    cm = qc.compress_model(model, calib, qc.CompressionConfig(qc.Budget("r2", 0.25), qc.QuantConfig.parse("W8A8")),
                           loss_fn=qc.causal_lm_fisher_loss(), progress=False)
    assert cm.info["latent_form"] == "kv"
    cm.save(tmp_path / "art")
    from qsvd_kernels.integrations.smollm2 import smollm2_dir

    export_vllm(smollm2_dir(), str(tmp_path / "art"), str(tmp_path / "vllm"))
    texts = ["The capital of France is", "Photosynthesis is the process by which plants",
             "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively so that "
             "large n do not overflow the recursion limit.\"\"\"\n"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert max(len(p) for p in prompts) > CHUNK  # prefilled in chunks
    got = _run_vllm(tmp_path, {"model": str(tmp_path / "vllm"), "rounds": [prompts], "max_tokens": 16,
                               "max_num_batched_tokens": CHUNK, "max_num_seqs": 4, "logprobs": 5})["rounds"][0]
    served = hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops")
    exact = 0
    with torch.no_grad():
        for p, toks, steps in zip(prompts, got["tokens"], got["logprobs"]):
            assert len(toks) == len(steps) == 16
            logits = served(torch.tensor([p + toks])).logits[0, len(p) - 1 : -1].double()
            drift = T.QUANTIZED_LM_LOGIT_DRIFT * float(logits.abs().max())
            chosen = logits.gather(-1, torch.tensor(toks)[:, None])[:, 0]
            behind = logits.max(-1).values - chosen  # 0 where vLLM took HF's argmax
            assert float(behind.max()) <= drift, (behind.tolist(), drift)
            exact += int((behind == 0).sum())
            logprobs = logits.log_softmax(-1)
            for t, step in enumerate(steps):
                assert str(toks[t]) in step
                for token, lp in step.items():
                    assert abs(lp - float(logprobs[t, int(token)])) <= 2 * drift, (t, token, lp, drift)
    assert exact >= len(prompts) * 16 // 2, exact  # near-ties are the exception, not the rule
    assert "Paris" in tok.decode(got["tokens"][0])
