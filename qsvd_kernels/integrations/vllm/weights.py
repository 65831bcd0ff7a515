"""One QSVD attention layer's operands on vLLM: this tensor-parallel rank's
share of the kernel tensors (declared by model.layer_tensors, which says how
each is sharded), loaded from a checkpoint that ``python -m qsvd_kernels
export --format vllm`` wrote. The core (integrations/core.py) reads them by
name. Needs torch only, no vLLM."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ...model.layer_tensors import BIAS_NAMES, QSVDLayerSpec
from ..core import refuse_k_bias


def tp_shard(total: int, tp_size: int, tp_rank: int, what: str) -> tuple[int, int]:
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


class QSVDOperands(nn.Module):
    """The operands of ``spec`` (this rank's heads) as parameters, and the
    nonzero biases as buffers once loaded. ``slices``: this rank's
    ``{"q_rows": (first, count), "kv_heads": (first, count)}``."""

    def __init__(self, spec: QSVDLayerSpec, slices: dict[str, tuple[int, int]], where: str):
        super().__init__()
        self._spec, self._slices, self._where = spec, slices, where
        for name, ts in spec.tensors().items():
            p = nn.Parameter(torch.zeros(ts.shape, dtype=ts.dtype), requires_grad=False)
            p.weight_loader = partial(self._load_sharded, shard=ts.shard)
            setattr(self, name, p)
        self._loaded: set[str] = set()

    def load(self, key: str, tensor: torch.Tensor) -> None:
        """A whole checkpoint tensor ``qsvd.<key>``: this rank's part of it."""
        if key in BIAS_NAMES:
            self._add_bias(key, tensor)
        elif isinstance(getattr(self, key, None), nn.Parameter):
            p = getattr(self, key)
            p.weight_loader(p, tensor)
        else:
            raise ValueError(f"{self._where}: unexpected tensor 'qsvd.{key}' in the checkpoint")
        self._loaded.add(key)

    def check_loaded(self) -> None:
        missing = [n for n in self._spec.tensors() if n not in self._loaded]
        if missing:
            raise ValueError(f"{self._where}: the checkpoint lacks QSVD tensors {missing}: export the model "
                             "with `python -m qsvd_kernels export --format vllm`")

    def _shard_of(self, loaded: torch.Tensor, shard: str) -> torch.Tensor:
        if shard == "whole":
            return loaded
        lo, n = self._slices[shard]
        if shard == "kv_heads" and loaded.dim() == 1:  # a flat [H_kv d] bias
            return loaded.view(-1, self._spec.head_dim).narrow(0, lo, n).reshape(-1)
        return loaded.narrow(0, lo, n)

    def _load_sharded(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        part = self._shard_of(loaded, shard)
        if tuple(part.shape) != tuple(param.shape) or part.dtype != param.dtype:
            raise ValueError(f"{self._where}: checkpoint tensor {tuple(part.shape)} {part.dtype} does not fit "
                             f"{tuple(param.shape)} {param.dtype} (config.qsvd and the weights disagree)")
        param.data.copy_(part)

    def _add_bias(self, key: str, tensor: torch.Tensor) -> None:
        if key == "bk":
            refuse_k_bias(tensor, self._where)
            return  # zero: nothing to add
        ts = self._spec.tensors(biases=(key,))[key]
        t = self._shard_of(tensor, ts.shard)
        if tuple(t.shape) != ts.shape:
            raise ValueError(f"{self._where}: bias {key} is {tuple(tensor.shape)} in the checkpoint")
        self.register_buffer(key, t.float().contiguous(), persistent=False)
