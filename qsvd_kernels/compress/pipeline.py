"""The compression pipeline, end to end (the artefact is in artefact.py).

    compressed = compress_model(model, calibration_batches, CompressionConfig(...), loss_fn=...)
    with swapped_projections(model, compressed):   # the model now runs the compressed Q/K/V (model.swap)
        ...
    compressed.save("out/")                        # safetensors + qsvd_config.json (artefact.py)
    CompressedModel.load("out/")                   # bit-identical

Steps: input statistics (hooks) -> whitening -> joint SVD per layer ->
importance scores (gradients of a label-free loss) -> global rank
allocation under the budget (or uniform ranks) -> per layer: beta chosen on
calibration rows by the quantized layer's output error (the paper's Eq. 14),
H2, H1, weight quantization -> CompressedQKV per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import nn

from ..model.dims import LayerDims
from ..model.sites import AttentionSite, find_attention_sites, select_sites
from .allocate import allocate_ranks, check_budget, uniform_ranks
from .artefact import CompressedModel
from .budget import Budget, achieved
from .calibrate import collect_stats, importance_scores, tqdm
from .layer import CompressedQKV
from .quant import QuantConfig
from .svd import JointSVD, joint_svd
from .whitening import make_whitening

BETA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
LATENT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85)


@dataclass
class CompressionConfig:
    budget: Budget
    quant: QuantConfig = field(default_factory=QuantConfig)
    whitening: str = "cholesky"  # "cholesky" | "diag" | "none"
    alpha: float = 0.5  # exponent of the diagonal whitening
    allocation: str = "qsvd"  # "qsvd" (gradient-scored, global) | "uniform"
    align: int = 16
    min_rank: int | None = None
    beta: float | str = "search"  # a fixed beta in [0, 1], or "search" (per layer)
    beta_grid: tuple = BETA_GRID
    # With beta="search", the latent's clip ratio is searched per layer too
    # (it changes no weight, so it costs one evaluation per value).
    latent_clip_grid: tuple = LATENT_CLIP_GRID
    seed: int = 0
    calib_rows: int = 2048  # input rows kept per layer for the beta search
    # Fixed ranks per layer instead of an allocation (e.g. full rank for
    # parity checks); the budget is then only reported, not enforced.
    ranks: list | None = None

    def __post_init__(self):
        # The budget counts bits as the paper does: those of this setting
        # unless the Budget names its own (16 for a pure rank budget).
        self.budget = self.budget.resolved(self.quant.w_bits, self.quant.latent_bits)
        if self.allocation not in ("qsvd", "uniform"):
            raise ValueError(f"allocation must be 'qsvd' or 'uniform', got {self.allocation!r}")
        if not (self.beta == "search" or (isinstance(self.beta, (int, float)) and 0 <= self.beta <= 1)):
            raise ValueError(f"beta must be 'search' or a number in [0, 1], got {self.beta!r}")
        if self.whitening not in ("cholesky", "diag", "none"):
            raise ValueError(f"whitening must be 'cholesky', 'diag' or 'none', got {self.whitening!r}")

    def to_dict(self):
        d = asdict(self)
        d["budget"], d["quant"] = self.budget.to_dict(), self.quant.to_dict()
        d["beta_grid"] = list(self.beta_grid)
        d["latent_clip_grid"] = list(self.latent_clip_grid)
        d["ranks"] = list(self.ranks) if self.ranks is not None else None
        return d


# ------------------------------------------------------------- pipeline


def search_beta(svd: JointSVD, rows: torch.Tensor, rank: int, quant: QuantConfig, seed: int,
                grid=BETA_GRID, latent_clips=(None,)) -> tuple[CompressedQKV, dict]:
    """The layer whose beta (from ``grid``) and latent clip ratio (from
    ``latent_clips``; None keeps quant's) minimise |Y - Y_q|^2 on calibration
    rows, where Y = x W_cat + b is the original layer output and Y_q the
    compressed, quantized layer's (the paper's Eq. 14). Ties go to the
    smaller beta, then the larger clip. Returns the layer and the errors
    {(beta, clip): error}."""
    X = rows.to(torch.float32)
    Y = X.double() @ svd.W_cat + (svd.bias if svd.bias is not None else 0)
    errors, layers = {}, {}
    for b in grid:
        base = CompressedQKV.build(svd, rank, b, quant, seed)
        for clip in latent_clips:
            layer = base if clip is None else replace(base, quant=replace(quant, latent_clip=float(clip)))
            key = (float(b), float(layer.quant.latent_clip))
            errors[key] = float(((layer.project_cat(X) - Y) ** 2).sum())
            layers[key] = layer
    best = min(errors, key=lambda k: (errors[k], k[0], -k[1]))
    return layers[best], errors


class Compressor:
    """The calibration-dependent state of a compression run, computed once
    and reused across configurations: input statistics and joint SVDs (per
    whitening kind), and importance scores (per loss). ``compress_model`` is
    ``Compressor(model, calibration).compress(config, loss_fn)``.

    ``layers`` chooses the attention layers to compress: "all", "language"
    (decoder blocks, which keep a cache), "vision" (a vision tower), or a
    function ``site -> bool`` (model.sites.select_sites). ``sites``: the
    sites when the caller already selected them.
    """

    def __init__(self, model: nn.Module, calibration: Iterable, *, calib_rows: int = 2048, seed: int = 0,
                 progress: bool = True, layers="all", sites: list[AttentionSite] | None = None):
        self.model = model
        self.calibration = list(calibration)
        self.layers = layers
        self.sites = list(sites) if sites is not None else select_sites(model, layers)
        self.dims = [s.dims for s in self.sites]
        self.caches = cache_flags(self.sites, model)
        self.seed = seed
        self.progress = progress
        self.stats = collect_stats(model, self.sites, self.calibration, keep_rows=calib_rows, seed=seed,
                                   progress=progress)
        self._svds: dict = {}
        self._scores: dict = {}

    def svds(self, whitening: str = "cholesky", alpha: float = 0.5) -> list[JointSVD]:
        key = (whitening, alpha if whitening == "diag" else None)
        if key not in self._svds:
            out = []
            for s, st in zip(self.sites, self.stats):
                W_q, W_k, W_v, bias = s.weights()
                try:
                    out.append(joint_svd(W_q, W_k, W_v, s.dims, make_whitening(st, whitening, alpha=alpha), bias))
                except ValueError as e:
                    raise ValueError(f"{s.name}: {e}") from None
            self._svds[key] = out
        return self._svds[key]

    def scores(self, loss_fn: Callable, whitening: str = "cholesky", alpha: float = 0.5,
               batches: Iterable | None = None) -> list[torch.Tensor]:
        key = (id(loss_fn), whitening, alpha if whitening == "diag" else None)
        if key not in self._scores:
            data = list(batches) if batches is not None else self.calibration
            self._scores[key] = (loss_fn, importance_scores(self.model, self.sites, self.svds(whitening, alpha),
                                                            loss_fn, data, progress=self.progress))
        return self._scores[key][1]

    def ranks(self, config: CompressionConfig, loss_fn: Callable | None = None) -> tuple[list[int], list | None]:
        if config.ranks is not None:
            if len(config.ranks) != len(self.dims) or any(
                    not 1 <= int(r) <= d.max_rank for r, d in zip(config.ranks, self.dims)):
                raise ValueError(f"ranks must give one rank in [1, max rank] per layer ({len(self.dims)} layers, "
                                 f"max ranks {[d.max_rank for d in self.dims]}), got {config.ranks}")
            return [int(r) for r in config.ranks], None
        if config.allocation == "uniform":
            return uniform_ranks(self.dims, config.budget, align=config.align, min_rank=config.min_rank,
                                 caches=self.caches), None
        if loss_fn is None:
            raise ValueError("allocation='qsvd' scores singular values by gradients: pass loss_fn "
                             "(compress.losses has label-free ones)")
        scores = self.scores(loss_fn, config.whitening, config.alpha)
        return allocate_ranks(scores, self.dims, config.budget, align=config.align,
                              min_rank=config.min_rank, caches=self.caches), scores

    def compress(self, config: CompressionConfig, loss_fn: Callable | None = None) -> CompressedModel:
        svds = self.svds(config.whitening, config.alpha)
        ranks, scores = self.ranks(config, loss_fn)
        layers, beta_errors = [], []
        for i, (svd, st, r) in enumerate(tqdm(list(zip(svds, self.stats, ranks)), desc="factorise + quantize",
                                              disable=not self.progress)):
            seed = config.seed * 1000 + 17 * i
            if config.beta == "search" and config.quant.quantized:
                clips = config.latent_clip_grid if config.quant.latent_bits < 16 else (None,)
                layer, errs = search_beta(svd, st.rows, r, config.quant, seed, config.beta_grid, clips)
            else:
                beta = 0.5 if config.beta == "search" else float(config.beta)
                layer, errs = CompressedQKV.build(svd, r, beta, config.quant, seed), {}
            beta_errors.append({f"beta={b:g},latent_clip={c:g}": e for (b, c), e in errs.items()})
            layers.append(layer)
        info = {
            "config": config.to_dict(),
            "ranks": ranks,
            "betas": [l.beta for l in layers],
            "latent_clips": [l.quant.latent_clip for l in layers],
            "achieved": achieved(ranks, self.dims, config.quant.w_bits, config.quant.latent_bits, self.caches),
            "uniform_ranks": _safe_uniform(self.dims, config, self.caches),
            "dims": [d.to_dict() for d in self.dims],
            "spectra": [svd.sigma.tolist() for svd in svds],
            "scores": [s.tolist() for s in scores] if scores is not None else None,
            "beta_errors": beta_errors,
            "whitening_jitter": [svd.whitening.jitter for svd in svds],
            "calibration_tokens": [st.count for st in self.stats],
        }
        if self.caches is not None:  # a VLM: some compressed layers keep no cache (R2 does not count them)
            info["keeps_cache"] = list(self.caches)
        if self.layers != "all":
            info["layers"] = self.layers if isinstance(self.layers, str) else "custom filter"
        return CompressedModel([s.name for s in self.sites], layers, info)


def compress_model(model: nn.Module, calibration: Iterable, config: CompressionConfig, *,
                   loss_fn: Callable | None = None, score_batches: Iterable | None = None,
                   progress: bool = True, layers="all") -> CompressedModel:
    """Compress the attention layers of ``model`` (see the module docstring).

    layers: which ones: "all", "language" (the decoder blocks of a VLM or LLM),
        "vision" (its vision tower), or a filter ``site -> bool`` (a
        model.sites.AttentionSite has name, module, family, part, dims).
        R1 counts every compressed layer; R2 only those that keep a KV cache
        (every layer of an encoder-only model).
    calibration: batches (dicts of model inputs) for the input statistics and
        the beta search; score_batches (default: the same) for the importance
        scores, which need ``loss_fn(model, batch) -> summed loss`` when
        ``config.allocation == "qsvd"``.
    """
    sites = select_sites(model, layers)
    if config.ranks is None:  # a budget the ranks cannot meet fails before any calibration work
        check_budget([s.dims for s in sites], config.budget, config.align, config.min_rank, cache_flags(sites, model))
    c = Compressor(model, calibration, calib_rows=config.calib_rows, seed=config.seed, progress=progress,
                   layers=layers, sites=sites)
    if score_batches is not None and config.allocation == "qsvd" and loss_fn is not None:
        c.scores(loss_fn, config.whitening, config.alpha, batches=score_batches)
    return c.compress(config, loss_fn)


def cache_flags(sites: list[AttentionSite], model: nn.Module) -> list[bool] | None:
    """Which of the selected layers keep a KV cache, for R2; None when all
    count: a decoder-only selection, or a model with no decoder at all (an
    encoder-only model, whose R2 is the paper's cache ratio of its layers).
    In a VLM the vision tower's layers keep no cache and are not counted."""
    flags = [s.keeps_cache for s in sites]
    if all(flags):
        return None
    if not any(flags) and not any(s.keeps_cache for s in find_attention_sites(model)):
        return None
    return flags


def _safe_uniform(dims: list[LayerDims], config: CompressionConfig, caches=None):
    try:
        return uniform_ranks(dims, config.budget, align=config.align, min_rank=config.min_rank, caches=caches)
    except ValueError:
        return None
