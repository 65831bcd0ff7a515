"""QSVD models on vLLM's engine: an attention layer with its own paged
latent cache and backend, and the QSVD variants of the LLaMA-family causal
LMs (registered by ``qsvd_kernels.integrations.vllm.register``).

Per layer and step, vLLM's N tokens (any mix of prefills, chunked
prefills, prefix-cache hits and decodes) run the engine-neutral step,
``integrations/core.py``: projection before the layer's one opaque op, then
inside it the append at vLLM's ``slot_mapping``, the queries, and
latent_attention (decodes) or the causal prefill over vLLM's block table.
The page is ``block_size`` packed rows of (codes | fp32 scale), the layout
of docs/ops.md, so vLLM counts every byte and prefix caching, block zeroing
and KV connectors move the scales with the codes (``backend.py``).

With partial RoPE, K's rotary part is cached by default (the cached form,
integrations/core.py ``rope_keys_cached``) in a second page per layer
(``QSVDRotaryKeys``, a layer of its own to vLLM: same block table, its
bytes counted). ``LLM(..., additional_config={"qsvd": {"rope_key_cache":
"rebuilt"}})`` rebuilds it at each step instead ("auto", "cached",
"rebuilt").

The layer is this rank's heads: q, W_uk / W_uv and o_proj are sharded by
head (kv heads replicated when there are fewer than ranks, as vLLM does).

Never silent: a step whose metadata or cache is missing raises, except
vLLM's own profiling run, which has no cache by design (vLLM's backends
return nothing there too).
"""

from __future__ import annotations

from . import check_vllm_version

check_vllm_version()  # before touching vLLM internals: an unsupported vLLM gets this error, not an ImportError

from dataclasses import replace  # noqa: E402
from functools import partial  # noqa: E402
from typing import ClassVar  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from vllm.config import VllmConfig, get_current_vllm_config  # noqa: E402
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size  # noqa: E402
from vllm.forward_context import get_forward_context  # noqa: E402
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: E402
from vllm.model_executor.layers.linear import RowParallelLinear  # noqa: E402
from vllm.model_executor.layers.rotary_embedding import get_rope  # noqa: E402
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM  # noqa: E402
from vllm.utils.torch_utils import direct_register_custom_op  # noqa: E402

from ...model.families import causal_lm_architectures, config_sliding_window, family_of_architecture  # noqa: E402
from ..core import LatentCache, Projection, QSVDAttentionCore  # noqa: E402
from ..export import QSVD_PREFIX  # noqa: E402
from .backend import QSVDAttentionImpl, QSVDLatentBackend, QSVDLatentSpec, QSVDMetadata, QSVDRopeKeysSpec  # noqa: E402
from .config import layer_specs, qsvd_config  # noqa: E402
from .weights import QSVDOperands, tp_shard  # noqa: E402


def _register_layer(layer, name: str) -> None:
    """Put a layer in vLLM's forward context (where vLLM finds the layers
    that own KV cache pages, and where the op finds them at run time)."""
    ctx = get_current_vllm_config().compilation_config.static_forward_context
    if name in ctx:
        raise ValueError(f"duplicate layer name {name}")
    ctx[name] = layer


def _rope_key_cache_choice() -> str:
    """``additional_config={"qsvd": {"rope_key_cache": ...}}`` of the LLM,
    "auto" when not given (checked by core.rope_keys_cached)."""
    extra = get_current_vllm_config().additional_config
    qsvd = extra.get("qsvd", {}) if isinstance(extra, dict) else {}
    if not isinstance(qsvd, dict):
        raise ValueError(f"additional_config['qsvd'] must be a dict, got {type(qsvd).__name__}")
    unknown = set(qsvd) - {"rope_key_cache"}
    if unknown:
        raise ValueError(f"additional_config['qsvd'] has unknown keys {sorted(unknown)}; known: ['rope_key_cache']")
    return qsvd.get("rope_key_cache", "auto")


def _bound_page(kv: torch.Tensor, name: str, row: int) -> torch.Tensor:
    """A layer's bound cache as uint8 [num_blocks, block_size, row], checked."""
    if kv.dim() == 4 and kv.shape[1] == 1:  # vLLM's [blocks, heads, tokens, content] view, one head
        kv = kv.squeeze(1)
    if kv.dim() != 3 or kv.dtype != torch.uint8 or kv.shape[-1] != row:
        raise RuntimeError(f"{name}: the KV cache vLLM bound is {tuple(kv.shape)} {kv.dtype}, expected uint8 "
                           f"[num_blocks, block_size, {row}]")
    if not kv.is_contiguous():
        raise RuntimeError(f"{name}: the KV cache vLLM bound is not one contiguous buffer per layer (strides "
                           f"{kv.stride()}); use a layer-compact VLLM_KV_CACHE_LAYOUT (e.g. LBHNC)")
    return kv


class QSVDRotaryKeys(nn.Module, AttentionLayerBase):
    """The page of a QSVD layer's cached rotary keys, a layer of its own to
    vLLM (``{layer}.rope_keys``): it owns that page and computes nothing;
    its QSVDAttention reads and writes it."""

    def __init__(self, spec, name: str):
        super().__init__()
        self.spec, self.layer_name = spec, name
        self.row_bytes = 2 * spec.num_kv_heads * spec.d_rope
        self.kv_cache = torch.tensor([])  # bound by vLLM (bind_kv_cache)
        self.impl = QSVDAttentionImpl()
        _register_layer(self, name)

    def get_attn_backend(self):
        return QSVDLatentBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> QSVDRopeKeysSpec:
        return QSVDRopeKeysSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1,
                                head_size=self.row_bytes, head_size_v=0, dtype=torch.uint8)

    def page(self) -> torch.Tensor:
        """fp16 [num_blocks, block_size, H_kv, d_rope], as the ops take it."""
        kv = _bound_page(self.kv_cache, self.layer_name, self.row_bytes)
        return kv.view(torch.float16).view(*kv.shape[:2], self.spec.num_kv_heads, self.spec.d_rope)


# ------------------------------------------------------------ the attention
class QSVDAttention(nn.Module, AttentionLayerBase):
    """Drop-in for LlamaAttention (same constructor) in QSVD models: vLLM's
    adapter around the engine-neutral step (integrations/core.py). It holds
    this rank's operands (declared from the layer spec, model.layer_tensors)
    and turns vLLM's metadata into the core's arguments."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type: str = "decoder"):
        super().__init__()
        if attn_type != "decoder":
            raise NotImplementedError(f"QSVD attention serves causal decoders; this layer is {attn_type}")
        if quant_config is not None:
            raise NotImplementedError("a QSVD model carries its own quantization; vLLM's quantization config "
                                      f"({type(quant_config).__name__}) cannot apply to it")
        self.layer_name = prefix
        layer_idx = int(prefix.split(".")[-2]) if prefix.split(".")[-1] == "self_attn" else None
        specs = layer_specs(config)
        if layer_idx is None or layer_idx >= len(specs):
            raise ValueError(f"{prefix}: no QSVD layer spec for this layer in config.qsvd")
        spec = specs[layer_idx]
        head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        if (spec.hidden, spec.num_heads, spec.num_kv_heads, spec.head_dim) != (hidden_size, num_heads, num_kv_heads,
                                                                              head_dim):
            raise ValueError(f"{prefix}: config.qsvd's layer spec {spec} does not match the model's attention "
                             f"(hidden {hidden_size}, {num_heads} heads, {num_kv_heads} kv heads, head_dim {head_dim})")

        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        h0, local_heads = tp_shard(num_heads, tp_size, tp_rank, "num_attention_heads")
        kv0, local_kv = tp_shard(num_kv_heads, tp_size, tp_rank, "num_key_value_heads")
        self.spec = spec.local(local_heads, local_kv)
        self.num_heads, self.num_kv_heads, self.head_dim, self.rank = local_heads, local_kv, head_dim, spec.rank
        self.scaling = head_dim**-0.5
        # the kernels' operands, loaded from model.layers.{i}.self_attn.qsvd.*
        self.qsvd = QSVDOperands(self.spec, {"q_rows": (h0 * head_dim, local_heads * head_dim),
                                             "kv_heads": (kv0, local_kv)}, prefix)
        # vLLM's slot mappings and block tables are valid by construction: the
        # CUDA launchers skip their host check of them (a sync per call, which
        # CUDA graphs cannot capture); the kernels still guard every index.
        self.core = QSVDAttentionCore(self.spec, self.qsvd, check_indices=False,
                                      rope_key_cache=_rope_key_cache_choice())

        self.o_proj = RowParallelLinear(input_size=num_heads * head_dim, output_size=hidden_size, bias=bias_o_proj,
                                        quant_config=None, prefix=f"{prefix}.o_proj")
        rope = get_rope(head_dim, max_position=max_position_embeddings,
                        rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True,
                        dtype=torch.float32)
        cos, sin = rope._compute_cos_sin_cache().float().chunk(2, dim=-1)  # fp32 [max_pos, d/2] each
        # this layer's rotate-half tables [max_pos, d_rope] (docs/ops.md; None
        # without rotary dims), shared by q and the ops, selected once
        cos, sin = self.core.layer_rope_tables(torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.kv_cache = torch.tensor([])  # bound by vLLM (bind_kv_cache)
        self.impl = QSVDAttentionImpl()
        _register_layer(self, prefix)
        # last, once nothing above can raise: no stale entry in the forward context
        self.rope_keys = QSVDRotaryKeys(self.spec, f"{prefix}.rope_keys") if self.core.rope_keys_cached else None

    # ------------------------------------------------------------- weights
    def load_weights(self, weights) -> set[str]:
        """``qsvd.*`` operands (sharded per rank) and ``o_proj.*``; called by
        vLLM's AutoWeightsLoader with names relative to this layer."""
        loaded = set()
        o_params = dict(self.o_proj.named_parameters())
        for name, tensor in weights:
            if name.startswith("qsvd."):
                self.qsvd.load(name[len("qsvd."):], tensor)
            elif name.startswith("o_proj."):
                p = o_params[name[len("o_proj."):]]
                getattr(p, "weight_loader")(p, tensor)
            else:
                raise ValueError(f"{self.layer_name}: unexpected tensor {name!r} (a QSVD layer has no q/k/v "
                                 "projections: was the model exported with `python -m qsvd_kernels export`?)")
            loaded.add(name)
        return loaded

    # ------------------------------------------------------------ vLLM glue
    def get_attn_backend(self):
        return QSVDLatentBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> QSVDLatentSpec:
        return QSVDLatentSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1,
                              head_size=self.spec.cache_row_bytes, head_size_v=0, dtype=torch.uint8, rank=self.rank,
                              bits=self.spec.latent_bits)

    # -------------------------------------------------------------- forward
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        proj = self.core.project(hidden_states)
        # "kv" form: q reads x's codes, no cache: made here; "qkv": from the cached rows, inside the op
        q = proj.c.new_empty(0) if self.core.queries_need_rows else self.core.queries(proj)
        out = torch.empty(hidden_states.shape[0], self.num_heads * self.head_dim, dtype=hidden_states.dtype,
                          device=hidden_states.device)
        torch.ops.vllm.qsvd_latent_attention(proj.c, q, positions, out, self.layer_name)
        o, _ = self.o_proj(out)
        return o

    def page(self) -> LatentCache:
        """This layer's cache as the ops take it: packed rows uint8
        [num_blocks, block_size, row bytes + 4], and the rotary keys' page
        when they are cached."""
        rows = _bound_page(self.kv_cache, self.layer_name, self.spec.cache_row_bytes)
        keys = None if self.rope_keys is None else self.rope_keys.page()
        if keys is not None and keys.shape[:2] != rows.shape[:2]:
            raise RuntimeError(f"{self.layer_name}: vLLM bound {keys.shape[0]} blocks of rotary keys for "
                               f"{rows.shape[0]} latent blocks")
        return LatentCache(rows, None, keys)

    def attend(self, c: torch.Tensor, q: torch.Tensor, positions: torch.Tensor, out: torch.Tensor,
               meta: QSVDMetadata | None) -> None:
        if meta is None:
            # vLLM's profiling (dummy) run: no cache is allocated yet, and no
            # output is read. vLLM's own backends return without computing too.
            out.zero_()
            return
        T = meta.num_tokens
        step = replace(meta.step, positions=positions[:T].long())
        # prefill rows attend in the model's dtype, as vLLM's own backends do
        # (bf16 on the CPU: torch's bf16 GEMMs, 0.45x its SDPA's time; core.causal_attention)
        result = self.core.run(Projection(c[:T], None, None), self.page(), step, self.rope_cos,
                               self.rope_sin, self.scaling, q=None if self.core.queries_need_rows else q[:T],
                               layer_tables=True, prefill_dtype=out.dtype)
        out[:T] = result.reshape(T, -1).to(out.dtype)
        out[T:] = 0


def _qsvd_latent_attention(c: torch.Tensor, q: torch.Tensor, positions: torch.Tensor, out: torch.Tensor,
                           layer_name: str) -> None:
    ctx = get_forward_context()
    layer: QSVDAttention = ctx.no_compile_layers[layer_name]
    meta = ctx.attn_metadata
    if isinstance(meta, list):  # speculative decoding: [0] is the base model's
        meta = meta[0]
    if isinstance(meta, dict):
        if layer_name not in meta:
            raise RuntimeError(f"{layer_name}: vLLM built no attention metadata for this QSVD layer")
        meta = meta[layer_name]
    layer.attend(c, q, positions, out, meta)


def _qsvd_latent_attention_fake(c, q, positions, out, layer_name) -> None:
    return None


# One opaque op per layer call (like vLLM's unified_attention): torch.compile
# and CUDA graphs see one node; it mutates only `out` (and the cache it owns).
# q: the "kv" form's queries (made before the op), empty for the "qkv" form.
direct_register_custom_op(op_name="qsvd_latent_attention", op_func=_qsvd_latent_attention,
                          mutates_args=["out"], fake_impl=_qsvd_latent_attention_fake)


# ------------------------------------------------------------------ models
class _QSVDCausalLM(LlamaForCausalLM):
    """A LLaMA-family causal LM whose attention layers are QSVDAttention.
    Llama, Mistral and Qwen2 share the decoder block (RMSNorm, gated SiLU
    MLP, rotate-half RoPE); their differences inside attention (biases) come
    from the artefact."""

    base_architecture: ClassVar[str] = ""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        qsvd = qsvd_config(config)
        if qsvd.get("base_architecture") != self.base_architecture or family_of_architecture(
                self.base_architecture) is None:
            raise ValueError(f"config.qsvd.base_architecture is {qsvd.get('base_architecture')!r}, but this is "
                             f"{type(self).__name__}: re-export the model")
        family = family_of_architecture(self.base_architecture)
        problems = family.config_unsupported(config)
        if problems:
            raise NotImplementedError(f"{', '.join(problems)} is not implemented by the QSVD attention layer")
        window = config_sliding_window(config)
        if window is not None and window < vllm_config.model_config.max_model_len:
            raise NotImplementedError(f"sliding-window attention (window {window}) is not implemented by the QSVD "
                                      "attention layer; set max_model_len to at most the window")
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=partial(LlamaDecoderLayer, attn_layer_type=QSVDAttention))

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        for layer in self.model.layers:
            attn = getattr(layer, "self_attn", None)
            if isinstance(attn, QSVDAttention):
                attn.qsvd.check_loaded()
        return loaded


def _variant(architecture: str) -> type:
    return type(QSVD_PREFIX + architecture, (_QSVDCausalLM,), {"base_architecture": architecture,
                                                               "__module__": __name__})


# One class per causal LM of the model-family table (QSVDLlamaForCausalLM,
# QSVDMistralForCausalLM, QSVDQwen2ForCausalLM): the names register() uses.
for _arch in causal_lm_architectures():
    globals()[QSVD_PREFIX + _arch] = _variant(_arch)
