"""The compression pipeline, end to end, and its artefact.

    compressed = compress_model(model, calibration_batches, CompressionConfig(...), loss_fn=...)
    with swapped_projections(model, compressed):   # the model now runs the compressed Q/K/V
        ...
    compressed.save("out/")                        # safetensors + qsvd_config.json
    CompressedModel.load("out/")                   # bit-identical

Steps: input statistics (hooks) -> whitening -> joint SVD per layer ->
importance scores (gradients of a label-free loss) -> global rank
allocation under the budget (or uniform ranks) -> per layer: beta chosen on
calibration rows by the quantized layer's output error (the paper's Eq. 14),
H2, H1, weight quantization -> CompressedQKV per layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import nn

from ..integrations.sites import find_attention_sites
from .allocate import allocate_ranks, check_budget, uniform_ranks
from .budget import Budget, LayerDims, achieved
from .calibrate import collect_stats, importance_scores, tqdm
from .layer import CompressedQKV
from .quant import QuantConfig
from .svd import JointSVD, joint_svd
from .whitening import make_whitening

FORMAT_VERSION = 1
CONFIG_FILE = "qsvd_config.json"
TENSOR_FILE = "qsvd_layers.safetensors"
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


@dataclass
class CompressedModel:
    site_names: list[str]
    layers: list[CompressedQKV]
    info: dict

    @property
    def ranks(self) -> list[int]:
        return [l.rank for l in self.layers]

    @property
    def betas(self) -> list[float]:
        return [l.beta for l in self.layers]

    # ----------------------------------------------------------- artefact
    def save(self, directory: str) -> None:
        """Write ``qsvd_layers.safetensors`` and ``qsvd_config.json`` (with the
        tensor file's SHA-256, so a corrupt or swapped file is caught on load)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {f"layers.{i}.{k}": v.contiguous() for i, l in enumerate(self.layers) for k, v in l.tensors().items()}
        tmp = os.path.join(directory, TENSOR_FILE + ".tmp")
        save_file(tensors, tmp)
        digest = _sha256(tmp)
        config = {"format": "qsvd-kernels", "format_version": FORMAT_VERSION, "tensor_file": TENSOR_FILE,
                  "tensor_sha256": digest, "sites": self.site_names, "layers": [l.meta() for l in self.layers],
                  "info": self.info}
        with open(os.path.join(directory, CONFIG_FILE + ".tmp"), "w") as f:
            json.dump(config, f, indent=1)
        os.replace(tmp, os.path.join(directory, TENSOR_FILE))
        os.replace(os.path.join(directory, CONFIG_FILE + ".tmp"), os.path.join(directory, CONFIG_FILE))

    @classmethod
    def load(cls, directory: str) -> "CompressedModel":
        """Load an artefact; any inconsistency raises ValueError before
        anything is returned (nothing half-loaded)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        cfg_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.exists(cfg_path):
            raise ValueError(f"{directory}: no {CONFIG_FILE}; not a qsvd-kernels artefact")
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: corrupt JSON ({e})") from None
        if config.get("format") != "qsvd-kernels" or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: not a qsvd-kernels artefact of format version {FORMAT_VERSION}")
        tpath = os.path.join(directory, os.path.basename(str(config.get("tensor_file", TENSOR_FILE))))
        if not os.path.exists(tpath):
            raise ValueError(f"{directory}: tensor file {os.path.basename(tpath)} is missing")
        if _sha256(tpath) != config.get("tensor_sha256"):
            raise ValueError(f"{tpath}: checksum mismatch: the tensor file is corrupt or belongs to another artefact")
        try:
            flat = load_file(tpath)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{tpath}: unreadable ({e})") from None
        sites, metas = config.get("sites"), config.get("layers")
        if not isinstance(sites, list) or not isinstance(metas, list) or len(sites) != len(metas):
            raise ValueError(f"{cfg_path}: 'sites' and 'layers' must be lists of the same length")
        per_layer: list[dict] = [{} for _ in metas]
        for key, t in flat.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(metas):
                raise ValueError(f"{tpath}: unexpected tensor {key!r}")
            per_layer[int(parts[1])][parts[2]] = t
        layers = [CompressedQKV.from_saved(m, t, f"{directory}: layer {i} ({sites[i]})")
                  for i, (m, t) in enumerate(zip(metas, per_layer))]
        return cls(list(sites), layers, config.get("info", {}))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------- swapping


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


def _resolve_sites(model, names):
    by_name = {s.name: s for s in find_attention_sites(model)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"the model has no attention layers named {missing}: the artefact belongs to another model")
    return [by_name[n] for n in names]


@contextmanager
def swapped_projections(model: nn.Module, compressed_or_projectors, site_names: list[str] | None = None):
    """Within the block, the model's Q/K/V projections are replaced by the
    compressed ones (anything with ``project(x) -> (q, k, v)``)."""
    if isinstance(compressed_or_projectors, CompressedModel):
        projectors, site_names = compressed_or_projectors.layers, compressed_or_projectors.site_names
    else:
        projectors = list(compressed_or_projectors)
        if site_names is None or len(site_names) != len(projectors):
            raise ValueError("pass one site name per projector (e.g. CompressedModel.site_names)")
    sites = _resolve_sites(model, site_names)
    for s, p in zip(sites, projectors):
        if hasattr(p, "dims") and p.dims != s.dims:
            raise ValueError(f"{s.name}: the compressed layer is {p.dims}, the model's is {s.dims}")
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
    """

    def __init__(self, model: nn.Module, calibration: Iterable, *, calib_rows: int = 2048, seed: int = 0,
                 progress: bool = True):
        self.model = model
        self.calibration = list(calibration)
        self.sites = find_attention_sites(model)
        self.dims = [s.dims for s in self.sites]
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
            return uniform_ranks(self.dims, config.budget, align=config.align, min_rank=config.min_rank), None
        if loss_fn is None:
            raise ValueError("allocation='qsvd' scores singular values by gradients: pass loss_fn "
                             "(compress.losses has label-free ones)")
        scores = self.scores(loss_fn, config.whitening, config.alpha)
        return allocate_ranks(scores, self.dims, config.budget, align=config.align,
                              min_rank=config.min_rank), scores

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
            "achieved": achieved(ranks, self.dims, config.quant.w_bits, config.quant.latent_bits),
            "uniform_ranks": _safe_uniform(self.dims, config),
            "dims": [d.to_dict() for d in self.dims],
            "spectra": [svd.sigma.tolist() for svd in svds],
            "scores": [s.tolist() for s in scores] if scores is not None else None,
            "beta_errors": beta_errors,
            "whitening_jitter": [svd.whitening.jitter for svd in svds],
            "calibration_tokens": [st.count for st in self.stats],
        }
        return CompressedModel([s.name for s in self.sites], layers, info)


def compress_model(model: nn.Module, calibration: Iterable, config: CompressionConfig, *,
                   loss_fn: Callable | None = None, score_batches: Iterable | None = None,
                   progress: bool = True) -> CompressedModel:
    """Compress every attention layer of ``model`` (see the module docstring).

    calibration: batches (dicts of model inputs) for the input statistics and
        the beta search; score_batches (default: the same) for the importance
        scores, which need ``loss_fn(model, batch) -> summed loss`` when
        ``config.allocation == "qsvd"``.
    """
    if config.ranks is None:  # a budget the ranks cannot meet fails before any calibration work
        dims = [s.dims for s in find_attention_sites(model)]
        check_budget(dims, config.budget, config.align, config.min_rank)
    c = Compressor(model, calibration, calib_rows=config.calib_rows, seed=config.seed, progress=progress)
    if score_batches is not None and config.allocation == "qsvd" and loss_fn is not None:
        c.scores(loss_fn, config.whitening, config.alpha, batches=score_batches)
    return c.compress(config, loss_fn)


def _safe_uniform(dims: list[LayerDims], config: CompressionConfig):
    try:
        return uniform_ranks(dims, config.budget, align=config.align, min_rank=config.min_rank)
    except ValueError:
        return None
