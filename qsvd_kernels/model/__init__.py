"""The model layer, between the ops and the compression pipeline: where the
attention projections of a model are (``sites``), which family each belongs to
(``families``: the one model-family table), their shapes (``dims``),
and swapping them for compressed ones (``swap``).

Import direction: ops / reference / formats <- model <- compress <-
integrations <- cli, demo, bench (an import-linter contract in
pyproject.toml, checked by python_tests/test_layers.py).
"""

from .dims import LATENT_FORMS, LatentDims, LayerDims, latent_dims
from .families import FAMILIES, MULTIMODAL, AttentionFamily, family_of
from .sites import LAYER_CHOICES, AttentionSite, find_attention_sites, resolve_sites, select_sites
from .swap import ProjectionSlot, SharedProjection, set_submodule, swapped_projections

__all__ = [
    "LayerDims", "LatentDims", "LATENT_FORMS", "latent_dims", "AttentionSite", "find_attention_sites", "resolve_sites", "select_sites", "LAYER_CHOICES",
    "FAMILIES", "MULTIMODAL", "AttentionFamily", "family_of", "ProjectionSlot", "SharedProjection",
    "set_submodule", "swapped_projections",
]
