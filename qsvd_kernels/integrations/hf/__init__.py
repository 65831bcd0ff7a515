"""Hugging Face models on the qsvd ops: compressed attention modules, and a
latent KV cache for ``model.generate()``.

    compressed = CompressedModel.load("artefact/")
    apply_qsvd(model, compressed)                      # in place, one call
    out, cache = generate(model, input_ids, max_new_tokens=32)
    print(cache.token_nbytes(), cache.fp16_kv_token_nbytes())

Two kinds of attention block are served (the model-family table,
``qsvd_kernels.model.families``, says which is which):

- **RoPE decoders** (LLaMA, Mistral, Qwen2; the language model of LLaVA and
  SmolVLM/Idefics3): the block becomes ``QSVDDecoderAttention``, caching only
  the paged, quantized latent in a ``QSVDLatentCache`` (``cache.py``,
  ``attention.py``). Left-padded batches, sampling, beam search and
  per-sequence stopping work through ``generate``.
- **Encoders without RoPE or cache** (BERT, MiniLM, CLIP, SigLIP, the vision
  towers of VLMs): the three projections are replaced; q, k and v come from
  quant_gemm on the quantized latent, and the model's own attention runs.

``backend="ops"`` runs on ``torch.ops.qsvd`` (quantized artefacts);
``backend="torch"`` runs the same math in plain PyTorch and also serves
unquantized artefacts (``projector.py``).
"""

from __future__ import annotations

import inspect

from torch import nn

from ...compress.artefact import CompressedModel
from ...model import ProjectionSlot, SharedProjection, find_attention_sites, resolve_sites, set_submodule
from ...model.families import family_of
from .attention import CACHE_KEYWORDS, DecoderStack, QSVDDecoderAttention
from .cache import QSVDLatentCache, QSVDLatentLayer
from .projector import OpsProjector, TorchProjector, make_projector

BACKENDS = ("ops", "torch")

__all__ = ["BACKENDS", "apply_qsvd", "generate", "cache_keyword", "QSVDLatentCache", "QSVDLatentLayer", "QSVDDecoderAttention",
           "OpsProjector", "TorchProjector", "make_projector"]


def _decoder_stack(model: nn.Module, block_name: str) -> str:
    """The module path of the decoder stack holding a decoder block: the
    nearest ancestor with a ``layers`` ModuleList whose forward takes a cache."""
    parts = block_name.split(".")
    for n in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:n])
        module = model.get_submodule(path) if path else model
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            try:
                params = inspect.signature(module.forward).parameters
            except (TypeError, ValueError):
                continue
            if any(k in params for k in CACHE_KEYWORDS):
                return path
    raise NotImplementedError(f"{block_name}: no decoder stack (a module with a `layers` list whose forward takes a "
                              "cache) holds this block, so a latent cache cannot be attached")


def apply_qsvd(model: nn.Module, compressed: CompressedModel, backend: str = "ops",
               allow_duck_typed: bool = False, rope_key_cache: str = "auto") -> nn.Module:
    """Run ``model``'s attention on the compressed layers, in place.

    Decoder blocks become QSVDDecoderAttention, with a latent cache attached
    to their decoder stack (generation works through ``model.generate`` or
    ``generate`` below); encoder blocks get compressed q/k/v projections.
    Which layers are compressed was chosen at compression time
    (``compress_model(..., layers=...)``); this applies exactly the artefact's.

    A decoder block whose class is not in the model-family table
    (model/families.py) is recognised by duck typing only, which cannot
    vouch that its attention is LLaMA's: it is refused unless
    ``allow_duck_typed=True`` (encoders keep the model's own attention and
    need no opt-in).

    ``rope_key_cache`` ("auto", "cached", "rebuilt"): whether a layer with
    partial RoPE keeps K's rotary part in its cache beside the latent or
    rebuilds it at every step (integrations/core.py ``rope_keys_cached``:
    "auto" caches it for partial RoPE, rebuilds for full RoPE).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(model, "_qsvd_applied", False):
        raise ValueError("apply_qsvd was already applied to this model")
    sites = resolve_sites(model, compressed.site_names)
    device = next(model.parameters()).device
    decoders = []
    for site, layer in zip(sites, compressed.layers):
        if layer.dims != site.dims:
            raise ValueError(f"{site.name}: the compressed layer is {layer.dims}, the model's is {site.dims}")
        family = family_of(site.module)
        projector = make_projector(layer, backend, encoder=not family.is_decoder,
                                   rope_key_cache=rope_key_cache).to(device)
        if family.is_decoder:
            missing = family.unsupported(site.module)
            if missing:
                raise NotImplementedError(f"{site.name} ({type(site.module).__name__}, family {family.name}) uses "
                                          f"{', '.join(missing)}, which the QSVD decoder attention does not "
                                          "implement yet")
            if family.duck_typed and not allow_duck_typed:
                raise NotImplementedError(
                    f"{site.name}: {type(site.module).__name__} is not in the model-family table "
                    f"(qsvd_kernels/model/families.py), so its attention is only {family.name}; the QSVD decoder "
                    "computes LLaMA attention and cannot tell what else this block does. Add a family entry, or "
                    "pass allow_duck_typed=True once you have checked it")
            decoders.append((site, projector, family))
        else:
            shared = SharedProjection(projector)
            for idx, attr in enumerate(site.attrs):
                setattr(site.module, attr, ProjectionSlot(shared, idx))
    if decoders:
        _attach_decoders(model, decoders)
    model._qsvd_applied = True
    return model


def _attach_decoders(model: nn.Module, decoders: list) -> None:
    stacks = {_decoder_stack(model, site.name) for site, _, _ in decoders}
    if len(stacks) != 1:
        raise NotImplementedError(f"compressed decoder blocks sit in {len(stacks)} decoder stacks ({sorted(stacks)}); "
                                  "the latent cache serves one")
    stack_path = stacks.pop()
    stack_module = model.get_submodule(stack_path) if stack_path else model
    all_decoders = [s.name for s in find_attention_sites(stack_module) if family_of(s.module).is_decoder]
    if len(all_decoders) != len(decoders):
        raise NotImplementedError(
            f"{len(decoders)} of the {len(all_decoders)} decoder attention blocks of {stack_path or 'the model'} are "
            "compressed: the latent cache replaces the whole KV cache, so compress every decoder layer or none")
    by_idx = {site.module.layer_idx: (site, projector, family) for site, projector, family in decoders}
    if sorted(by_idx) != list(range(len(decoders))):
        raise ValueError(f"decoder blocks have layer indices {sorted(by_idx)}, expected 0..{len(decoders) - 1}")
    stack = DecoderStack(stack_module, [by_idx[i][1] for i in range(len(decoders))],
                         [by_idx[i][2] for i in range(len(decoders))])
    for site, projector, family in decoders:
        set_submodule(model, site.name, QSVDDecoderAttention(site.module, projector, family, stack))
    stack_module.register_forward_pre_hook(stack.pre_hook, with_kwargs=True)
    stack_module.register_forward_hook(stack.post_hook, with_kwargs=True, always_call=True)
    model._qsvd_stack = stack


def cache_keyword() -> str:
    """The keyword the installed transformers' generate() takes the cache by."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
        return ALL_CACHE_NAMES[0]
    except ImportError:  # pragma: no cover - older transformers
        return "past_key_values"


def generate(model: nn.Module, input_ids=None, block_size: int = 16, **kwargs):
    """``model.generate`` with a fresh QSVDLatentCache; returns (output, cache).
    Every generate() option works that keeps or reorders a cache (greedy,
    sampling, beam search, num_return_sequences, padded batches); other
    inputs (``pixel_values`` for VLMs, ``attention_mask``) pass through. With
    ``use_cache=False`` nothing is cached (every step recomputes the prefix)
    and the cache returned is None."""
    if kwargs.get("use_cache") is False:
        out = model.generate(input_ids, **kwargs) if input_ids is not None else model.generate(**kwargs)
        return out, None
    cache = QSVDLatentCache(model, block_size)
    kwargs[cache_keyword()] = cache
    out = model.generate(input_ids, **kwargs) if input_ids is not None else model.generate(**kwargs)
    return out, cache
