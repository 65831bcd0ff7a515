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

The latent form (svd.py: the paper's joint "qkv" latent, or "kv", where q
has its own projection) is chosen per model: ``latent="auto"`` compresses
both under the same budget and keeps the one whose outputs stay closer to
the original model's on calibration batches (``output_divergence``: the KL
of next-token distributions for causal LMs, the relative squared error of
the last hidden state otherwise). The measurement is kept in the
artefact's info.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Callable, Iterable

import torch
from torch import nn

from ..model.dims import LATENT_FORMS, LayerDims, LatentDims
from ..model.sites import AttentionSite, find_attention_sites, select_sites
from ..model.swap import swapped_projections
from .allocate import allocate_ranks, check_budget, uniform_ranks
from .artefact import CompressedModel
from .budget import Budget, achieved
from .calibrate import _call, _mask_of, collect_stats, importance_scores, tqdm
from .metric import attention_output_metric
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
    # Weight the SVD's output columns by where attention sees their errors
    # ("attention", metric.py) or not at all ("none": the output error).
    output_metric: str = "attention"
    metric_context: int = 1024  # relative distances the RoPE average covers
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
    # "qkv" (the paper's joint latent), "kv" (q from its own projection), or
    # "auto": both, and the one closer to the original on calibration data
    # (with fixed ``ranks``, "auto" means "qkv").
    latent: str = "auto"
    # Calibration batches the "auto" choice compares the two forms on.
    latent_choice_batches: int = 4
    # Partial RoPE (issue 22): rotary head dims kept per layer, the highest-
    # frequency ones (CompressedModel.with_rope_dims); the rest become
    # position-free, so latent_attention absorbs them. None: full RoPE.
    # "auto": the fewest of d, d/2, d/4, d/8, 0 whose perplexity on the
    # first rope_choice_batches calibration batches is within
    # rope_tolerance (relative) of the full-RoPE compressed model's.
    rope_dims: int | str | None = None
    rope_tolerance: float = 0.03
    rope_choice_batches: int = 4

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
        if self.output_metric not in ("attention", "none"):
            raise ValueError(f"output_metric must be 'attention' or 'none', got {self.output_metric!r}")
        if self.latent not in (*LATENT_FORMS, "auto"):
            raise ValueError(f"latent must be one of {(*LATENT_FORMS, 'auto')}, got {self.latent!r}")
        if self.rope_dims not in (None, "auto") and not (isinstance(self.rope_dims, int) and self.rope_dims >= 0
                                                         and self.rope_dims % 2 == 0):
            raise ValueError(f"rope_dims must be None, 'auto' or an even number >= 0, got {self.rope_dims!r}")
        if not (isinstance(self.rope_tolerance, (int, float)) and self.rope_tolerance >= 0):
            raise ValueError(f"rope_tolerance must be a number >= 0, got {self.rope_tolerance!r}")
        if self.ranks is not None and self.latent == "auto":
            # A rank means different things in each form: fixed ranks are the
            # paper's joint latent's unless latent="kv" says otherwise.
            self.latent = "qkv"

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
    xh = None  # the quantized layer input: the same for every beta (H1 and the signs depend on the seed only)
    first = None
    for b in grid:
        base = CompressedQKV.build(svd, rank, b, quant, seed, like=first)
        first = first or base
        xh = base.layer_input(X) if xh is None else xh
        c = base.latent_from_input(xh)  # independent of the latent's clip
        for clip in latent_clips:
            layer = base if clip is None else replace(base, quant=replace(quant, latent_clip=float(clip)))
            key = (float(b), float(layer.quant.latent_clip))
            errors[key] = float(((layer.project_cat(X, xh=xh, c=c) - Y) ** 2).sum())
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
        self._kind = None

    def svds(self, whitening: str = "cholesky", alpha: float = 0.5, form: str = "qkv",
             output_metric: str = "none", context: int = 1024) -> list[JointSVD]:
        key = (whitening, alpha if whitening == "diag" else None, form, output_metric,
               context if output_metric != "none" else None)
        if key not in self._svds:
            out = []
            for s, st in zip(self.sites, self.stats):
                W_q, W_k, W_v, bias = s.weights()
                metric = None
                if output_metric == "attention":
                    metric = partial(self._attention_metric, s, st, form, context)
                try:
                    out.append(joint_svd(W_q, W_k, W_v, s.dims, make_whitening(st, whitening, alpha=alpha), bias,
                                         form, metric))
                except ValueError as e:
                    raise ValueError(f"{s.name}: {e}") from None
            self._svds[key] = out
        return self._svds[key]

    def _attention_metric(self, site: AttentionSite, stats, form: str, context: int, W_cat, bias):
        out_proj = getattr(site.family, "out_proj", None) if site.family is not None else None
        W_o = getattr(site.module, out_proj).weight.detach() if out_proj and hasattr(site.module, out_proj) else None
        inv_freq = None
        if site.family is not None and site.family.rope:
            inv_freq = rope_inv_freq(self.model, site)
        return attention_output_metric(site.dims, form, W_cat, bias, stats.mean_gram(), stats.mean(), W_o, inv_freq,
                                       context)

    def config_svds(self, config: "CompressionConfig", form: str) -> list[JointSVD]:
        return self.svds(config.whitening, config.alpha, form, config.output_metric, config.metric_context)

    def scores(self, loss_fn: Callable, config: "CompressionConfig | None" = None, batches: Iterable | None = None,
               form: str = "qkv") -> list[torch.Tensor]:
        """Importance scores of the singular values of ``config``'s SVDs
        (whitening and output metric; default: CompressionConfig's defaults) in ``form``."""
        svds = self.config_svds(config, form) if config is not None else self.svds(form=form)
        key = (id(loss_fn), id(svds))  # the SVD lists are cached: one per configuration
        if key not in self._scores:
            data = list(batches) if batches is not None else self.calibration
            self._scores[key] = (loss_fn, svds, importance_scores(self.model, self.sites, svds, loss_fn, data,
                                                                  progress=self.progress))
        return self._scores[key][2]

    def ranks(self, config: CompressionConfig, loss_fn: Callable | None = None,
              form: str | None = None) -> tuple[list[int], list | None]:
        form = form or config.latent
        if form not in LATENT_FORMS:
            raise ValueError(f"ranks are per latent form: give one of {LATENT_FORMS}, got {form!r}")
        dims = [LatentDims(d, form) for d in self.dims]
        if config.ranks is not None:
            if len(config.ranks) != len(dims) or any(
                    not 1 <= int(r) <= d.max_rank for r, d in zip(config.ranks, dims)):
                raise ValueError(f"ranks must give one rank in [1, max rank] per layer ({len(dims)} layers, "
                                 f"max ranks {[d.max_rank for d in dims]} in the {form!r} latent form), got "
                                 f"{config.ranks}")
            return [int(r) for r in config.ranks], None
        if config.allocation == "uniform":
            return uniform_ranks(dims, config.budget, align=config.align, min_rank=config.min_rank,
                                 caches=self.caches), None
        if loss_fn is None:
            raise ValueError("allocation='qsvd' scores singular values by gradients: pass loss_fn "
                             "(compress.losses has label-free ones)")
        scores = self.scores(loss_fn, config, form=form)
        return allocate_ranks(scores, dims, config.budget, align=config.align,
                              min_rank=config.min_rank, caches=self.caches), scores

    def compress(self, config: CompressionConfig, loss_fn: Callable | None = None) -> CompressedModel:
        """The compressed model for ``config``; with ``config.latent="auto"``,
        each latent form the budget admits is compressed and the one whose
        outputs diverge least from the original's on calibration batches is
        returned (its info says what was measured)."""
        if config.latent != "auto":
            return self._partial_rope(self.compress_form(config, loss_fn, config.latent), config)
        candidates, refused = {}, {}
        for form in LATENT_FORMS:
            try:
                candidates[form] = self.compress_form(config, loss_fn, form)
            except ValueError as e:  # e.g. an R1 budget below the "kv" form's whole W_q
                refused[form] = str(e)
        if not candidates:
            raise ValueError("no latent form meets this configuration: "
                             + "; ".join(f"{f}: {e}" for f, e in refused.items()))
        measured = {f: self.output_divergence(cm, config.latent_choice_batches) for f, cm in candidates.items()}
        best = min(measured, key=lambda f: (measured[f], LATENT_FORMS.index(f)))
        cm = candidates[best]
        cm.info["latent_choice"] = {"chosen": best, "metric": self._divergence_metric(),
                                    "batches": min(config.latent_choice_batches, len(self.calibration)),
                                    "measured": measured, "refused": refused}
        return self._partial_rope(cm, config)

    def output_divergence(self, cm: CompressedModel, n_batches: int = 4) -> float:
        """How far the compressed model's outputs are from the original's on
        the first ``n_batches`` calibration batches (float64 simulation of the
        kernels): the mean KL(original || compressed) per real token of the
        next-token distributions when the model returns logits, else the
        relative squared error of its first output (last hidden state)."""
        total, count = 0.0, 0.0
        # The original's outputs are recomputed per batch rather than kept:
        # a causal LM's logits are tokens x vocabulary floats.
        for b in self.calibration[: max(1, n_batches)]:
            with torch.no_grad():
                ref = _model_output(self.model, b)
                with swapped_projections(self.model, cm):
                    out = _model_output(self.model, b)
            mask = _mask_of(b, out) if out.dim() == 3 else None
            if self._divergence_metric() == "kl":
                p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
                per = (p.exp() * (p - q)).sum(-1)
                total += float(per[mask].sum() if mask is not None else per.sum())
                count += float(mask.sum() if mask is not None else per.numel())
            else:
                err, norm = ((out.double() - ref.double()) ** 2).sum(-1), (ref.double() ** 2).sum(-1)
                total += float(err[mask].sum() if mask is not None else err.sum())
                count += float(norm[mask].sum() if mask is not None else norm.sum())
        return total / max(count, 1e-300)

    def _divergence_metric(self) -> str:
        return "kl" if self._output_kind() == "logits" else "relative_squared_error"

    def _output_kind(self) -> str:
        if self._kind is None:
            with torch.no_grad():
                out = _call(self.model, self.calibration[0])
            self._kind = "logits" if getattr(out, "logits", None) is not None else "hidden"
        return self._kind

    def compress_form(self, config: CompressionConfig, loss_fn: Callable | None, form: str) -> CompressedModel:
        """The compressed model in one latent ``form`` ("qkv" or "kv")."""
        svds = self.config_svds(config, form)
        ranks, scores = self.ranks(config, loss_fn, form)
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
            "latent_form": form,
            "achieved": achieved(ranks, [LatentDims(d, form) for d in self.dims], config.quant.w_bits,
                                 config.quant.latent_bits, self.caches),
            "uniform_ranks": _safe_uniform([LatentDims(d, form) for d in self.dims], config, self.caches),
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

    def _partial_rope(self, cm: CompressedModel, config: CompressionConfig) -> CompressedModel:
        """config.rope_dims applied after the form is chosen (the choice
        measures with swapped projections, which cannot run partial RoPE)."""
        if config.rope_dims is None:
            return cm
        if not all(site.family is not None and site.family.rope for site in self.sites):
            raise ValueError("rope_dims: partial RoPE needs RoPE attention at every compressed site")
        if config.rope_dims != "auto":
            return cm.with_rope_dims(config.rope_dims)
        heads = {site.dims.head_dim for site in self.sites}
        if len(heads) != 1:
            raise ValueError(f"rope_dims='auto' needs one head dim at every site, got {sorted(heads)}")
        if self._output_kind() != "logits":
            raise ValueError("rope_dims='auto' measures perplexity: it needs a model that returns logits")
        d = heads.pop()
        n = config.rope_choice_batches
        full = self.calibration_nll(cm, n)
        measured = {d: 1.0}  # full RoPE is the model just measured
        for rope_dims in sorted({k - k % 2 for k in (d // 2, d // 4, d // 8, 0)}, reverse=True):
            measured[rope_dims] = math.exp(self.calibration_nll(cm, n, rope_dims // 2) - full)
        met = [k for k, ratio in measured.items() if ratio <= 1 + config.rope_tolerance]
        chosen = min(met, default=d)
        out = cm.with_rope_dims(chosen)
        out.info["rope_choice"] = {"chosen": chosen, "tolerance": config.rope_tolerance,
                                   "batches": min(n, len(self.calibration)), "full_rope_nll": full,
                                   "perplexity_ratio": {str(k): v for k, v in measured.items()}}
        return out

    def calibration_nll(self, cm: CompressedModel, n_batches: int = 4, rope_pairs: int | None = None) -> float:
        """Mean next-token negative log-likelihood per real token of the
        compressed model (float64 simulation of the kernels) on the first
        ``n_batches`` calibration batches. ``rope_pairs``: only that many of
        the highest-frequency rotary pairs turn (the others' frequencies set
        to 0), which is exactly ``cm.with_rope_dims(2 * rope_pairs)``'s
        partial RoPE in the model's own layout."""
        total, count = 0.0, 0.0
        for b in self.calibration[: max(1, n_batches)]:
            with torch.no_grad(), swapped_projections(self.model, cm), \
                    _rotating_pairs(self.model, self.sites, rope_pairs):
                logits = _model_output(self.model, b)
            ids = b["input_ids"] if isinstance(b, dict) else b
            logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None].long())[..., 0]
            mask = _mask_of(b, logits)
            real = mask[:, 1:] & mask[:, :-1] if mask is not None else torch.ones_like(logp, dtype=torch.bool)
            total -= float(logp[real].sum())
            count += float(real.sum())
        return total / max(count, 1.0)


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
        forms = LATENT_FORMS if config.latent == "auto" else (config.latent,)
        errors = []
        for form in forms:
            try:
                check_budget([LatentDims(s.dims, form) for s in sites], config.budget, config.align,
                             config.min_rank, cache_flags(sites, model))
            except ValueError as e:
                errors.append(str(e))
        if len(errors) == len(forms):
            raise ValueError(errors[0] if len(errors) == 1 else "no latent form meets this budget: "
                             + "; ".join(f"{f}: {e}" for f, e in zip(forms, errors)))
    c = Compressor(model, calibration, calib_rows=config.calib_rows, seed=config.seed, progress=progress,
                   layers=layers, sites=sites)
    if score_batches is not None and config.allocation == "qsvd" and loss_fn is not None:
        for form in (LATENT_FORMS if config.latent == "auto" else (config.latent,)):
            c.scores(loss_fn, config, batches=score_batches, form=form)
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


def _model_output(model: nn.Module, batch) -> torch.Tensor:
    """The model's main output: logits, or the last hidden state (the first output)."""
    out = _call(model, batch)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits.float()
    first = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return first.float()


def _safe_uniform(dims: list, config: CompressionConfig, caches=None):
    try:
        return uniform_ranks(dims, config.budget, align=config.align, min_rank=config.min_rank, caches=caches)
    except ValueError:
        return None


def _rotary_module(model: nn.Module, site: AttentionSite) -> nn.Module:
    """The ``rotary_emb`` a site's attention uses: the nearest one with d/2
    ``inv_freq`` values on the way up from the site (the decoder stack's, in
    transformers' LLaMA family)."""
    half = site.dims.head_dim // 2
    parts = site.name.split(".")
    for n in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:n])) if n else model
        rot = getattr(module, "rotary_emb", None)
        freq = getattr(rot, "inv_freq", None)
        if torch.is_tensor(freq) and freq.numel() == half:
            return rot
    raise ValueError(f"{site.name}: its family uses RoPE, but no rotary_emb with {half} inv_freq values was found "
                     "above it; use output_metric='none'")


def rope_inv_freq(model: nn.Module, site: AttentionSite) -> torch.Tensor:
    """The RoPE frequencies [d/2] the site's attention uses."""
    return _rotary_module(model, site).inv_freq.detach().to("cpu", torch.float64)


@contextmanager
def _rotating_pairs(model: nn.Module, sites, pairs: int | None):
    """Within the block only the first ``pairs`` rotary pairs (the highest
    frequencies) of the sites' rotary embeddings turn: the others'
    frequencies are 0 (cos 1, sin 0). None: all of them, unchanged."""
    saved = []
    try:
        if pairs is not None:
            for rot in {id(m): m for m in (_rotary_module(model, s) for s in sites)}.values():
                for name in ("inv_freq", "original_inv_freq"):
                    t = getattr(rot, name, None)
                    if torch.is_tensor(t):
                        saved.append((t, t.clone()))
                        t[pairs:] = 0
        yield
    finally:
        for t, old in saved:
            t.copy_(old)
