"""Label-free calibration losses for importance scores.

Both are sums of per-sample losses (calibrate.py relies on it), and both
have non-zero gradients at the original weights: a plain distance to the
original model's outputs would not (its gradient is exactly zero there, so
every score would be zero).
"""

from __future__ import annotations

from typing import Callable

import torch


def random_projection_loss(output_fn: Callable, seed: int = 0) -> Callable:
    """L = sum_n <z_n, f(x_n)>, z_n ~ N(0, I) drawn afresh per sample.

    ``output_fn(model, batch) -> [B, D]`` is the output to preserve (e.g. a
    sentence embedding). E_z[(u^T G_n v)^2] = |J_n (u v^T)|^2: the squared
    distance by which removing component (u, v) would move sample n's output,
    to first order. Works for any model.
    """
    gen = torch.Generator().manual_seed(seed)

    def loss(model, batch):
        f = output_fn(model, batch)
        z = torch.randn(f.shape, generator=gen, dtype=torch.float32).to(f.device, f.dtype)
        return (z * f).sum()

    loss.reset = lambda: gen.manual_seed(seed)  # importance_scores calls it: same draws on every run
    return loss


def causal_lm_fisher_loss(seed: int = 0) -> Callable:
    """Next-token cross-entropy against tokens sampled from the model's own
    predictive distribution (a true-Fisher estimate), summed over the real
    tokens of every sample. For causal language models returning ``logits``."""
    gen = torch.Generator().manual_seed(seed)

    def loss(model, batch):
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        logits = out.logits[:, :-1].float()
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1]).cpu()
            sampled = torch.multinomial(probs, 1, generator=gen).view(logits.shape[:2]).to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1),
                                                reduction="none").view(sampled.shape)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None:
            nll = nll * mask[:, 1:].to(nll.dtype)
        return nll.sum()

    loss.reset = lambda: gen.manual_seed(seed)
    return loss
