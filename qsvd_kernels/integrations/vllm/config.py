"""config.qsvd, the block `python -m qsvd_kernels export --format vllm`
writes into a model's config.json: read and checked once, into one
``QSVDLayerSpec`` per layer (each layer's bits checked as a ``QuantConfig``)."""

from __future__ import annotations

from ...compress.quant import QuantConfig
from ...model.layer_tensors import QSVDLayerSpec
from ..export import EXPORT_FORMAT, READABLE_EXPORT_VERSIONS


def qsvd_config(config) -> dict:
    qsvd = getattr(config, "qsvd", None)
    if not isinstance(qsvd, dict):
        raise ValueError("this model's config.json has no 'qsvd' block: export it with `python -m qsvd_kernels "
                         "export --format vllm --model <hf dir> --artefact <qsvd dir> --out <dir>`")
    if qsvd.get("format") != EXPORT_FORMAT or qsvd.get("format_version") not in READABLE_EXPORT_VERSIONS:
        raise ValueError(f"config.qsvd is format {qsvd.get('format')!r} version {qsvd.get('format_version')!r}; "
                         f"this qsvd-kernels reads {EXPORT_FORMAT!r} versions {READABLE_EXPORT_VERSIONS}: re-export "
                         "the model")
    for key in ("ranks", "quant"):
        if key not in qsvd:
            raise ValueError(f"config.qsvd lacks {key!r}: re-export the model")
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(qsvd["quant"], list) or len(qsvd["quant"]) != len(qsvd["ranks"]):
        raise ValueError("config.qsvd.quant must hold one entry per layer (as config.qsvd.ranks): re-export the model")
    if n is not None and len(qsvd["ranks"]) != n:
        raise ValueError(f"config.qsvd has {len(qsvd['ranks'])} ranks for {n} layers: every decoder layer must be "
                         "compressed")
    return qsvd


def layer_specs(config) -> list[QSVDLayerSpec]:
    """Every layer's spec from config.qsvd: version 2 states them; version 1
    (ranks and quant lists) means the "qkv" latent form with the config's dims.
    Each layer's bit widths and clips are checked as a QuantConfig."""
    qsvd = qsvd_config(config)
    try:
        if qsvd["format_version"] >= 2:
            specs = [QSVDLayerSpec.from_dict(d) for d in qsvd["layers"]]
            quants = [QuantConfig(s.w_bits, s.a_bits, s.latent_bits, s.a_clip, s.latent_clip) for s in specs]
        else:
            E, H = config.hidden_size, config.num_attention_heads
            H_kv, d = getattr(config, "num_key_value_heads", None) or H, getattr(config, "head_dim", None) or E // H
            quants = [QuantConfig(**q) for q in qsvd["quant"]]
            specs = [QSVDLayerSpec(E, H, H_kv, d, int(r), "qkv", q.w_bits, q.a_bits, q.latent_bits, q.a_clip,
                                   q.latent_clip) for r, q in zip(qsvd["ranks"], quants)]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.qsvd's layer specs are malformed ({e}): re-export the model") from None
    for i, q in enumerate(quants):
        if not (q.w_bits < 16 and q.a_bits < 16 and q.latent_bits < 16):
            raise ValueError(f"config.qsvd layer {i} is {q.name}: vLLM serves quantized artefacts only (W8A8, W8A4 "
                             "or W4A4): re-export one")
    return specs


