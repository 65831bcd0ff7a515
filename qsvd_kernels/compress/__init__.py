"""The QSVD compression pipeline: joint QKV SVD with activation-aware
whitening, gradient-scored global rank allocation, per-layer beta, Hadamard
rotations and weight quantization, packed for the qsvd kernels.

Typical use::

    from qsvd_kernels import compress as qc
    cfg = qc.CompressionConfig(qc.Budget("r2", 0.225), qc.QuantConfig.parse("W8A8"))
    cm = qc.compress_model(model, calib_batches, cfg, loss_fn=qc.random_projection_loss(output_fn))
    with qc.swapped_projections(model, cm):
        ...                       # the model now runs compressed Q/K/V
    cm.save("artefact/")
"""

from ..model.dims import LATENT_FORMS, LatentDims, LayerDims
from ..model.swap import swapped_projections
from .allocate import allocate_ranks, uniform_ranks
from .artefact import CompressedModel
from .budget import Budget, achieved, cache_bytes_per_token
from .calibrate import collect_stats, importance_scores
from .layer import CompressedQKV
from .losses import causal_lm_fisher_loss, random_projection_loss
from .pipeline import CompressionConfig, Compressor, compress_model, search_beta
from .plot import plot_allocation
from .quant import QuantConfig, quantize_weight_rows
from .svd import JointSVD, joint_svd
from .whitening import LayerStats, Whitening, make_whitening

__all__ = [
    "Budget", "LayerDims", "LatentDims", "LATENT_FORMS", "achieved", "cache_bytes_per_token", "allocate_ranks", "uniform_ranks",
    "collect_stats", "importance_scores", "CompressedQKV", "causal_lm_fisher_loss", "random_projection_loss",
    "CompressedModel", "CompressionConfig", "Compressor", "compress_model", "search_beta", "swapped_projections",
    "plot_allocation", "QuantConfig", "quantize_weight_rows", "JointSVD", "joint_svd", "LayerStats", "Whitening",
    "make_whitening",
]
