"""Export a compressed model as a self-contained model directory a serving
engine loads: ``python -m qsvd_kernels export --format vllm --model <hf dir>
--artefact <qsvd dir> --out <dir>``.

The directory holds:

- ``config.json``: the original config with ``architectures`` set to the
  QSVD variant (``QSVDLlamaForCausalLM``, ...) and a ``qsvd`` block (format
  version, one layer spec per layer (model.layer_tensors.QSVDLayerSpec:
  dims, rank, latent form, bits and clip ratios), the artefact's checksum);
- ``model.safetensors``: every original weight except the compressed
  layers' q/k/v projections, plus per layer the kernels' operands under
  ``model.layers.{i}.self_attn.qsvd.{name}`` (``CompressedQKV.kernel_tensors``,
  named and shaped as model.layer_tensors says);
- the tokenizer and generation config files, copied when present.

Everything is checked before anything is written (artefact checksum, the
architecture against the model-family table, every decoder layer
compressed, each layer's dims, quantized settings the kernels serve, the
packed cache row alignment). The directory is written under a temporary
name and renamed, so a failure never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .. import formats
from .._version import __version__
from ..compress.artefact import CompressedModel
from ..model.families import causal_lm_architectures, family_of_architecture
from ..model.sites import find_attention_sites
from .core import refuse_k_bias

EXPORT_FORMAT = "qsvd-vllm"
# 2: per-layer specs (latent form included); version 1 (ranks and quant
# lists, every layer in the "qkv" form) still loads.
EXPORT_VERSION = 2
READABLE_EXPORT_VERSIONS = (1, 2)
QSVD_PREFIX = "QSVD"
WEIGHTS_FILE = "model.safetensors"
# Files copied verbatim from the original model directory when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def qsvd_architecture(architecture: str) -> str:
    return QSVD_PREFIX + architecture


def export_vllm(model_dir: str, artefact_dir: str, out_dir: str) -> dict:
    """Write the vLLM model directory; returns its ``qsvd`` config block.
    Raises ValueError (nothing written) for anything it cannot serve."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"--out {out_dir} exists and is not an empty directory; choose a new path")
    if not os.path.isdir(artefact_dir):
        raise ValueError(f"--artefact {artefact_dir}: no such directory (make one with `python -m qsvd_kernels "
                         "compress`)")
    cm = CompressedModel.load(artefact_dir)  # checksum, shapes: ValueError on any inconsistency
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--model {model_dir}: no config.json; not a Hugging Face model directory")
    with open(config_path) as f:
        config = json.load(f)
    archs = config.get("architectures") or []
    family = family_of_architecture(archs[0]) if len(archs) == 1 else None
    if family is None:
        raise ValueError(f"--model {model_dir}: architecture {archs} is not served by the vLLM integration; "
                         f"supported: {', '.join(causal_lm_architectures())}")

    from .models import load_model  # transformers, offline

    model, _, _ = load_model(model_dir)
    sites = [s for s in find_attention_sites(model) if s.keeps_cache]
    names = [s.name for s in sites]
    if list(cm.site_names) != names:
        missing = [n for n in names if n not in cm.site_names]
        raise ValueError(f"--artefact {artefact_dir} does not match --model {model_dir}: the vLLM integration needs "
                         f"every decoder layer compressed ({len(names)} layers), the artefact has "
                         f"{len(cm.site_names)} sites" + (f"; missing {missing[:4]}" if missing else ""))
    tensors: dict[str, torch.Tensor] = {}
    specs = []
    compressed_params = set()
    for i, (site, layer) in enumerate(zip(sites, cm.layers)):
        where = f"layer {i} ({site.name})"
        if layer.dims != site.dims:
            raise ValueError(f"{where}: the artefact's dims {layer.dims} differ from the model's {site.dims}")
        quant = layer.quant
        problems = site.family.unsupported(site.module)
        if problems:
            raise ValueError(f"{where}: {', '.join(problems)} is not implemented by the QSVD attention layer")
        try:
            kt = layer.kernel_tensors()
        except ValueError as e:
            raise ValueError(f"{where}: {e} (export a W8A8 or W4A4 artefact)") from None
        row = formats.code_row_bytes(quant.latent_bits, layer.rank)
        if row % 4:
            raise ValueError(f"{where}: rank {layer.rank} at {quant.latent_bits} bits gives {row}-byte cache rows; "
                             "the packed cache needs a multiple of 4 (compress with --align 16)")
        refuse_k_bias(kt.get("bk"), where)
        specs.append(layer.spec().to_dict())
        for name, t in kt.items():
            if t is not None:
                tensors[f"{site.name}.qsvd.{name}"] = t.contiguous().clone()
        compressed_params.update(f"{site.name}.{a}.{p}" for a in site.attrs for p in ("weight", "bias"))

    tied = bool(config.get("tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if name in compressed_params or (tied and name == "lm_head.weight") or "rotary_emb" in name:
            continue
        tensors[name] = t.detach().contiguous().clone()

    qsvd = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "library_version": __version__,
            "base_architecture": archs[0], "family": family.name, "layers": specs, "ranks": cm.ranks,
            "quant": [l.quant.to_dict() for l in cm.layers], "sites": names,
            "artefact_sha256": _artefact_sha(artefact_dir)}
    out_config = dict(config)
    out_config["architectures"] = [qsvd_architecture(archs[0])]
    out_config["qsvd"] = qsvd

    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".qsvd-export-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(out_config, f, indent=1)
        for name in SIDE_FILES:
            src = os.path.join(model_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return qsvd


def _artefact_sha(artefact_dir: str) -> str:
    from ..compress.artefact import CONFIG_FILE

    with open(os.path.join(artefact_dir, CONFIG_FILE)) as f:
        return json.load(f)["tensor_sha256"]
