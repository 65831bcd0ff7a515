"""Evaluating a compressed causal LM against its original: perplexity on
held-out text, next-token agreement and KL.

Held-out text: the Python documentation's topic pages
(``pydoc_data.topics``, installed with every CPython that has ``pydoc``),
long-form English prose and code that the calibration text (the package's
640 built-in sentences, ``data/sentences.txt``) never contains. They are
tokenized once and cut into ``n`` windows of ``length`` tokens spread evenly
over the text, so every window is a real context of that length (attention
and RoPE over hundreds of positions, which single sentences would not test).
The description returned with the windows names the Python version and the
text's SHA-256: two runs compare only on the same text.
"""

from __future__ import annotations

import hashlib
import math
import platform

import torch


def heldout_text() -> tuple[str, dict]:
    """(text, description) of the held-out corpus."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ImportError("the held-out text is Python's pydoc_data.topics, which this Python lacks "
                          "(a minimal distribution?): install the full standard library") from None
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text, {"source": "pydoc_data.topics", "python": platform.python_version(),
                  "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}


def heldout_windows(tokenizer, n: int = 32, length: int = 256) -> tuple[torch.Tensor, dict]:
    """(input_ids [n, length], description): ``n`` windows of ``length``
    tokens spread evenly over the held-out text (no overlap)."""
    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 windows of length >= 2, got n={n}, length={length}")
    text, desc = heldout_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    step = ids.numel() // n
    if step < length:
        raise ValueError(f"the held-out text has {ids.numel()} tokens: too few for {n} windows of {length}")
    windows = torch.stack([ids[i * step : i * step + length] for i in range(n)])
    return windows, {**desc, "tokens": int(ids.numel()), "windows": n, "window_length": length}


@torch.no_grad()
def compare(original, compressed, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity of both models on ``windows`` [n, length] (every next-token
    prediction of every window), the compressed model's next-token argmax
    agreement with the original's, and the mean KL(original || compressed)
    per predicted token. ``compressed`` may be None (only the original's
    perplexity)."""
    nll = {"original": 0.0, "compressed": 0.0}
    agree, kl, n = 0.0, 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        target = ids[:, 1:].reshape(-1)
        logp = torch.log_softmax(original(input_ids=ids).logits[:, :-1].float(), -1).reshape(target.numel(), -1)
        nll["original"] -= float(logp.gather(1, target[:, None]).sum())
        if compressed is not None:
            logq = torch.log_softmax(compressed(input_ids=ids).logits[:, :-1].float(), -1).reshape(target.numel(), -1)
            nll["compressed"] -= float(logq.gather(1, target[:, None]).sum())
            agree += float((logp.argmax(-1) == logq.argmax(-1)).sum())
            kl += float((logp.exp() * (logp - logq)).sum())
        n += target.numel()
    out = {"tokens": n, "perplexity_original": math.exp(nll["original"] / n)}
    if compressed is not None:
        out["perplexity"] = math.exp(nll["compressed"] / n)
        out["perplexity_ratio"] = out["perplexity"] / out["perplexity_original"]
        out["next_token_agreement"] = agree / n
        out["mean_kl"] = kl / n
    return out


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    return compare(model, None, windows, batch_size)["perplexity_original"]
