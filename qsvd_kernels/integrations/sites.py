"""Where the attention projections are in a model.

An *attention site* is one attention block whose Q, K and V projections
are ``nn.Linear`` modules reading the same input: BERT-style ``query`` /
``key`` / ``value`` (BERT, MiniLM, RoBERTa) or ``q_proj`` / ``k_proj`` /
``v_proj`` (LLaMA family, SigLIP, CLIP, Mistral, Qwen2). Head counts come
from the module or the model config. Anything else raises a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..compress.budget import LayerDims

_NAME_SETS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


@dataclass
class AttentionSite:
    name: str  # module path of the attention block
    module: nn.Module
    attrs: tuple[str, str, str]  # attribute names of the q, k, v Linear modules
    dims: LayerDims

    @property
    def linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self.module, a) for a in self.attrs)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """W_q, W_k, W_v in the row-vector convention ([E, out]) and the
        concatenated bias (None when no projection has one)."""
        q, k, v = self.linears
        biases = [l.bias for l in (q, k, v)]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else torch.zeros(l.out_features, dtype=l.weight.dtype,
                                                                            device=l.weight.device)
                              for b, l in zip(biases, (q, k, v))])
        return q.weight.detach().T, k.weight.detach().T, v.weight.detach().T, bias


def _heads(module: nn.Module, config, q: nn.Linear, k: nn.Linear) -> tuple[int, int, int]:
    H = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    d = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
    if H is None and config is not None:
        H = getattr(config, "num_attention_heads", None)
    if d is None and H:
        d = q.out_features // H
    if not H or not d:
        raise ValueError(f"cannot tell the head count of {type(module).__name__}")
    H_kv = k.out_features // d
    if H_kv * d != k.out_features or H % H_kv:
        raise ValueError(f"{type(module).__name__}: k_proj width {k.out_features} is not a divisor-compatible "
                         f"number of heads of size {d} (H = {H})")
    return int(H), int(H_kv), int(d)


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention block of ``model``, in module order."""
    config = getattr(model, "config", None)
    sites = []
    for name, module in model.named_modules():
        for attrs in _NAME_SETS:
            linears = [getattr(module, a, None) for a in attrs]
            if not all(isinstance(l, nn.Linear) for l in linears):
                continue
            q, k, v = linears
            if not (q.in_features == k.in_features == v.in_features):
                continue  # cross-attention or something else: not a self-attention QKV
            leaf = name.rsplit(".", 1)[-1].lower()
            if getattr(module, "is_cross_attention", False) or "cross" in leaf or leaf == "encoder_attn":
                continue  # K/V read another sequence than Q: no shared latent
            H, H_kv, d = _heads(module, getattr(module, "config", None) or config, q, k)
            if v.out_features != H_kv * d or q.out_features != H * d:
                raise ValueError(f"{name}: q/k/v widths {q.out_features}/{k.out_features}/{v.out_features} do not "
                                 f"match {H} query heads and {H_kv} kv heads of size {d}")
            sites.append(AttentionSite(name, module, attrs, LayerDims(q.in_features, H, H_kv, d)))
    if not sites:
        raise ValueError(
            f"no supported attention layers found in {type(model).__name__}: qsvd looks for blocks with "
            "nn.Linear query/key/value (BERT-style) or q_proj/k_proj/v_proj (LLaMA, SigLIP, CLIP) projections")
    return sites
