"""The compression artefact: ``CompressedModel`` and its on-disk format.

    compressed.save("out/")                # qsvd_layers.safetensors + qsvd_config.json
    CompressedModel.load("out/")           # bit-identical

``qsvd_config.json`` holds the format name and version, the tensor file's
name and SHA-256, the attention site names, one meta dict per layer
(CompressedQKV.meta) and the run's info; ``qsvd_layers.safetensors`` holds
tensor ``layers.{i}.{name}`` for every CompressedQKV.tensors() entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .layer import CompressedQKV

# 2: layers carry their latent form ("qkv" or "kv", with W_q as tensor "wq").
# 3: layers may carry "rope_pairs" (partial RoPE; q and k head dims stored
# with those pairs first). Versions 1 and 2 (every layer full RoPE) still load.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_FILE = "qsvd_config.json"
TENSOR_FILE = "qsvd_layers.safetensors"


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

    def with_rope_dims(self, rope_dims: int | None) -> "CompressedModel":
        """Partial RoPE (issue 22) on every layer: its ``rope_dims`` highest-
        frequency head dims (pairs 0 .. rope_dims/2 - 1: RoPE's frequencies
        fall with the pair index, under any scaling) stay rotary, the others
        become position-free (CompressedQKV.with_rope_pairs). None or the
        head dim: full RoPE (the model itself)."""
        if rope_dims is None:
            return self
        layers = []
        for site, layer in zip(self.site_names, self.layers):
            d = layer.dims.head_dim
            if not (isinstance(rope_dims, int) and 0 <= rope_dims <= d and rope_dims % 2 == 0):
                raise ValueError(f"rope_dims must be an even number of head dims in [0, {d}], got {rope_dims!r}")
            layers.append(layer.with_rope_pairs(range(rope_dims // 2)) if rope_dims < d else layer)
        info = dict(self.info, rope_dims=rope_dims)
        return CompressedModel(list(self.site_names), layers, info)

    # ----------------------------------------------------------- artefact
    def save(self, directory: str) -> None:
        """Write ``qsvd_layers.safetensors`` and ``qsvd_config.json`` (with the
        tensor file's SHA-256, so a corrupt or swapped file is caught on load)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {f"layers.{i}.{k}": v.contiguous() for i, l in enumerate(self.layers) for k, v in l.tensors().items()}
        tmp = os.path.join(directory, TENSOR_FILE + ".tmp")
        save_file(tensors, tmp)
        digest = file_sha256(tmp)
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
        if config.get("format") != "qsvd-kernels" or config.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{cfg_path}: not a qsvd-kernels artefact of a format version this library reads "
                             f"({', '.join(map(str, READABLE_VERSIONS))}); found {config.get('format_version')!r}")
        tpath = os.path.join(directory, os.path.basename(str(config.get("tensor_file", TENSOR_FILE))))
        if not os.path.exists(tpath):
            raise ValueError(f"{directory}: tensor file {os.path.basename(tpath)} is missing")
        if file_sha256(tpath) != config.get("tensor_sha256"):
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
        if config["format_version"] == 1 and any(isinstance(m, dict) and "form" in m for m in metas):
            raise ValueError(f"{cfg_path}: format version 1 has no latent forms, but a layer names one")
        if config["format_version"] < 3 and any(isinstance(m, dict) and "rope_pairs" in m for m in metas):
            raise ValueError(f"{cfg_path}: format version {config['format_version']} has no partial RoPE, but a "
                             "layer names rope_pairs")
        layers = [CompressedQKV.from_saved(m, t, f"{directory}: layer {i} ({sites[i]})")
                  for i, (m, t) in enumerate(zip(metas, per_layer))]
        return cls(list(sites), layers, config.get("info", {}))


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in chunks (artefacts, model files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
