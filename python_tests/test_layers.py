"""The Python layers import one way: ops/reference/formats <- model <- compress
<- integrations <- cli/demo/bench. The import-linter "layers" contract in
pyproject.toml says so; these tests run it (no cache, nothing written to the
repository) and check that it can fail: an upward import planted in a copy of
the package must break it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
CONTRACT = "qsvd_kernels layers"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is not installed (pip install import-linter): the layer contract cannot be checked")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, str(CONFIG), "--no-cache", "--no-logo"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_is_kept():
    r = _lint(ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert CONTRACT in out and "KEPT" in out, out
    assert "1 kept, 0 broken" in out, out


def test_an_upward_import_breaks_the_contract(tmp_path):
    # A copy of the package's Python sources (not the compiled extension: the
    # linter reads sources only) with model/ importing compress/.
    shutil.copytree(ROOT / "qsvd_kernels", tmp_path / "qsvd_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "data"))
    dims = tmp_path / "qsvd_kernels" / "model" / "dims.py"
    dims.write_text(dims.read_text() + "\nfrom ..compress import budget  # planted upward import\n")
    r = _lint(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert CONTRACT in out and "BROKEN" in out, out
    assert "qsvd_kernels.model.dims -> qsvd_kernels.compress.budget" in out, out
