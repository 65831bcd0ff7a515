"""QSVD models on vLLM's engine: an attention layer with its own paged
latent cache and backend, and the QSVD variants of the LLaMA-family causal
LMs (registered by ``qsvd_kernels.integrations.vllm.register``).

Per layer and step, for the step's N tokens (any mix of prefills, chunked
prefills, prefix-cache hits and decodes):

1. ``c = x W_d``: hadamard_quant + quant_gemm, fp32 [N, r] (W_d and the
   latent are replicated on every tensor-parallel rank, as vLLM does for MLA);
2. latent_cache_append writes c's rows at vLLM's ``slot_mapping`` into the
   layer's page: ``block_size`` packed rows of (codes | fp32 scale), the
   layout of docs/ops.md, so vLLM counts every byte and prefix caching,
   block zeroing and KV connectors move the scales with the codes;
3. q from the *cached* rows (quant_gemm with W_uq; queries see exactly what
   later keys see), rotated at the tokens' positions;
4. decode tokens (one new token of a request): latent_attention over vLLM's
   block table and sequence lengths (K rebuilt, V absorbed inside the op);
   prefill tokens: latent_reconstruct_kv of the request's whole context plus
   causal attention with the context offset. K and V live for this call only.

The layer is this rank's heads: q, W_uk / W_uv and o_proj are sharded by
head (kv heads replicated when there are fewer than ranks, as vLLM does).

Never silent: a step whose metadata or cache is missing raises, except
vLLM's own profiling run, which has no cache by design (vLLM's backends
return nothing there too).
"""

from __future__ import annotations

from . import check_vllm_version

check_vllm_version()  # before touching vLLM internals: an unsupported vLLM gets this error, not an ImportError

import os  # noqa: E402

# vLLM's block tables and slot mappings are valid by construction: skip the
# ops' host-side index checks on CUDA (a device-to-host copy and a sync per
# call, which CUDA graphs cannot capture). The kernels still guard every
# index on the device (docs/ops.md). Read once, at the first op call.
os.environ.setdefault("QSVD_SKIP_INDEX_CHECKS", "1")

from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from typing import ClassVar  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from vllm.config import VllmConfig, get_current_vllm_config  # noqa: E402
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size  # noqa: E402
from vllm.forward_context import get_forward_context  # noqa: E402
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: E402
from vllm.model_executor.layers.linear import RowParallelLinear  # noqa: E402
from vllm.model_executor.layers.rotary_embedding import get_rope  # noqa: E402
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM  # noqa: E402
from vllm.utils.torch_utils import direct_register_custom_op  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from ... import reference as R  # noqa: E402
from ...model.families import causal_lm_architectures, config_sliding_window, family_of_architecture  # noqa: E402
from ...model.layer_tensors import BIAS_NAMES, QSVDLayerSpec  # noqa: E402
from ...compress.quant import QuantConfig  # noqa: E402
from ..core import LatentCache, Projection, QSVDAttentionCore, refuse_k_bias  # noqa: E402
from ..export import EXPORT_FORMAT, QSVD_PREFIX, READABLE_EXPORT_VERSIONS  # noqa: E402


# ----------------------------------------------------------------- KV cache spec
@dataclass(frozen=True, kw_only=True)
class QSVDLatentSpec(FullAttentionSpec):
    """One layer's page: ``block_size`` packed latent rows of
    ``packed_row_bytes(bits, rank)`` bytes (codes, then the fp32 scale).
    Expressed as one uint8 "head" of that size with no V part, so vLLM's
    page arithmetic counts exactly these bytes; ranks may differ per layer
    (vLLM groups such layers under one block table)."""

    rank: int = 0
    bits: int = 8


# ------------------------------------------------------------------ metadata
@dataclass
class QSVDMetadata:
    num_tokens: int  # real tokens of the step (the input may be padded past them)
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_reqs] int32: context incl. this step's tokens
    decode_reqs: torch.Tensor  # requests with one new token
    decode_tokens: torch.Tensor  # their token rows
    # (request, first token row, number of tokens, sequence length) of the others
    prefills: list[tuple[int, int, int, int]]
    max_seq_len: int


class QSVDMetadataBuilder(AttentionMetadataBuilder[QSVDMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> QSVDMetadata:
        m = common_attn_metadata
        n, T = m.num_reqs, m.num_actual_tokens
        qsl = m.query_start_loc_cpu[: n + 1].tolist()
        # Host sequence lengths, for the prefills only (their K/V size depends
        # on them): vLLM's host copy, exact for prefill rows, so no device
        # sync; decodes never read them on the host (CUDA graphs).
        host = m.seq_lens_cpu_upper_bound if m.seq_lens_cpu_upper_bound is not None else m.seq_lens.cpu()
        seq_lens_host = host[:n].tolist()
        qlens = [qsl[i + 1] - qsl[i] for i in range(n)]
        dec = [i for i in range(n) if qlens[i] == 1]
        prefills = [(i, qsl[i], qlens[i], int(seq_lens_host[i])) for i in range(n) if qlens[i] > 1]
        dev = m.seq_lens.device
        return QSVDMetadata(
            num_tokens=T, slot_mapping=m.slot_mapping[:T].long(), block_table=m.block_table_tensor[:n],
            seq_lens=m.seq_lens[:n].to(torch.int32), decode_reqs=torch.tensor(dec, dtype=torch.long, device=dev),
            decode_tokens=torch.tensor([qsl[i] for i in dec], dtype=torch.long, device=dev), prefills=prefills,
            max_seq_len=int(max(seq_lens_host, default=0)))


class QSVDAttentionImpl(AttentionImpl):
    """vLLM expects an impl object on every attention layer; the QSVD layer
    does its own work (``QSVDAttention.attend``), so this one holds no state
    and is never run."""

    def __init__(self, *args, **kwargs):
        self.kv_cache_dtype = "auto"

    def forward(self, *args, **kwargs):
        raise RuntimeError("QSVDAttentionImpl.forward is not used: QSVDAttention.attend does the work")


class QSVDLatentBackend(AttentionBackend):
    """The backend of the QSVD latent cache (CPU and CUDA: the ops dispatch
    by device)."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "QSVD_LATENT"

    @staticmethod
    def get_impl_cls():
        return QSVDAttentionImpl

    @staticmethod
    def get_builder_cls():
        return QSVDMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, block_size, head_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any packed row size

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0


# ------------------------------------------------------------ the attention
def _shard(total: int, tp_size: int, tp_rank: int, what: str) -> tuple[int, int]:
    """(first, count) of this rank's ``total`` heads; fewer kv heads than
    ranks are replicated (rank r holds kv head r // (tp_size / total))."""
    if total >= tp_size:
        if total % tp_size:
            raise ValueError(f"{what} = {total} is not divisible by the tensor-parallel size {tp_size}")
        per = total // tp_size
        return tp_rank * per, per
    if tp_size % total:
        raise ValueError(f"the tensor-parallel size {tp_size} is not a multiple of {what} = {total}")
    return tp_rank // (tp_size // total), 1


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
        specs = _layer_specs(config)
        if layer_idx is None or layer_idx >= len(specs):
            raise ValueError(f"{prefix}: no QSVD layer spec for this layer in config.qsvd")
        spec = specs[layer_idx]
        head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        if (spec.hidden, spec.num_heads, spec.num_kv_heads, spec.head_dim) != (hidden_size, num_heads, num_kv_heads,
                                                                              head_dim):
            raise ValueError(f"{prefix}: config.qsvd's layer spec {spec} does not match the model's attention "
                             f"(hidden {hidden_size}, {num_heads} heads, {num_kv_heads} kv heads, head_dim {head_dim})")

        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        h0, local_heads = _shard(num_heads, tp_size, tp_rank, "num_attention_heads")
        kv0, local_kv = _shard(num_kv_heads, tp_size, tp_rank, "num_key_value_heads")
        self.spec = spec.local(local_heads, local_kv)
        self.num_heads, self.num_kv_heads, self.head_dim, self.rank = local_heads, local_kv, head_dim, spec.rank
        self._slices = {"q_rows": (h0 * head_dim, local_heads * head_dim), "kv_heads": (kv0, local_kv)}
        self.scaling = head_dim**-0.5

        self.qsvd = nn.Module()  # the kernels' operands, loaded from model.layers.{i}.self_attn.qsvd.*
        for name, ts in self.spec.tensors().items():
            p = nn.Parameter(torch.zeros(ts.shape, dtype=ts.dtype), requires_grad=False)
            p.weight_loader = partial(self._load_sharded, shard=ts.shard)
            setattr(self.qsvd, name, p)
        self._loaded: set[str] = set()
        self.core = QSVDAttentionCore(self.spec, self.qsvd)

        self.o_proj = RowParallelLinear(input_size=num_heads * head_dim, output_size=hidden_size, bias=bias_o_proj,
                                        quant_config=None, prefix=f"{prefix}.o_proj")
        rope = get_rope(head_dim, max_position=max_position_embeddings,
                        rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True,
                        dtype=torch.float32)
        cos, sin = rope._compute_cos_sin_cache().float().chunk(2, dim=-1)  # fp32 [max_pos, d/2] each
        # rotate-half tables [max_pos, d] (docs/ops.md), shared by q and the op's K rebuild
        self.register_buffer("rope_cos", torch.cat((cos, cos), -1).contiguous(), persistent=False)
        self.register_buffer("rope_sin", torch.cat((sin, sin), -1).contiguous(), persistent=False)

        self.kv_cache = torch.tensor([])  # bound by vLLM (bind_kv_cache)
        self.impl = QSVDAttentionImpl()
        ctx = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"duplicate layer name {prefix}")
        ctx[prefix] = self

    # ------------------------------------------------------------- weights
    def _shard_of(self, loaded: torch.Tensor, shard: str) -> torch.Tensor:
        """This rank's part of a whole checkpoint tensor (model.layer_tensors' sharding)."""
        if shard == "whole":
            return loaded
        lo, n = self._slices[shard]
        if shard == "kv_heads" and loaded.dim() == 1:  # a flat [H_kv d] bias
            return loaded.view(-1, self.head_dim).narrow(0, lo, n).reshape(-1)
        return loaded.narrow(0, lo, n)

    def _load_sharded(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        _copy_checked(param, self._shard_of(loaded, shard), self.layer_name)

    def load_weights(self, weights) -> set[str]:
        """``qsvd.*`` operands (sharded per rank) and ``o_proj.*``; called by
        vLLM's AutoWeightsLoader with names relative to this layer."""
        loaded = set()
        o_params = dict(self.o_proj.named_parameters())
        for name, tensor in weights:
            if name.startswith("qsvd."):
                key = name[len("qsvd."):]
                if key in BIAS_NAMES:
                    self._add_bias(key, tensor)
                elif hasattr(self.qsvd, key):
                    p = getattr(self.qsvd, key)
                    p.weight_loader(p, tensor)
                else:
                    raise ValueError(f"{self.layer_name}: unexpected tensor {name!r} in the checkpoint")
                self._loaded.add(key)
            elif name.startswith("o_proj."):
                p = o_params[name[len("o_proj."):]]
                getattr(p, "weight_loader")(p, tensor)
            else:
                raise ValueError(f"{self.layer_name}: unexpected tensor {name!r} (a QSVD layer has no q/k/v "
                                 "projections: was the model exported with `python -m qsvd_kernels export`?)")
            loaded.add(name)
        return loaded

    def _add_bias(self, key: str, tensor: torch.Tensor) -> None:
        if key == "bk":
            refuse_k_bias(tensor, self.layer_name)
            return  # zero: nothing to add
        ts = self.spec.tensors(biases=(key,))[key]
        t = self._shard_of(tensor, ts.shard)
        if tuple(t.shape) != ts.shape:
            raise ValueError(f"{self.layer_name}: bias {key} is {tuple(tensor.shape)} in the checkpoint")
        self.qsvd.register_buffer(key, t.float().contiguous(), persistent=False)

    def check_loaded(self) -> None:
        missing = [n for n in self.spec.tensors() if n not in self._loaded]
        if missing:
            raise ValueError(f"{self.layer_name}: the checkpoint lacks QSVD tensors {missing}: export the model "
                             "with `python -m qsvd_kernels export --format vllm`")

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

    def page(self) -> torch.Tensor:
        """This layer's cache as the ops take it: uint8 [num_blocks, block_size, row bytes + 4]."""
        kv, row = self.kv_cache, self.spec.cache_row_bytes
        if kv.dim() == 4 and kv.shape[1] == 1:  # vLLM's [blocks, heads, tokens, content] view, one head
            kv = kv.squeeze(1)
        if kv.dim() != 3 or kv.dtype != torch.uint8 or kv.shape[-1] != row:
            raise RuntimeError(f"{self.layer_name}: the KV cache vLLM bound is {tuple(kv.shape)} {kv.dtype}, "
                               f"expected uint8 [num_blocks, block_size, {row}]")
        if not kv.is_contiguous():
            raise RuntimeError(f"{self.layer_name}: the KV cache vLLM bound is not one contiguous buffer per layer "
                               f"(strides {kv.stride()}); use a layer-compact VLLM_KV_CACHE_LAYOUT (e.g. LBHNC)")
        return kv

    def attend(self, c: torch.Tensor, q: torch.Tensor, positions: torch.Tensor, out: torch.Tensor,
               meta: QSVDMetadata | None) -> None:
        if meta is None:
            # vLLM's profiling (dummy) run: no cache is allocated yet, and no
            # output is read. vLLM's own backends return without computing too.
            out.zero_()
            return
        T, core = meta.num_tokens, self.core
        cache = LatentCache(self.page(), None)
        proj, slots = Projection(c[:T], None, None), meta.slot_mapping
        core.append(proj, slots, cache)
        q = core.queries(proj, core.read_rows(cache, slots)) if core.queries_need_rows else q[:T]
        pos = positions[:T].long()
        q = R.apply_rope_ref(q.view(T, self.num_heads, self.head_dim), self.rope_cos[pos][:, None],
                             self.rope_sin[pos][:, None])
        result = torch.empty(T, self.num_heads, self.head_dim, dtype=torch.float32, device=c.device)
        if meta.decode_tokens.numel():
            result[meta.decode_tokens] = core.decode(q[meta.decode_tokens], cache, meta.block_table[meta.decode_reqs],
                                                     meta.seq_lens[meta.decode_reqs], self.rope_cos, self.rope_sin,
                                                     self.scaling)
        if meta.prefills:
            self._prefill(q, cache, meta, result)
        out[:T] = result.reshape(T, -1).to(out.dtype)
        out[T:] = 0

    def _prefill(self, q, cache: LatentCache, meta: QSVDMetadata, result) -> None:
        """Each prefilling request's new tokens attend causally over its whole
        context (cached prefix + this chunk), rebuilt from the latent."""
        reqs = torch.tensor([p[0] for p in meta.prefills], dtype=torch.long, device=q.device)
        k, v = self.core.keys_values(cache, meta.block_table[reqs], meta.seq_lens[reqs], self.rope_cos, self.rope_sin)
        rep = self.num_heads // self.num_kv_heads
        start = 0
        for _, t0, n, L in meta.prefills:
            K = k[start : start + L].transpose(0, 1).repeat_interleave(rep, 0)  # [H, L, d]
            V = v[start : start + L].transpose(0, 1).repeat_interleave(rep, 0)
            start += L
            qi = q[t0 : t0 + n].transpose(0, 1)  # [H, n, d]
            keys = torch.arange(L, device=q.device)
            allowed = keys[None, :] <= (L - n + torch.arange(n, device=q.device))[:, None]  # causal, offset L - n
            o = F.scaled_dot_product_attention(qi[None], K[None], V[None], attn_mask=allowed[None, None],
                                               scale=self.scaling)
            result[t0 : t0 + n] = o[0].transpose(0, 1)


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
def _qsvd_config(config) -> dict:
    qsvd = getattr(config, "qsvd", None)
    if not isinstance(qsvd, dict):
        raise ValueError("this model's config.json has no 'qsvd' block: export it with `python -m qsvd_kernels "
                         "export --format vllm --model <hf dir> --artefact <qsvd dir> --out <dir>`")
    if qsvd.get("format") != EXPORT_FORMAT or qsvd.get("format_version") not in READABLE_EXPORT_VERSIONS:
        raise ValueError(f"config.qsvd is format {qsvd.get('format')!r} version {qsvd.get('format_version')!r}; "
                         f"this qsvd-kernels reads {EXPORT_FORMAT!r} versions {READABLE_EXPORT_VERSIONS}: re-export "
                         "the model")
    for key in ("ranks", "quant"):
        if key not in qsvd:
            raise ValueError(f"config.qsvd lacks {key!r}: re-export the model")
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(qsvd["quant"], list) or len(qsvd["quant"]) != len(qsvd["ranks"]):
        raise ValueError("config.qsvd.quant must hold one entry per layer (as config.qsvd.ranks): re-export the model")
    if n is not None and len(qsvd["ranks"]) != n:
        raise ValueError(f"config.qsvd has {len(qsvd['ranks'])} ranks for {n} layers: every decoder layer must be "
                         "compressed")
    return qsvd


def _layer_specs(config) -> list[QSVDLayerSpec]:
    """Every layer's spec from config.qsvd: version 2 states them; version 1
    (ranks and quant lists) means the "qkv" latent form with the config's dims.
    Each layer's bit widths and clips are checked as a QuantConfig."""
    qsvd = _qsvd_config(config)
    try:
        if qsvd["format_version"] >= 2:
            specs = [QSVDLayerSpec.from_dict(d) for d in qsvd["layers"]]
            quants = [QuantConfig(s.w_bits, s.a_bits, s.latent_bits, s.a_clip, s.latent_clip) for s in specs]
        else:
            E, H = config.hidden_size, config.num_attention_heads
            H_kv, d = getattr(config, "num_key_value_heads", None) or H, getattr(config, "head_dim", None) or E // H
            quants = [QuantConfig(**q) for q in qsvd["quant"]]
            specs = [QSVDLayerSpec(E, H, H_kv, d, int(r), "qkv", q.w_bits, q.a_bits, q.latent_bits, q.a_clip,
                                   q.latent_clip) for r, q in zip(qsvd["ranks"], quants)]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.qsvd's layer specs are malformed ({e}): re-export the model") from None
    for i, q in enumerate(quants):
        if not (q.w_bits < 16 and q.a_bits < 16 and q.latent_bits < 16):
            raise ValueError(f"config.qsvd layer {i} is {q.name}: vLLM serves quantized artefacts only (W8A8, W8A4 "
                             "or W4A4): re-export one")
    return specs


def _copy_checked(param: nn.Parameter, loaded: torch.Tensor, where: str) -> None:
    if tuple(loaded.shape) != tuple(param.shape) or loaded.dtype != param.dtype:
        raise ValueError(f"{where}: checkpoint tensor {tuple(loaded.shape)} {loaded.dtype} does not fit "
                         f"{tuple(param.shape)} {param.dtype} (config.qsvd and the weights disagree)")
    param.data.copy_(loaded)


class _QSVDCausalLM(LlamaForCausalLM):
    """A LLaMA-family causal LM whose attention layers are QSVDAttention.
    Llama, Mistral and Qwen2 share the decoder block (RMSNorm, gated SiLU
    MLP, rotate-half RoPE); their differences inside attention (biases) come
    from the artefact."""

    base_architecture: ClassVar[str] = ""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        qsvd = _qsvd_config(config)
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
                attn.check_loaded()
        return loaded


def _variant(architecture: str) -> type:
    return type(QSVD_PREFIX + architecture, (_QSVDCausalLM,), {"base_architecture": architecture,
                                                               "__module__": __name__})


# One class per causal LM of the model-family table (QSVDLlamaForCausalLM,
# QSVDMistralForCausalLM, QSVDQwen2ForCausalLM): the names register() uses.
for _arch in causal_lm_architectures():
    globals()[QSVD_PREFIX + _arch] = _variant(_arch)
