"""One layer's compressed projections, two ways: on the qsvd ops
(``OpsProjector``, quantized artefacts) or in plain PyTorch
(``TorchProjector``, the compression pipeline's float64 simulation; serves
unquantized artefacts too, e.g. the full-rank parity check).

Both offer:

- ``latent(x)``: the step's projection of x [N, E] (c = x W_d, and what q
  needs in the "kv" latent form);
- ``new_pool(num_blocks, block_size, device)``: one layer's paged latent
  storage (with the rotary keys when the layer caches them), and
  ``cache_view(pool)``: the view of it ``core`` takes;
- ``core``: the decoder attention step (integrations/core.py ``run``); on the
  ops, ``QSVDAttentionCore``; in torch, the same primitives simulated (the
  cache keeps the dequantized latent in fp32, and there is no fused decode);
- ``project(x)``: (q, k, v) for encoders, which keep no cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ... import formats, ops
from ... import reference as R
from ...compress.layer import CompressedQKV
from ..core import AttentionStep, LatentCache, QSVDAttentionCore, check_rope_key_cache


class LatentPool:
    """One layer's paged latent: ``tensors`` share their first two dims
    [num_blocks, block_size]; blocks are allocated by the cache."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[0]

    def grow(self, num_blocks: int) -> None:
        extra = num_blocks - self.num_blocks
        if extra > 0:
            self.tensors = [torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) for t in self.tensors]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for t in self.tensors:
            t[dst] = t[src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class _Projector(nn.Module):
    def __init__(self, layer: CompressedQKV):
        super().__init__()
        self.layer, self.dims, self.rank, self.quant = layer, layer.dims, layer.rank, layer.quant

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts floating buffers; the ops take signs and scales
        # in fp32 whatever the model's dtype, so they stay fp32.
        super()._apply(fn, recurse)
        for name, b in self._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[name] = b.float()
        return self

    @property
    def k_bias(self) -> torch.Tensor | None:
        b, d = self.layer.bias, self.dims
        return None if b is None else b[d.q_dim : d.q_dim + d.kv_dim]

    def project(self, x: torch.Tensor):
        """(q, k, v) in x's dtype, for encoders (no cache)."""
        shape = x.shape[:-1]
        proj = self.latent(x.reshape(-1, x.shape[-1]))
        rows = self.quantize_latent(proj)
        q = self.queries(proj, rows)
        k, v = self.encoder_keys_values(rows)
        return tuple(t.reshape(*shape, -1).to(x.dtype) for t in (q, k, v))


class OpsProjector(_Projector):
    """The layer on torch.ops.qsvd (quantized weights, activations and latent)."""

    backend = "ops"

    def __init__(self, layer: CompressedQKV, encoder: bool = False, rope_key_cache: str = "auto"):
        super().__init__(layer)
        for name, t in layer.kernel_tensors().items():  # raises for unquantized artefacts
            self.register_buffer(name, t, persistent=False)
        self.core = QSVDAttentionCore(layer.spec(), self, rope_key_cache=rope_key_cache)
        self.code = formats.code_format(self.quant.latent_bits)
        if encoder:
            # Encoders take K and V from quant_gemm: W_uk, W_uv as b operands
            # [E_kv, r] (decoders use the per-head layout, never these).
            d, wfmt = layer.dims, formats.code_format(self.quant.w_bits)
            k0 = d.q_dim - layer.latent_dims.first_col  # W_u's rows: [q |] k | v
            for name, lo in (("wuk_rows", k0), ("wuv_rows", k0 + d.kv_dim)):
                self.register_buffer(name, wfmt.pack(layer.wu[lo : lo + d.kv_dim].contiguous()), persistent=False)
                self.register_buffer(name + "_scale", layer.wu_scale[lo : lo + d.kv_dim].contiguous(),
                                     persistent=False)

    @property
    def token_nbytes(self) -> float:
        """Cache bytes per token: codes plus the per-token fp32 scale, plus
        the rotary keys where they are cached."""
        return self.code.row_bytes(self.rank) + 4 + self.core.rope_key_bytes

    def latent(self, x2d: torch.Tensor):
        return self.core.project(x2d)

    def _latent(self, num_blocks: int, block_size: int, device) -> list[torch.Tensor]:
        """Zeroed codes and fp32 scales of ``num_blocks`` blocks."""
        return [torch.zeros(num_blocks, block_size, self.code.row_bytes(self.rank), dtype=self.code.dtype,
                            device=device),
                torch.zeros(num_blocks, block_size, dtype=torch.float32, device=device)]

    def new_pool(self, num_blocks: int, block_size: int, device) -> LatentPool:
        rope_keys = self.core.new_rope_keys(num_blocks, block_size, device)
        return LatentPool(self._latent(num_blocks, block_size, device) + ([] if rope_keys is None else [rope_keys]))

    @staticmethod
    def cache_view(pool: LatentPool) -> LatentCache:
        return LatentCache(*pool.tensors)  # (codes, scale[, rope_keys])

    def quantize_latent(self, proj):
        """The latent's quantized form without a cache (encoders): quantized by
        latent_cache_append into a transient one-block pool."""
        N = proj.c.shape[0]
        cache = LatentCache(*self._latent(1, max(N, 1), proj.c.device))
        slots = torch.arange(N, device=proj.c.device)
        self.core.append(proj, slots, cache)
        return self.core.read_rows(cache, slots)

    def _up(self, rows, operand: str, bias: str):
        codes, scale = rows
        return ops.quant_gemm(codes, scale, getattr(self, operand), getattr(self, operand + "_scale"),
                              self.quant.latent_bits, self.quant.w_bits, torch.float32, getattr(self, bias, None))

    def queries(self, proj, rows) -> torch.Tensor:
        return self.core.queries(proj, rows)

    def encoder_keys_values(self, rows):
        return self._up(rows, "wuk_rows", "bk"), self._up(rows, "wuv_rows", "bv")


class TorchProjector(_Projector):
    """The same layer in plain PyTorch (the pipeline's float64 simulation of
    the kernels); the cache keeps the dequantized latent in fp32."""

    backend = "torch"

    def __init__(self, layer: CompressedQKV, encoder: bool = False, rope_key_cache: str = "auto"):
        super().__init__(layer)
        check_rope_key_cache(rope_key_cache)
        if rope_key_cache == "cached":  # the simulation keeps the fp32 latent and rebuilds K exactly
            raise ValueError("rope_key_cache='cached' is a form of the ops backend; the torch backend rebuilds K")
        self.core = _TorchStep(self)

    @property
    def token_nbytes(self) -> float:
        return self.rank * 4

    def latent(self, x2d: torch.Tensor):
        """(c fp32, the layer input as the kernels read it, float64)."""
        xh = self.layer.layer_input(x2d)
        return self.layer.latent_from_input(xh).float(), xh

    def new_pool(self, num_blocks: int, block_size: int, device) -> LatentPool:
        return LatentPool([torch.zeros(num_blocks, block_size, self.rank, dtype=torch.float32, device=device)])

    @staticmethod
    def cache_view(pool: LatentPool) -> LatentCache:
        return LatentCache(pool.tensors[0], None)  # fp32 rows [num_blocks, block_size, r]

    def quantize_latent(self, proj) -> torch.Tensor:
        return self.layer.quantized_latent(proj[0]).float()

    def _up(self, rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Columns [lo, hi) of [q | k | v] from latent rows."""
        k0 = self.layer.latent_dims.first_col  # W_u's rows start at this column
        y = rows.double() @ self.layer.dense_weights(rows.device)[1][lo - k0 : hi - k0].T
        b = self.layer.bias
        return (y + b[lo:hi].to(y) if b is not None else y).float()

    def queries(self, proj, rows) -> torch.Tensor:
        if self.layer.form == "qkv":
            return self._up(rows, 0, self.dims.q_dim)
        y = proj[1] @ self.layer.dense_weights(proj[1].device)[2].T  # x W_q
        b = self.layer.bias
        return (y + b[: self.dims.q_dim].to(y) if b is not None else y).float()

    def encoder_keys_values(self, rows):
        d = self.dims
        return self._up(rows, d.q_dim, d.q_dim + d.kv_dim), self._up(rows, d.q_dim + d.kv_dim, d.out_dim)


class _TorchStep(AttentionStep):
    """The core's primitives in the torch simulation (no fused decode)."""

    fused_decode = False

    def __init__(self, projector: TorchProjector):
        self.p = projector
        d = projector.dims
        self.spec = _Heads(d.num_heads, d.num_kv_heads, d.head_dim, projector.layer.rope_pairs)

    def store(self, proj, slots: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        rows = self.p.quantize_latent(proj)
        real = slots >= 0
        cache.codes.view(-1, self.p.rank)[slots[real]] = rows[real]
        return rows

    def queries(self, proj, rows) -> torch.Tensor:
        return self.p.queries(proj, rows)

    def keys_values(self, cache: LatentCache, block_table, seq_lens, cos, sin, dtype=torch.float32):
        # fp32 whatever ``dtype``: causal_attention rounds them to its arithmetic
        slots, t = _token_slots(block_table, seq_lens, cache.codes.shape[1])
        k, v = self.p.encoder_keys_values(cache.codes.view(-1, self.p.rank)[slots])
        d = self.p.dims
        k = k.view(-1, d.num_kv_heads, d.head_dim)
        if cos is not None:  # this layer's tables (partial RoPE: its pairs, laid out first)
            k = R.apply_rope_ref(k, cos[t][:, None], sin[t][:, None])
        return k, v.view(-1, d.num_kv_heads, d.head_dim)


class _Heads(NamedTuple):  # what the step reads of a layer (the torch simulation also runs unquantized layers)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_pairs: tuple[int, ...] | None


def _token_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
    """Flat pool slots and in-sequence indices of every cached token, in
    batch order (the varlen layout of latent_reconstruct_kv)."""
    lens = seq_lens.long()
    b = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    starts = torch.cumsum(lens, 0) - lens
    t = torch.arange(int(lens.sum()), device=lens.device) - starts[b]
    slots = block_table.long()[b, t // block_size] * block_size + t % block_size
    return slots, t


def make_projector(layer: CompressedQKV, backend: str, encoder: bool, rope_key_cache: str = "auto") -> _Projector:
    classes = {"ops": OpsProjector, "torch": TorchProjector}
    if backend not in classes:
        raise ValueError(f"backend must be one of {tuple(classes)}, got {backend!r}")
    return classes[backend](layer, encoder=encoder, rope_key_cache=rope_key_cache)
