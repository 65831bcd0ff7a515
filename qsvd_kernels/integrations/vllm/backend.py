"""vLLM's side of the QSVD latent cache: the page spec (so vLLM counts every
byte), the per-step metadata (the attention core's ``StepMetadata``, built
once per step and shared by every layer) and the attention backend class
vLLM asks each layer for.
"""

from __future__ import annotations

from . import check_vllm_version

check_vllm_version()  # before touching vLLM internals (as model.py does)

from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

import torch  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from ..core import StepMetadata, step_metadata  # noqa: E402


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


@dataclass(frozen=True, kw_only=True)
class QSVDRopeKeysSpec(FullAttentionSpec):
    """The page of a layer's cached rotary keys (partial RoPE's cached form,
    integrations/core.py ``rope_keys_cached``): ``block_size`` tokens of
    fp16 [H_kv, d_rope], as one uint8 "head" of ``2 H_kv d_rope`` bytes.
    Its own page beside the latent's, in the same group and block table, so
    vLLM counts these bytes and allocates, frees and shares (prefix caching)
    them with the latent's blocks."""


# ------------------------------------------------------------------ metadata
@dataclass
class QSVDMetadata:
    num_tokens: int  # real tokens of the step (the input may be padded past them)
    step: StepMetadata  # the core's (positions filled in at each layer call from vLLM's positions)


class QSVDMetadataBuilder(AttentionMetadataBuilder[QSVDMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> QSVDMetadata:
        m = common_attn_metadata
        n, T = m.num_reqs, m.num_actual_tokens
        qsl = m.query_start_loc_cpu[: n + 1].tolist()
        # Host sequence lengths, read for prefills only (their K/V size depends
        # on them): vLLM's host copy, exact for prefill rows, so no device
        # sync; decodes never read them on the host (CUDA graphs).
        host = m.seq_lens_cpu_upper_bound if m.seq_lens_cpu_upper_bound is not None else m.seq_lens.cpu()
        slots = m.slot_mapping[:T].long()
        step = step_metadata(slots, slots.new_empty(0), m.block_table_tensor[:n], m.seq_lens[:n].to(torch.int32),
                             [range(qsl[i], qsl[i + 1]) for i in range(n)], host[:n].tolist())
        return QSVDMetadata(num_tokens=T, step=step)


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


