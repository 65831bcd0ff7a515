"""Serving QSVD-compressed models on vLLM.

    pip install -e .[vllm]
    python -m qsvd_kernels export --format vllm --model <hf dir> --artefact <qsvd dir> --out <dir>
    vllm serve <dir>          # or vllm.LLM(model=<dir>)

``register()`` is the package's ``vllm.general_plugins`` entry point: vLLM
runs it in every process it starts, so it is idempotent. It registers one
QSVD architecture per causal LM of the model-family table
(``QSVDLlamaForCausalLM``, ``QSVDMistralForCausalLM``,
``QSVDQwen2ForCausalLM``), lazily: the model module (``model.py``) is
imported only when vLLM builds such a model, and it checks the vLLM version
first, so an unsupported vLLM gives one clear error for QSVD models and
leaves every other model alone.
"""

from __future__ import annotations

from ...model.families import causal_lm_architectures
from ..export import qsvd_architecture

# The vLLM releases this integration is written and tested against (setup.py's
# ``vllm`` extra pins the same range; CI installs requirements-vllm.txt).
SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # [min, max)


def check_vllm_version(version: str | None = None) -> str:
    """Raise RuntimeError naming the installed and the supported versions when
    ``version`` (default: the installed vLLM's) is outside SUPPORTED_VLLM."""
    from packaging.version import Version

    if version is None:
        import vllm

        version = vllm.__version__
    lo, hi = SUPPORTED_VLLM
    base = Version(version.split("+")[0])
    if not (Version(lo) <= Version(base.base_version) < Version(hi)):
        raise RuntimeError(f"qsvd-kernels' vLLM integration supports vllm >= {lo}, < {hi}; vllm {version} is "
                           f"installed. Install a supported release: pip install 'qsvd-kernels[vllm]'")
    return version


def architectures() -> dict[str, str]:
    """QSVD architecture name -> 'module:Class' for vLLM's ModelRegistry."""
    return {qsvd_architecture(a): f"{__name__}.model:{qsvd_architecture(a)}" for a in causal_lm_architectures()}


def register() -> None:
    """The vllm.general_plugins entry point (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, target in architectures().items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
