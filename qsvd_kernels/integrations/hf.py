"""Hugging Face models on the qsvd ops: compressed attention modules, and a
latent KV cache for ``model.generate()``.

    compressed = CompressedModel.load("artefact/")
    apply_qsvd(model, compressed)                      # in place, one call
    out, cache = generate(model, input_ids, max_new_tokens=32)
    print(cache.token_nbytes(), cache.fp16_kv_token_nbytes())

Two kinds of attention block are served:

- **RoPE decoders** (LLaMA family: LLaMA, Mistral, Qwen2-style blocks with
  ``q_proj/k_proj/v_proj/o_proj`` and ``position_embeddings``): the block is
  replaced by ``QSVDDecoderAttention``. Each step computes the latent
  ``c = x W_d`` (hadamard_quant + quant_gemm), appends it to the paged latent
  cache (latent_cache_append), computes q from the *cached* codes
  (quant_gemm), then attends: decode (one new token) with latent_attention,
  prefill with latent_reconstruct_kv + dense SDPA. The cache never holds K or V.
- **Encoders without RoPE or cache** (BERT, MiniLM, SigLIP, CLIP): the three
  projections are replaced; q, k and v come from quant_gemm on the quantized
  latent, and the model's own attention runs on them.

``backend="ops"`` runs on ``torch.ops.qsvd`` (needs a quantized artefact:
weights, activations and latent at 4 or 8 bits). ``backend="torch"`` runs the
same math in plain PyTorch (CompressedQKV's simulation) and also serves
unquantized artefacts, e.g. the full-rank parity check.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .. import reference as R
from ..compress.layer import CompressedQKV
from ..compress.pipeline import CompressedModel, ProjectionSlot, SharedProjection, _resolve_sites

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - transformers is an optional extra
    Cache, CacheLayerMixin = object, object

BACKENDS = ("ops", "torch")


# ----------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------


class LatentProjector(nn.Module):
    """One layer's compressed projections, on the ops or in plain torch.

    The latent's quantized form ("rep") is (codes, scale) on the ops and the
    dequantized fp32 latent on the torch backend.
    """

    def __init__(self, layer: CompressedQKV, backend: str = "ops", encoder: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.layer, self.backend, self.dims, self.rank = layer, backend, layer.dims, layer.rank
        self.quant = layer.quant
        if backend == "ops":
            for name, t in layer.kernel_tensors().items():  # raises for unquantized artefacts
                self.register_buffer(name, t, persistent=False)
            if encoder:
                # Encoders take K and V from quant_gemm: W_uk, W_uv as b operands
                # [E_kv, r] (decoders use the per-head layout, never these).
                d = layer.dims
                pack = R.pack_int4 if self.quant.w_bits == 4 else (lambda t: t)
                for name, lo in (("wuk_rows", d.q_dim), ("wuv_rows", d.q_dim + d.kv_dim)):
                    self.register_buffer(name, pack(layer.wu[lo : lo + d.kv_dim].contiguous()), persistent=False)
                    self.register_buffer(name + "_scale", layer.wu_scale[lo : lo + d.kv_dim].contiguous(),
                                         persistent=False)

    @property
    def has_k_bias(self) -> bool:
        b = self.layer.bias
        d = self.dims
        return b is not None and bool((b[d.q_dim : d.q_dim + d.kv_dim] != 0).any())

    def latent(self, x2d: torch.Tensor) -> torch.Tensor:
        """c = x W_d, fp32 [N, r]."""
        if self.backend == "torch":
            return self.layer.latent(x2d).float()
        q = self.quant
        codes, scale = ops.hadamard_quant(x2d.contiguous(), q.a_bits, q.a_clip, self.signs)
        return ops.quant_gemm(codes, scale, self.wd, self.wd_scale, q.a_bits, q.w_bits, torch.float32)

    def quantize_latent(self, c: torch.Tensor):
        """The latent's quantized form without a cache (encoders): the ops
        quantize through latent_cache_append into a transient one-block cache."""
        if self.backend == "torch":
            return self.layer.quantized_latent(c).float()
        q, N, r = self.quant, c.shape[0], self.rank
        last = r // 2 if q.latent_bits == 4 else r
        cache = torch.empty(1, max(N, 1), last, dtype=torch.uint8 if q.latent_bits == 4 else torch.int8,
                            device=c.device)
        scale = torch.empty(1, max(N, 1), dtype=torch.float32, device=c.device)
        ops.latent_cache_append(c, torch.arange(N, device=c.device), cache, scale, q.latent_bits, q.latent_clip)
        return cache[0, :N], scale[0, :N]

    def _up(self, rep, operand, bias, lo, hi):
        """rep (quantized latent) times the rows [lo, hi) of W_u (+ bias), fp32.
        ``operand`` / ``bias`` name the ops backend's buffers."""
        if self.backend == "torch":
            y = rep.double() @ self.layer.dense_weights(rep.device)[1][lo:hi].T
            b = self.layer.bias
            return (y + b[lo:hi].to(y) if b is not None else y).float()
        codes, scale = rep
        return ops.quant_gemm(codes, scale, getattr(self, operand), getattr(self, operand + "_scale"),
                              self.quant.latent_bits, self.quant.w_bits, torch.float32, getattr(self, bias, None))

    def queries(self, rep) -> torch.Tensor:
        return self._up(rep, "wuq", "bq", 0, self.dims.q_dim)

    def keys_values(self, rep) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dims
        return (self._up(rep, "wuk_rows", "bk", d.q_dim, d.q_dim + d.kv_dim),
                self._up(rep, "wuv_rows", "bv", d.q_dim + d.kv_dim, d.out_dim))

    def project(self, x: torch.Tensor):
        """(q, k, v) in x's dtype, for encoders (no cache)."""
        shape = x.shape[:-1]
        rep = self.quantize_latent(self.latent(x.reshape(-1, x.shape[-1])))
        q = self.queries(rep)
        k, v = self.keys_values(rep)
        return tuple(t.reshape(*shape, -1).to(x.dtype) for t in (q, k, v))


# ----------------------------------------------------------------------------
# The latent cache
# ----------------------------------------------------------------------------


class QSVDLatentLayer(CacheLayerMixin):
    """One decoder layer's latent: paged and quantized (ops backend) or an
    fp32 tensor (torch backend). All sequences of the batch advance together.

    Paging: block ``j`` of sequence ``b`` is block ``j * B + b`` of the pool,
    so growing the pool (doubling) never moves a sequence's earlier blocks.
    """

    is_compileable = False

    def __init__(self, projector: LatentProjector, block_size: int = 16):
        super().__init__()
        self.projector = projector
        self.rank, self.block_size = projector.rank, block_size
        # The torch backend keeps the (dequantized) latent in fp32.
        self.bits = projector.quant.latent_bits if projector.backend == "ops" else 32
        self.clip = projector.quant.latent_clip
        self.length, self.batch = 0, None
        self.pool = self.pool_scale = self.block_table = None  # ops
        self.latent = None  # torch backend: [B, L, r] fp32

    # CacheLayerMixin interface
    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a QSVDLatentCache holds only the latent: K and V are never stored. It works with "
                           "attention blocks replaced by qsvd_kernels.integrations.hf.apply_qsvd")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length, self.batch = 0, None
        self.pool = self.pool_scale = self.block_table = self.latent = None

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("QSVDLatentCache does not support beam search yet")

    # the latent
    def _grow(self, B: int, needed: int, device) -> None:
        bs = self.block_size
        blocks_needed = math.ceil(needed / bs)
        have = 0 if self.block_table is None else self.block_table.shape[1]
        if blocks_needed <= have:
            return
        new = max(blocks_needed, 2 * have)
        last = self.rank // 2 if self.bits == 4 else self.rank
        dtype = torch.uint8 if self.bits == 4 else torch.int8
        extra = (new - have) * B
        pool = torch.zeros(extra, bs, last, dtype=dtype, device=device)
        scale = torch.zeros(extra, bs, dtype=torch.float32, device=device)
        self.pool = pool if self.pool is None else torch.cat([self.pool, pool])
        self.pool_scale = scale if self.pool_scale is None else torch.cat([self.pool_scale, scale])
        j = torch.arange(new, device=device)
        self.block_table = (j[None, :] * B + torch.arange(B, device=device)[:, None]).to(torch.int32)

    def append(self, c: torch.Tensor):
        """Store the latent of T new tokens per sequence (c [B, T, r] fp32);
        returns its quantized form for the query path."""
        B, T, r = c.shape
        if self.batch is None:
            self.batch = B
        elif B != self.batch:
            raise ValueError(f"the cache holds {self.batch} sequences, this step has {B}")
        if self.projector.backend == "torch":
            rep = self.projector.quantize_latent(c.reshape(B * T, r))
            step = rep.view(B, T, r)
            self.latent = step if self.latent is None else torch.cat([self.latent, step], dim=1)
            self.length += T
            return rep
        self._grow(B, self.length + T, c.device)
        t = torch.arange(self.length, self.length + T, device=c.device)
        blocks = self.block_table[:, t // self.block_size].long()  # [B, T]
        slots = (blocks * self.block_size + (t % self.block_size)[None, :]).reshape(-1)
        ops.latent_cache_append(c.reshape(B * T, r), slots, self.pool, self.pool_scale, self.bits, self.clip)
        self.length += T
        flat = self.pool.view(-1, self.pool.shape[-1])
        return flat[slots], self.pool_scale.view(-1)[slots]

    def seq_lens(self) -> torch.Tensor:
        return torch.full((self.batch,), self.length, dtype=torch.int32, device=self.block_table.device)

    def nbytes(self) -> int:
        """Bytes the cache holds now (allocated pool, scales, block table)."""
        if self.projector.backend == "torch":
            return 0 if self.latent is None else self.latent.numel() * self.latent.element_size()
        if self.pool is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.pool, self.pool_scale, self.block_table))

    def token_nbytes(self) -> float:
        """Bytes per cached token: codes plus the per-token fp32 scale."""
        return self.rank * self.bits / 8 + (4 if self.projector.backend == "ops" else 0)


class QSVDLatentCache(Cache):
    """A transformers Cache holding only the per-layer latents of a model to
    which apply_qsvd was applied; pass it as ``past_key_values``."""

    def __init__(self, model: nn.Module, block_size: int = 16):
        attn = getattr(model, "_qsvd_decoder_attention", None)
        if not attn:
            raise ValueError("this model has no QSVD decoder attention: call apply_qsvd(model, compressed) first")
        layers = [None] * (max(a.layer_idx for a in attn) + 1)
        for a in attn:
            layers[a.layer_idx] = QSVDLatentLayer(a.projector, block_size)
        if any(l is None for l in layers):
            raise ValueError("every decoder layer must be compressed to use a QSVDLatentCache")
        super().__init__(layers=layers)
        self.rope_cos = self.rope_sin = None  # [capacity, d] fp32, filled as positions are seen
        self.rope_len = 0

    def record_rope(self, cos: torch.Tensor, sin: torch.Tensor, start: int) -> None:
        """Keep the rotary tables of positions [start, start + T) (from the
        model's own rotary embedding, so any RoPE scaling is honoured)."""
        T, d = cos.shape[-2], cos.shape[-1]
        need = start + T
        if need <= getattr(self, "rope_len", 0):
            return  # an earlier layer of this step recorded these positions
        if self.rope_cos is None or self.rope_cos.shape[0] < need:
            cap = max(need, 2 * (0 if self.rope_cos is None else self.rope_cos.shape[0]), 64)
            new_cos = torch.zeros(cap, d, dtype=torch.float32, device=cos.device)
            new_sin = torch.zeros(cap, d, dtype=torch.float32, device=cos.device)
            if self.rope_cos is not None:
                new_cos[: self.rope_cos.shape[0]] = self.rope_cos
                new_sin[: self.rope_sin.shape[0]] = self.rope_sin
            self.rope_cos, self.rope_sin = new_cos, new_sin
        self.rope_cos[start:need] = cos.reshape(-1, T, d)[0].float()
        self.rope_sin[start:need] = sin.reshape(-1, T, d)[0].float()
        self.rope_len = need

    def nbytes(self) -> int:
        return sum(l.nbytes() for l in self.layers)

    def token_nbytes(self) -> float:
        """Cache bytes per token over all layers (codes + scales)."""
        return sum(l.token_nbytes() for l in self.layers)

    def fp16_kv_token_nbytes(self) -> int:
        """What an fp16 K/V cache of the original model holds per token."""
        return sum(2 * l.projector.dims.kv_dim * 2 for l in self.layers)


# ----------------------------------------------------------------------------
# Attention blocks
# ----------------------------------------------------------------------------


class QSVDDecoderAttention(nn.Module):
    """Replaces a LLaMA-style attention block (RoPE, GQA): see the module docstring."""

    def __init__(self, original: nn.Module, projector: LatentProjector):
        super().__init__()
        self.projector = projector
        self.o_proj = original.o_proj
        self.config = getattr(original, "config", None)
        self.layer_idx = original.layer_idx
        self.head_dim = projector.dims.head_dim
        self.scaling = getattr(original, "scaling", self.head_dim**-0.5)
        self.is_causal = True
        if projector.backend == "ops" and projector.has_k_bias:
            raise NotImplementedError(
                "a K bias under RoPE is position-dependent after rotation, which latent_attention does not model; "
                "use backend='torch' for this model")

    def _first_use_of_foreign_cache(self, cache) -> bool:
        """True the first time a given non-QSVD cache reaches this layer."""
        seen = cache.__dict__.setdefault("_qsvd_layers_seen", set())
        if self.layer_idx in seen or cache.get_seq_length() != 0:
            return False
        seen.add(self.layer_idx)
        return True

    def _check_mask(self, attention_mask, T, start, B):
        if attention_mask is None or not torch.is_tensor(attention_mask):
            return
        m = attention_mask
        allowed = m if m.dtype == torch.bool else (m == 0)
        L = start + T
        causal = torch.arange(L, device=m.device)[None, :] <= (start + torch.arange(T, device=m.device))[:, None]
        if allowed.shape[-2:] != (T, L) or not bool((allowed == causal).all()):
            raise NotImplementedError("QSVD decoder attention serves unpadded batches (equal-length prompts); "
                                      "this attention mask has padding or a non-causal pattern")

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        B, T, E = hidden_states.shape
        d = self.projector.dims
        H, H_kv, hd = d.num_heads, d.num_kv_heads, d.head_dim
        if position_embeddings is None:
            raise ValueError("QSVDDecoderAttention needs the model's rotary position_embeddings")
        cos, sin = position_embeddings
        if isinstance(past_key_values, QSVDLatentCache):
            cache, layer = past_key_values, past_key_values.layers[self.layer_idx]
        elif past_key_values is None or self._first_use_of_foreign_cache(past_key_values):
            # A plain forward pass (HF models hand every call a fresh, empty
            # DynamicCache): attend within this call only.
            cache, layer = None, QSVDLatentLayer(self.projector)
        else:
            raise TypeError(f"got a reused past_key_values of type {type(past_key_values).__name__}: a QSVD-compressed "
                            "model caches only the latent, so generation needs past_key_values=QSVDLatentCache(model) "
                            "(or qsvd_kernels.integrations.hf.generate)")
        start = layer.length
        self._check_mask(attention_mask, T, start, B)
        rope = cache if cache is not None else _TransientRope()
        rope.record_rope(cos, sin, start)
        L = start + T

        c = self.projector.latent(hidden_states.reshape(B * T, E))
        rep = layer.append(c.view(B, T, -1))
        q = self.projector.queries(rep).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        q = R.apply_rope_ref(q, cos.unsqueeze(1).float(), sin.unsqueeze(1).float())

        if self.projector.backend == "ops" and T == 1:
            out, _ = ops.latent_attention(
                q[:, :, 0].contiguous(), layer.pool, layer.pool_scale, layer.block_table, layer.seq_lens(),
                self.projector.wuk, self.projector.wuk_scale, self.projector.wuv, self.projector.wuv_scale,
                layer.bits, self.scaling, rope.rope_cos[:L].contiguous(), rope.rope_sin[:L].contiguous())
            if getattr(self.projector, "bv", None) is not None:
                out = out + self.projector.bv.view(H_kv, 1, hd).expand(H_kv, H // H_kv, hd).reshape(H, hd)
            attn = out[:, None]  # [B, 1, H, hd]
        else:
            k, v = self._keys_values(layer, rope, B, L)  # [B, H_kv, L, hd]
            mask = torch.arange(L, device=q.device)[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
            attn = F.scaled_dot_product_attention(q, k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(
                H // H_kv, 1), attn_mask=mask, scale=self.scaling).transpose(1, 2)  # [B, T, H, hd]
        out = attn.reshape(B, T, H * hd).to(hidden_states.dtype)
        return self.o_proj(out), None

    def _keys_values(self, layer, rope, B, L):
        d = self.projector.dims
        H_kv, hd = d.num_kv_heads, d.head_dim
        cos, sin = rope.rope_cos[:L], rope.rope_sin[:L]
        if self.projector.backend == "torch":
            k, v = self.projector.keys_values(layer.latent.reshape(B * L, -1))
            k = k.view(B, L, H_kv, hd).transpose(1, 2)
            v = v.view(B, L, H_kv, hd).transpose(1, 2)
            k = R.apply_rope_ref(k, cos[None, None], sin[None, None])
            return k, v
        k, v = ops.latent_reconstruct_kv(layer.pool, layer.pool_scale, layer.block_table, layer.seq_lens(),
                                         self.projector.wuk, self.projector.wuk_scale, self.projector.wuv,
                                         self.projector.wuv_scale, layer.bits, cos.contiguous(), sin.contiguous(),
                                         torch.float32)
        k = k.view(B, L, H_kv, hd).transpose(1, 2)
        v = v.view(B, L, H_kv, hd).transpose(1, 2)
        if getattr(self.projector, "bv", None) is not None:
            v = v + self.projector.bv.view(1, H_kv, 1, hd)
        return k, v


class _TransientRope:
    """Rotary tables for a forward pass without a cache."""

    rope_cos = rope_sin = None
    record_rope = QSVDLatentCache.record_rope


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def _unsupported_decoder_features(module: nn.Module) -> list[str]:
    """Attention math beyond LLaMA's that QSVDDecoderAttention would drop."""
    found = [n for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") if getattr(module, n, None) is not None]
    cfg = getattr(module, "config", None)
    if cfg is not None:
        if getattr(cfg, "attn_logit_softcapping", None):
            found.append("attention logit soft-capping")
        if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
            found.append("partial rotary embedding")
    return found


def _is_rope_decoder(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_embeddings" in params and hasattr(module, "o_proj") and getattr(module, "is_causal", False)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_qsvd(model: nn.Module, compressed: CompressedModel, backend: str = "ops") -> nn.Module:
    """Run ``model``'s attention on the compressed layers, in place.

    RoPE decoder blocks become QSVDDecoderAttention (use a QSVDLatentCache for
    generation); encoder blocks get compressed q/k/v projections.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(model, "_qsvd_applied", False):
        raise ValueError("apply_qsvd was already applied to this model")
    sites = _resolve_sites(model, compressed.site_names)
    device = next(model.parameters()).device
    decoder = []
    for site, layer in zip(sites, compressed.layers):
        if layer.dims != site.dims:
            raise ValueError(f"{site.name}: the compressed layer is {layer.dims}, the model's is {site.dims}")
        decoder_block = _is_rope_decoder(site.module)
        projector = LatentProjector(layer, backend, encoder=not decoder_block).to(device)
        if decoder_block:
            missing = _unsupported_decoder_features(site.module)
            if missing:
                raise NotImplementedError(f"{site.name} ({type(site.module).__name__}) uses {', '.join(missing)}, "
                                          "which the QSVD decoder attention does not implement yet")
            block = QSVDDecoderAttention(site.module, projector)
            _set_submodule(model, site.name, block)
            decoder.append(block)
        else:
            shared = SharedProjection(projector)
            for idx, attr in enumerate(site.attrs):
                setattr(site.module, attr, ProjectionSlot(shared, idx))
    model._qsvd_applied = True
    model._qsvd_decoder_attention = decoder
    return model


def generate(model: nn.Module, input_ids: torch.Tensor, block_size: int = 16, **kwargs):
    """``model.generate`` with a fresh QSVDLatentCache; returns (output, cache)."""
    cache = QSVDLatentCache(model, block_size)
    return model.generate(input_ids, past_key_values=cache, **kwargs), cache
