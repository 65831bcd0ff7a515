"""The CLI: README's main job (demo) and the build report."""

from __future__ import annotations

import json
import subprocess
import sys

from qsvd_kernels.demo import run_demo


def test_demo_runs_and_quantization_error_is_small():
    lines = []
    result = run_demo(E=256, H=4, H_kv=2, r=96, steps=40, out=lines.append)
    text = "\n".join(lines)
    assert "KV cache:" in text and "R1 =" in text
    assert 0 < result["cache_ratio"] < 1
    # The kernels' W8A8 + INT8-latent output is close to the low-rank fp32 layer.
    quant_line = next(l for l in lines if "quantization alone" in l)
    assert float(quant_line.rsplit(" ", 1)[-1]) < 0.05, quant_line


def test_cli_info_is_json():
    out = subprocess.run([sys.executable, "-m", "qsvd_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["kernels"]["quant_gemm"]["cpu"] is True


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "qsvd_kernels", "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "invalid choice" in out.stderr
