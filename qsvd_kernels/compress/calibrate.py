"""Forward/backward hooks that gather what compression needs from real data.

- ``collect_stats``: per attention site, the statistics of the projections'
  input (whitening.LayerStats), over the tokens the attention mask marks
  as real (padding rows would bias the Gram matrix).
- ``importance_scores``: per site, I_i = mean_n (sigma_i u_i^T G~_n v_i)^2 with
  G~_n the gradient of sample n's loss with respect to the whitened
  W~ = S W_lat (W_lat: the projections the latent covers, svd.py). Since y = x W_lat = (x S^-1) W~, that gradient is
  S^-T sum_t x_t^T delta_t, so u_i^T G~_n v_i = sum_{t in n} (x_t S^-1 u_i)(delta_t v_i):
  two projections of activations and output gradients the hooks see, summed
  per sample. No per-sample backward pass is needed as long as the loss is a
  sum of per-sample losses (samples of a batch do not interact).

Batches are dicts of model inputs (what a tokenizer returns); "attention_mask"
marks real tokens. The caller's ``loss_fn(model, batch)`` returns the summed
loss of the batch (losses.py has two that need no labels).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from ..model.sites import AttentionSite
from .svd import JointSVD
from .whitening import LayerStats

try:  # progress bars are optional at import time, required by setup.py
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it, **kw):
        return it


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _mask_of(batch, x: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask.to(torch.bool)


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_stats(model: nn.Module, sites: list[AttentionSite], batches: Iterable, *, keep_rows: int = 2048,
                  seed: int = 0, progress: bool = True) -> list[LayerStats]:
    stats = [LayerStats(s.dims.hidden, keep_rows, seed + i) for i, s in enumerate(sites)]
    current = {}

    def make_hook(i):
        def hook(module, args):
            x = args[0]
            mask = _mask_of(current["batch"], x)
            stats[i].update(x[mask] if mask is not None else x.reshape(-1, x.shape[-1]))
        return hook

    handles = [s.linears[0].register_forward_pre_hook(make_hook(i)) for i, s in enumerate(sites)]
    with _hooks(handles):
        for batch in tqdm(list(batches), desc="calibration", disable=not progress):
            current["batch"] = batch
            _call(model, batch)
    return stats


def _projections(svd: JointSVD, dtype=torch.float32):
    """P_a = S^-1 U [E, k] and P_b = T^-T V [cols, k] (V = Vh^T; T the output
    metric, identity without one): y = (x S^-1) (S W T) T^-1, so the output
    gradient delta meets the singular vector v as delta T^-T v."""
    V = svd.Vh.T.contiguous()
    if svd.metric is not None:
        V = svd.metric.solve_columns(V)
    return svd.whitening.solve(svd.U).to(dtype), V.contiguous().to(dtype)


def importance_scores(model: nn.Module, sites: list[AttentionSite], svds: list[JointSVD],
                      loss_fn: Callable, batches: Iterable, *, progress: bool = True) -> list[torch.Tensor]:
    """Per site, the importance of each singular value [k] (float64)."""
    proj = [_projections(s) for s in svds]
    # The projections each latent covers (svd.py): q, k, v or k, v.
    parts = [(0, 1, 2) if s.form == "qkv" else (1, 2) for s in svds]
    sums = [torch.zeros(s.max_rank, dtype=torch.float64) for s in svds]
    count = {"n": 0}
    pending: dict[int, dict] = {}

    def fwd_hook(i):
        def hook(module, args):
            x = args[0].detach().to(torch.float32)
            if proj[i][0].device != x.device:  # the model's device (first use moves them)
                proj[i] = tuple(p.to(x.device) for p in proj[i])
            pending[i] = {"a": x @ proj[i][0], "grads": {}}
        return hook

    def bwd_hook(i, j):
        def hook(module, grad_input, grad_output):
            entry = pending.get(i)
            if entry is None:
                return
            if j not in parts[i]:
                return
            entry["grads"][j] = grad_output[0].detach().to(torch.float32)
            if len(entry["grads"]) == len(parts[i]):
                delta = torch.cat([entry["grads"][p] for p in parts[i]], dim=-1)
                b = delta @ proj[i][1]  # [B, T, k]
                a = entry["a"]
                per_sample = (a * b).sum(dim=-2) if a.dim() == 3 else (a * b)  # [B, k]
                weighted = per_sample.to("cpu", torch.float64) * svds[i].sigma[None, :]
                sums[i] += (weighted**2).sum(0)
                del pending[i]
        return hook

    handles = []
    for i, s in enumerate(sites):
        handles.append(s.linears[0].register_forward_pre_hook(fwd_hook(i)))
        for j, lin in enumerate(s.linears):
            handles.append(lin.register_full_backward_hook(bwd_hook(i, j)))
    if hasattr(loss_fn, "reset"):  # the same random draws on every run: scores are reproducible
        loss_fn.reset()
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    # Only the projections' weights require gradients: their outputs then do,
    # so the loss's gradient flows back through every layer after the first
    # site, while no other weight gradient is ever computed (the backward
    # pass costs one forward's worth of GEMMs instead of two).
    site_weights = {id(lin.weight) for s in sites for lin in s.linears}
    try:
        with _hooks(handles), torch.enable_grad():  # also when the caller is under no_grad
            for p in params:
                p.requires_grad_(id(p) in site_weights)
            for batch in tqdm(list(batches), desc="importance scores", disable=not progress):
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                with warnings.catch_warnings():  # the first site's input needs no gradient: by design
                    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
                    loss.backward()
                x_shape = next(iter(batch.values())).shape if isinstance(batch, dict) else batch.shape
                count["n"] += int(x_shape[0])
                pending.clear()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    n = max(count["n"], 1)
    return [s / n for s in sums]
