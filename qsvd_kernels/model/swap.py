"""Swapping a model's Q/K/V projections for compressed ones.

``swapped_projections`` does it for the duration of a ``with`` block (the
compression pipeline's fidelity checks); the serving integrations swap for
good with ``SharedProjection`` / ``ProjectionSlot`` and ``set_submodule``.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .sites import resolve_sites


class SharedProjection(nn.Module):
    """Computes (q, k, v) once per input for the three projection slots."""

    def __init__(self, projector):
        super().__init__()
        self.projector = projector
        self._last = None

    def outputs(self, x):
        if self._last is None or self._last[0] is not x:
            self._last = (x, self.projector.project(x))
        return self._last[1]


class ProjectionSlot(nn.Module):
    """Stands in for one of the q/k/v nn.Linear modules."""

    def __init__(self, shared: SharedProjection, index: int):
        super().__init__()
        self.shared = shared
        self.index = index

    def forward(self, x):
        out = self.shared.outputs(x)[self.index]
        if self.index == 2:
            self.shared._last = None  # v is the last of the three: drop the reference
        return out


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``model`` by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


@contextmanager
def swapped_projections(model: nn.Module, compressed_or_projectors, site_names: list[str] | None = None):
    """Within the block, the model's Q/K/V projections are replaced by the
    compressed ones (anything with ``project(x) -> (q, k, v)``): a
    CompressedModel (its ``layers`` at its ``site_names``), or projectors
    with one site name each."""
    if hasattr(compressed_or_projectors, "site_names") and hasattr(compressed_or_projectors, "layers"):
        # A CompressedModel (duck-typed: this layer sits below compress).
        projectors, site_names = compressed_or_projectors.layers, compressed_or_projectors.site_names
    else:
        projectors = list(compressed_or_projectors)
        if site_names is None or len(site_names) != len(projectors):
            raise ValueError("pass one site name per projector (e.g. CompressedModel.site_names)")
    sites = resolve_sites(model, site_names)
    for s, p in zip(sites, projectors):
        if hasattr(p, "dims") and p.dims != s.dims:
            raise ValueError(f"{s.name}: the compressed layer is {p.dims}, the model's is {s.dims}")
        if getattr(p, "rope_pairs", None) is not None:
            raise ValueError(f"{s.name}: the layer has partial RoPE, which changes the attention step, not only "
                             "the projections: run it with qsvd_kernels.integrations.hf.apply_qsvd")
    saved = []
    try:
        for s, p in zip(sites, projectors):
            shared = SharedProjection(p)
            saved.append((s, s.linears))
            for idx, attr in enumerate(s.attrs):
                setattr(s.module, attr, ProjectionSlot(shared, idx))
        yield model
    finally:
        for s, linears in saved:
            for attr, lin in zip(s.attrs, linears):
                setattr(s.module, attr, lin)
