"""Where the attention projections are in a model.

An *attention site* is one attention block whose Q, K and V projections
are ``nn.Linear`` modules reading the same input: BERT-style ``query`` /
``key`` / ``value`` (BERT, MiniLM, RoBERTa) or ``q_proj`` / ``k_proj`` /
``v_proj`` (LLaMA family, SigLIP, CLIP, Mistral, Qwen2). The model-family
table (families.py) says which names, how head counts are read, and whether
the block is a decoder; unknown classes are duck-typed. Anything else raises
a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dims import LayerDims
from .families import AttentionFamily, family_of, part_of


@dataclass
class AttentionSite:
    name: str  # module path of the attention block
    module: nn.Module
    attrs: tuple[str, str, str]  # attribute names of the q, k, v Linear modules
    dims: LayerDims
    family: AttentionFamily | None = None  # the model-family table's entry (families.py)
    part: str = "language"  # "language", "vision" or "text" (families.part_of)

    @property
    def keeps_cache(self) -> bool:
        """A causal decoder block: at inference it keeps a KV cache (the latent, once compressed)."""
        return self.family is not None and self.family.is_decoder

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


def _heads(family: AttentionFamily, module: nn.Module, config, q: nn.Linear, k: nn.Linear) -> tuple[int, int, int]:
    H, d = family.heads.read(module, config, q.out_features)
    if not H or not d:
        raise ValueError(f"cannot tell the head count of {type(module).__name__} (family {family.name})")
    H_kv = k.out_features // d
    if H_kv * d != k.out_features or H % H_kv:
        raise ValueError(f"{type(module).__name__} (family {family.name}): k_proj width {k.out_features} is not a "
                         f"divisor-compatible number of heads of size {d} (H = {H})")
    return int(H), int(H_kv), int(d)


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every self-attention block of ``model``, in module order, each with its
    family (the table in families.py, else duck typing) and part."""
    config = getattr(model, "config", None)
    sites = []
    for name, module in model.named_modules():
        family = family_of(module)
        if family is None:
            continue
        linears = [getattr(module, a, None) for a in family.qkv]
        if not all(isinstance(l, nn.Linear) for l in linears):
            continue
        q, k, v = linears
        if not (q.in_features == k.in_features == v.in_features):
            continue  # cross-attention or something else: not a self-attention QKV
        leaf = name.rsplit(".", 1)[-1].lower()
        if getattr(module, "is_cross_attention", False) or "cross" in leaf or leaf == "encoder_attn":
            continue  # K/V read another sequence than Q: no shared latent
        H, H_kv, d = _heads(family, module, getattr(module, "config", None) or config, q, k)
        if v.out_features != H_kv * d or q.out_features != H * d:
            raise ValueError(f"{name} (family {family.name}): q/k/v widths {q.out_features}/{k.out_features}/"
                             f"{v.out_features} do not match {H} query heads and {H_kv} kv heads of size {d}")
        sites.append(AttentionSite(name, module, family.qkv, LayerDims(q.in_features, H, H_kv, d), family,
                                   part_of(model, name, family)))
    if not sites:
        raise ValueError(
            f"no supported attention layers found in {type(model).__name__}: qsvd looks for blocks with "
            "nn.Linear query/key/value (BERT-style) or q_proj/k_proj/v_proj (LLaMA, SigLIP, CLIP) projections")
    return sites


LAYER_CHOICES = ("all", "language", "vision")


def select_sites(model: nn.Module, layers="all") -> list[AttentionSite]:
    """The attention sites to compress: ``"all"``, ``"language"`` (the causal
    decoder blocks, which keep a cache), ``"vision"`` (a vision tower's
    blocks), or a filter function ``layers(site) -> bool`` (torchao style)."""
    sites = find_attention_sites(model)
    if callable(layers):
        chosen = [s for s in sites if layers(s)]
    elif layers == "all":
        chosen = sites
    elif layers == "language":
        chosen = [s for s in sites if s.keeps_cache]
    elif layers == "vision":
        chosen = [s for s in sites if s.part == "vision"]
    else:
        raise ValueError(f"layers must be one of {LAYER_CHOICES} or a function site -> bool, got {layers!r}")
    if not chosen:
        parts = sorted({s.part for s in sites})
        raise ValueError(f"layers={layers!r} selects none of the {len(sites)} attention layers of "
                         f"{type(model).__name__} (its parts: {parts})")
    return chosen


def resolve_sites(model: nn.Module, names: list[str]) -> list[AttentionSite]:
    """The attention sites of ``model`` named ``names`` (e.g. an artefact's
    ``site_names``), in that order; ValueError naming the missing ones."""
    by_name = {s.name: s for s in find_attention_sites(model)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"the model has no attention layers named {missing}: the artefact belongs to another model")
    return [by_name[n] for n in names]
