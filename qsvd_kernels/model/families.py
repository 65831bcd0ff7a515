"""The model-family table: what qsvd knows about each attention block it
serves, in one place (the way vLLM's model registry works).

Each ``AttentionFamily`` says, for the attention classes of one model family:
the attribute names of the Q/K/V projections and of the output projection,
how the head counts are read, the rotary style, whether the block is a
causal decoder (it keeps a KV cache, so QSVD caches its latent) or an encoder
(q, k and v are recomputed from the latent every call), and the attention
features the QSVD decoder block does not implement (refused, never dropped).

``MULTIMODAL`` names the parts of vision-language wrappers, so a user can
compress the language model, the vision tower, or both.

A block of an unknown class is served by duck typing (BERT-style
``query/key/value`` or ``q_proj/k_proj/v_proj`` Linear modules); its family
is then named ``duck-typed (ClassName)`` in every error, so a user knows the
table did not vouch for it. Adding a family is one entry here plus its test
(python_tests/test_families.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

DECODER, ENCODER = "decoder", "encoder"


def _module_or_config(module: nn.Module, config, module_attrs: tuple[str, ...], config_attrs: tuple[str, ...]):
    for a in module_attrs:
        v = getattr(module, a, None)
        if v:
            return int(v)
    for a in config_attrs:
        v = getattr(config, a, None) if config is not None else None
        if v:
            return int(v)
    return None


@dataclass(frozen=True)
class HeadSpec:
    """Where the query-head count and the head size are read: the module's
    attributes first, then its config's. The kv-head count always follows
    from the K projection's width (so GQA needs no entry of its own)."""

    heads: tuple[str, ...] = ("num_heads", "num_attention_heads")
    head_dim: tuple[str, ...] = ("head_dim", "attention_head_size")
    config_heads: tuple[str, ...] = ("num_attention_heads",)
    config_head_dim: tuple[str, ...] = ("head_dim",)

    def read(self, module: nn.Module, config, q_out: int) -> tuple[int | None, int | None]:
        H = _module_or_config(module, config, self.heads, self.config_heads)
        d = _module_or_config(module, config, self.head_dim, self.config_head_dim)
        if d is None and H:
            d = q_out // H
        return H, d


def _llama_config_unsupported(cfg) -> list[str]:
    """Attention math beyond LLaMA's, set in a model config, that the QSVD
    decoder block (Hugging Face's and vLLM's alike) would drop."""
    found = []
    for attr, what in (("clip_qkv", "q/k/v clipping (clip_qkv)"),
                       ("attn_logit_softcapping", "attention logit soft-capping (attn_logit_softcapping)"),
                       ("llama_4_scaling", "Llama-4 attention scaling (llama_4_scaling)")):
        if getattr(cfg, attr, None):
            found.append(what)
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        found.append("partial rotary embedding (partial_rotary_factor)")
    return found


def _llama_module_unsupported(module: nn.Module) -> list[str]:
    """q/k norms, found on the module (they have no config flag of their own)."""
    return [n for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") if getattr(module, n, None) is not None]


def _nothing_unsupported(_) -> list[str]:
    return []


@dataclass(frozen=True)
class AttentionFamily:
    name: str
    classes: tuple[str, ...]  # attention module class names this entry serves
    kind: str  # DECODER (causal, RoPE, keeps a KV cache) or ENCODER
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    out_proj: str | None = "o_proj"
    rope: str | None = None  # "llama": rotate-half RoPE from the model's position_embeddings
    heads: HeadSpec = field(default_factory=HeadSpec)
    modality: str = "text"  # "text" or "vision"
    # Features the QSVD block does not implement, refused (never dropped):
    # those a model config asks for (read by every integration, vLLM's from
    # the config alone) and those found on an attention module.
    config_unsupported: Callable[[object], list[str]] = _nothing_unsupported
    module_unsupported: Callable[[nn.Module], list[str]] = _nothing_unsupported
    duck_typed: bool = False
    # Hugging Face causal-LM architectures (config.architectures) built on
    # this attention, which serving integrations (vLLM) can run compressed.
    causal_lm_architectures: tuple[str, ...] = ()

    @property
    def is_decoder(self) -> bool:
        return self.kind == DECODER

    def sliding_window(self, module: nn.Module) -> int | None:
        """A decoder's sliding window, if it has one (enforced at run time:
        the QSVD block attends to the whole context, so a longer context
        raises). Read from the module (Qwen2 sets it per layer) or else from
        its config (``config_sliding_window``)."""
        if hasattr(module, "sliding_window"):
            w = module.sliding_window
            return int(w) if w else None
        return config_sliding_window(getattr(module, "config", None), getattr(module, "layer_idx", None))

    def unsupported(self, module: nn.Module) -> list[str]:
        """Everything this block of this family would drop: its module's
        features and its config's."""
        cfg = getattr(module, "config", None)
        return self.module_unsupported(module) + (self.config_unsupported(cfg) if cfg is not None else [])


def config_sliding_window(cfg, layer_idx: int | None = None) -> int | None:
    """The sliding window a config gives one layer (``layer_idx``) or, with
    None, any layer: ``sliding_window`` (Mistral), unless
    ``use_sliding_window`` is False (Qwen2's default) or ``layer_types`` says
    the layer attends fully."""
    w = getattr(cfg, "sliding_window", None)
    if not w or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        sliding = [t == "sliding_attention" for t in types]
        if layer_idx is None and not any(sliding):
            return None
        if layer_idx is not None and layer_idx < len(types) and not sliding[layer_idx]:
            return None
    return int(w)


_LLAMA_LIKE = dict(kind=DECODER, rope="llama", config_unsupported=_llama_config_unsupported,
                   module_unsupported=_llama_module_unsupported,
                   heads=HeadSpec(heads=(), head_dim=("head_dim",)))

FAMILIES: tuple[AttentionFamily, ...] = (
    AttentionFamily("llama", ("LlamaAttention",), causal_lm_architectures=("LlamaForCausalLM",), **_LLAMA_LIKE),
    AttentionFamily("mistral", ("MistralAttention",), causal_lm_architectures=("MistralForCausalLM",), **_LLAMA_LIKE),
    AttentionFamily("qwen2", ("Qwen2Attention",), causal_lm_architectures=("Qwen2ForCausalLM",), **_LLAMA_LIKE),
    AttentionFamily("bert", ("BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention",
                             "RobertaSdpaSelfAttention"), ENCODER, qkv=("query", "key", "value"), out_proj=None,
                    heads=HeadSpec(heads=("num_attention_heads",), head_dim=("attention_head_size",))),
    AttentionFamily("clip", ("CLIPAttention",), ENCODER, out_proj="out_proj", modality="vision"),
    AttentionFamily("siglip", ("SiglipAttention",), ENCODER, out_proj="out_proj", modality="vision"),
    AttentionFamily("idefics3-vision", ("Idefics3VisionAttention",), ENCODER, out_proj="out_proj",
                    modality="vision"),
)


@dataclass(frozen=True)
class MultimodalFamily:
    """A vision-language wrapper: which submodule paths hold which part."""

    name: str
    classes: tuple[str, ...]
    parts: dict  # part name -> attribute path below the wrapper, e.g. {"vision": "model.vision_tower"}


MULTIMODAL: tuple[MultimodalFamily, ...] = (
    # dual encoders: their text towers use the same attention classes as the vision towers
    MultimodalFamily("clip", ("CLIPModel", "SiglipModel"), {"vision": "vision_model", "text": "text_model"}),
    MultimodalFamily("llava", ("LlavaForConditionalGeneration",),
                     {"vision": "model.vision_tower", "language": "model.language_model"}),
    MultimodalFamily("llava", ("LlavaModel",), {"vision": "vision_tower", "language": "language_model"}),
    MultimodalFamily("idefics3", ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
                     {"vision": "model.vision_model", "language": "model.text_model"}),
    MultimodalFamily("idefics3", ("Idefics3Model", "SmolVLMModel"),
                     {"vision": "vision_model", "language": "text_model"}),
)

_BY_CLASS = {c: f for f in FAMILIES for c in f.classes}
_DUCK_NAME_SETS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def _looks_like_rope_decoder(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_embeddings" in params and hasattr(module, "o_proj") and bool(getattr(module, "is_causal", False))


def family_of(module: nn.Module) -> AttentionFamily | None:
    """The table's entry for ``module``'s class (or an ancestor class), else a
    duck-typed family when the module has Linear Q/K/V projections under a
    known name set, else None (not an attention block)."""
    for cls in type(module).__mro__:
        fam = _BY_CLASS.get(cls.__name__)
        if fam is not None:
            return fam
    for names in _DUCK_NAME_SETS:
        if all(isinstance(getattr(module, a, None), nn.Linear) for a in names):
            decoder = _looks_like_rope_decoder(module)
            return AttentionFamily(
                f"duck-typed ({type(module).__name__})", (type(module).__name__,), DECODER if decoder else ENCODER,
                qkv=names, out_proj="o_proj" if decoder else None, rope="llama" if decoder else None,
                config_unsupported=_llama_config_unsupported if decoder else _nothing_unsupported,
                module_unsupported=_llama_module_unsupported if decoder else _nothing_unsupported, duck_typed=True)
    return None


def family_of_architecture(architecture: str) -> AttentionFamily | None:
    """The family whose causal LM ``architecture`` (a Hugging Face
    ``config.architectures`` entry) is, or None."""
    return next((f for f in FAMILIES if architecture in f.causal_lm_architectures), None)


def causal_lm_architectures() -> tuple[str, ...]:
    """Every causal-LM architecture the table vouches for."""
    return tuple(a for f in FAMILIES for a in f.causal_lm_architectures)


def multimodal_family_of(model: nn.Module) -> MultimodalFamily | None:
    for cls in type(model).__mro__:
        for fam in MULTIMODAL:
            if cls.__name__ in fam.classes:
                return fam
    return None


def part_of(model: nn.Module, site_name: str, family: AttentionFamily) -> str:
    """Which part of the model a site belongs to: a multimodal wrapper's part
    name ("vision", "language"), else "language" for decoders and the
    family's modality ("text" or "vision") for encoders."""
    mm = multimodal_family_of(model)
    if mm is not None:
        for part, path in mm.parts.items():
            if site_name == path or site_name.startswith(path + "."):
                return part
    if family.is_decoder:
        return "language"
    return family.modality
