"""The CPU kernels' path choices: the ISA level of the element-wise loops
(QSVD_CPU_ISA, set_cpu_isa, qsvd_kernels.cpu_isa), the report of every path
(_C.cpu_paths(), build_info()["cpu"]), the knobs that force a path, and
results that do not depend on the level. The op tests that run at every
level take the `isa` fixture (conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels.formats import code_format

from conftest import ISA_LEVELS, isa_levels_to_test

KEYS = {"isa", "isa_detected", "isa_supported", "features", "int8_brgemm", "mkl_bf16_gemm", "latent_digit_scores",
        "weight_streaming", "quant_gemm_small_m", "latent_absorbed", "knobs"}


def _split(p):
    """Whether the split path serves, from the report's own parts."""
    return p["latent_digit_scores"] != "none"
FEATURES = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_int8", "amx_bf16"}
KNOBS = ("QSVD_CPU_ISA", "QSVD_CPU_QUANT_GEMM", "QSVD_CPU_LATENT_GEMM")


def _python(*args, **env):
    """python *args in a fresh process, with the CPU knobs of `env` only."""
    full = {k: v for k, v in os.environ.items() if k not in KNOBS}
    full.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=120)


def test_cpu_paths_report_is_consistent():
    p = qk._C.cpu_paths()
    assert set(p) == KEYS
    assert set(p["features"]) == FEATURES and all(isinstance(v, bool) for v in p["features"].values())
    f = p["features"]
    # The levels follow from the features (qsvd/cpu/isa.h).
    avx2 = f["avx2"] and f["fma"] and f["f16c"]
    avx512 = avx2 and f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["avx512dq"]
    assert p["isa_supported"] == [lvl for lvl, ok in zip(ISA_LEVELS, (avx512, avx2, True)) if ok]
    assert p["isa_detected"] == p["isa_supported"][0]
    assert p["isa"] == qk._C.cpu_isa() and p["isa"] in p["isa_supported"]
    assert p["weight_streaming"] == (p["isa"] == "avx512")
    assert set(p["knobs"]) == set(KNOBS)
    for knob in ("QSVD_CPU_QUANT_GEMM", "QSVD_CPU_LATENT_GEMM"):
        assert p["knobs"][knob] == os.environ.get(knob)
    # What the kernels' own path functions say.
    if p["knobs"]["QSVD_CPU_QUANT_GEMM"] in (None, "", "auto"):
        assert p["quant_gemm_small_m"] == ("brgemm" if p["int8_brgemm"] else qk._C.quant_gemm_cpu_path(1, 4096))
        assert p["quant_gemm_small_m"] in ("brgemm", "onednn", "scalar")
    if p["knobs"]["QSVD_CPU_LATENT_GEMM"] in (None, "", "auto"):
        assert p["latent_absorbed"] == ("split" if _split(p) else "fp32")
    # The digit scores: brgemm where it serves with MKL's bf16 GEMM (its V step), else oneDNN's _int_mm
    # where it is exact (and oneDNN on).
    if p["int8_brgemm"] and p["mkl_bf16_gemm"]:
        assert p["latent_digit_scores"] == "brgemm"
    else:
        assert p["latent_digit_scores"] in ("onednn", "none")
        if p["latent_digit_scores"] == "onednn":
            assert torch.backends.mkldnn.enabled
    # brgemm's int8 path needs AMX (torch offers it nowhere else).
    if p["int8_brgemm"]:
        assert f["amx_int8"]


def test_build_info_and_cli_name_the_cpu_paths():
    info = qk.build_info()["cpu"]
    assert set(info) == KEYS | {"model"} and isinstance(info["model"], str) and info["model"]
    out = _python("-m", "qsvd_kernels", "info", QSVD_CPU_ISA="baseline")
    assert out.returncode == 0, out.stderr
    cpu = json.loads(out.stdout)["cpu"]
    assert cpu["isa"] == "baseline" and cpu["knobs"]["QSVD_CPU_ISA"] == "baseline" and not cpu["weight_streaming"]


@pytest.mark.parametrize("value", ["onednn", "brgemm", "auto", "fast"])
def test_cpu_paths_reports_forced_quant_gemm_path(monkeypatch, value):
    """A forced path is reported; one that cannot serve here, or a bad
    value, is reported as the error a call would raise, not raised."""
    monkeypatch.setenv("QSVD_CPU_QUANT_GEMM", "onednn")
    int_mm = qk._C.quant_gemm_cpu_path(1, 4096)  # at::_int_mm, or the scalar loop where it is not exact
    monkeypatch.setenv("QSVD_CPU_QUANT_GEMM", value)
    p = qk._C.cpu_paths()
    assert p["knobs"]["QSVD_CPU_QUANT_GEMM"] == value
    if value == "fast":
        assert p["quant_gemm_small_m"].startswith("error: ") and \
            "QSVD_CPU_QUANT_GEMM must be onednn, brgemm or auto, got 'fast'" in p["quant_gemm_small_m"]
    elif value == "brgemm" and not p["int8_brgemm"]:
        assert p["quant_gemm_small_m"].startswith("error: ") and \
            "QSVD_CPU_QUANT_GEMM=brgemm, but" in p["quant_gemm_small_m"]
        with pytest.raises(RuntimeError, match="QSVD_CPU_QUANT_GEMM=brgemm, but"):
            qk.quant_gemm(torch.ones(1, 8, dtype=torch.int8), torch.ones(1), torch.ones(2, 8, dtype=torch.int8),
                          torch.ones(2), 8, 8, torch.float32)
    elif value == "brgemm" or (value == "auto" and p["int8_brgemm"]):
        assert p["quant_gemm_small_m"] == "brgemm"
    else:
        assert p["quant_gemm_small_m"] == int_mm


@pytest.mark.parametrize("value", ["fp32", "split", "auto", "fast"])
def test_cpu_paths_reports_forced_latent_path(monkeypatch, value):
    monkeypatch.setenv("QSVD_CPU_LATENT_GEMM", value)
    p = qk._C.cpu_paths()
    assert p["knobs"]["QSVD_CPU_LATENT_GEMM"] == value
    split = _split(p)
    if value == "fast":
        assert p["latent_absorbed"].startswith("error: ") and \
            "QSVD_CPU_LATENT_GEMM must be fp32, split or auto, got 'fast'" in p["latent_absorbed"]
    elif value == "split" and not split:
        assert p["latent_absorbed"].startswith("error: ") and "QSVD_CPU_LATENT_GEMM=split, but" in p["latent_absorbed"]
    else:
        assert p["latent_absorbed"] == ("fp32" if value == "fp32" or not split else "split")


def test_cli_info_does_not_crash_on_an_unavailable_forced_path():
    """`python -m qsvd_kernels info` names the error of a knob that cannot
    be honoured instead of crashing (where brgemm serves, the forced path
    is simply reported)."""
    out = _python("-m", "qsvd_kernels", "info", QSVD_CPU_QUANT_GEMM="brgemm", QSVD_CPU_LATENT_GEMM="bogus")
    assert out.returncode == 0, out.stderr
    cpu = json.loads(out.stdout)["cpu"]
    if cpu["int8_brgemm"]:
        assert cpu["quant_gemm_small_m"] == "brgemm"
    else:
        assert cpu["quant_gemm_small_m"].startswith("error: qsvd.quant_gemm: QSVD_CPU_QUANT_GEMM=brgemm, but")
    assert "QSVD_CPU_LATENT_GEMM must be fp32, split or auto, got 'bogus'" in cpu["latent_absorbed"]


def test_set_cpu_isa_and_context_manager():
    start = qk._C.cpu_isa()
    for level in isa_levels_to_test():
        before = qk._C.cpu_isa()
        assert qk._C.set_cpu_isa(level) == before
        assert qk._C.cpu_isa() == level and qk._C.cpu_paths()["isa"] == level
        assert qk._C.cpu_paths()["weight_streaming"] == (level == "avx512")
    qk._C.set_cpu_isa(start)
    # The context manager restores the level, also when the block raises.
    other = isa_levels_to_test()[-1]
    with pytest.raises(KeyError):
        with qk.cpu_isa(other) as name:
            assert name == other and qk._C.cpu_isa() == other
            raise KeyError("inside")
    assert qk._C.cpu_isa() == start


@pytest.mark.parametrize("bad", ["bogus", "AVX2", "auto", ""])
def test_set_cpu_isa_refuses_unknown_names(bad):
    before = qk._C.cpu_isa()
    with pytest.raises(ValueError, match=r"set_cpu_isa: `name` must be avx512, avx2 or baseline, got '"):
        qk._C.set_cpu_isa(bad)
    with pytest.raises(ValueError, match="`name`"):
        with qk.cpu_isa(bad):
            pass
    assert qk._C.cpu_isa() == before


def test_set_cpu_isa_refuses_a_level_the_cpu_lacks():
    missing = [lvl for lvl in ISA_LEVELS if lvl not in qk._C.cpu_paths()["isa_supported"]]
    if not missing:
        pytest.skip("this CPU supports every ISA level")
    before = qk._C.cpu_isa()
    with pytest.raises(ValueError, match=rf"`name` = '{missing[0]}' is a level this CPU lacks"):
        qk._C.set_cpu_isa(missing[0])
    assert qk._C.cpu_isa() == before


def test_qsvd_cpu_isa_env_sets_the_level():
    for level in isa_levels_to_test():
        out = _python("-c", "import qsvd_kernels as qk; p = qk._C.cpu_paths(); "
                      "print(qk._C.cpu_isa(), p['isa'], p['knobs']['QSVD_CPU_ISA'], p['weight_streaming'])",
                      QSVD_CPU_ISA=level)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [level, level, level, str(level == "avx512")]
    out = _python("-c", "import qsvd_kernels as qk; print(qk._C.cpu_isa())", QSVD_CPU_ISA="auto")
    assert out.returncode == 0 and out.stdout.strip() == qk._C.cpu_paths()["isa_detected"], out.stderr


def test_qsvd_cpu_isa_env_bad_value_is_an_error_at_import_and_first_use():
    """Read when the library loads: a value that is not a level fails the
    import naming the variable, and, for frameworks that load the library
    alone, every op call."""
    out = _python("-c", "import qsvd_kernels", QSVD_CPU_ISA="bogus")
    assert out.returncode != 0
    assert "QSVD_CPU_ISA must be avx512, avx2, baseline or auto, got 'bogus'" in out.stderr, out.stderr
    code = (
        "import torch\n"
        f"torch.ops.load_library({qk._C.__file__!r})\n"
        "try:\n"
        "    torch.ops.qsvd.hadamard_transform(torch.ones(2, 4), None)\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
    )
    out = _python("-c", code, QSVD_CPU_ISA="avx3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("raised qsvd.hadamard_transform: QSVD_CPU_ISA must be avx512, avx2, baseline or "
                                 "auto, got 'avx3'"), out.stdout


def test_qsvd_cpu_isa_env_naming_a_missing_level_is_an_error():
    missing = [lvl for lvl in ISA_LEVELS if lvl not in qk._C.cpu_paths()["isa_supported"]]
    if not missing:
        pytest.skip("this CPU supports every ISA level")
    out = _python("-c", "import qsvd_kernels", QSVD_CPU_ISA=missing[0])
    assert out.returncode != 0 and f"QSVD_CPU_ISA={missing[0]}, but this CPU lacks it" in out.stderr, out.stderr


# ---------------------------------------------------------------------------
# Results at every level, against each other (the op tests check each level
# against the reference; these pin the outputs that the level's conversions
# write: fp16 via F16C or c10, bf16, the dequantised epilogue).
# ---------------------------------------------------------------------------

def _at_every_level(fn):
    levels = isa_levels_to_test()
    if len(levels) < 2:
        pytest.skip(f"only one ISA level to test here ({levels})")
    out = {}
    for level in levels:
        with qk.cpu_isa(level):
            out[level] = fn()
    return out


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("a_bits,b_bits", [(8, 8), (8, 4), (4, 8), (4, 4)])
@pytest.mark.parametrize("M,N,K", [(1, 70, 642), (17, 33, 1100), (65, 130, 254), (300, 20, 512)])
def test_quant_gemm_same_bits_at_every_level(a_bits, b_bits, M, N, K):
    g = torch.Generator().manual_seed(M + N + K + a_bits * 10 + b_bits)
    lo = {8: -128, 4: -8}
    a = torch.randint(lo[a_bits], -lo[a_bits], (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(lo[b_bits], -lo[b_bits], (N, K), dtype=torch.int8, generator=g)
    A, B = code_format(a_bits).pack(a), code_format(b_bits).pack(b)
    sa, sb = torch.rand(M, generator=g) * 0.02 + 1e-3, torch.rand(N, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, generator=g)

    def run():
        outs = [qk.quant_gemm(A, torch.ones(M), B, torch.ones(N), a_bits, b_bits, torch.float32)]
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            outs.append(qk.quant_gemm(A, sa, B, sb, a_bits, b_bits, dt, bias.to(dt)))
        return outs

    outs = _at_every_level(run)
    exact = (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.float32)
    for level, o in outs.items():
        assert torch.equal(o[0], exact), level
        assert _same(o, outs[isa_levels_to_test()[0]]), level


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_hadamard_same_bits_at_every_level(dtype):
    """Rows of zeros, of values whose rotation overflows fp16 (Inf) and of
    values whose rotation is subnormal in fp16 and bf16: the output
    conversions of every level agree (no NaN here: torch.equal would not
    match it)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1536, generator=g)
    x[1] = 0
    x[2] *= 1e-5 if dtype == torch.float16 else 1e-39
    x[3] = 6e4  # rotated: +-6e4 sqrt(1536) in column 0 (Inf in fp16), zeros elsewhere
    x = x.to(dtype)
    outs = _at_every_level(lambda: [qk.hadamard_transform(x), *qk.hadamard_quant(x, 4, 0.9), *qk.hadamard_quant(x, 8)])
    first = outs[isa_levels_to_test()[0]]
    assert not first[0].isnan().any()
    if dtype == torch.float16:
        assert first[0][3, 0].abs() == float("inf") and (first[0][2].abs() < 6.1e-5).all()
    for level, o in outs.items():
        assert _same(o, first), level


def test_onednn_switched_off_takes_the_scalar_and_fp32_paths(monkeypatch):
    """With oneDNN off, at::_int_mm runs torch's reference loops (about 100x
    slower): quant_gemm takes its own exact scalar loop and latent_attention
    has no split path (nothing to run its digit scores on), asked per call."""
    monkeypatch.delenv("QSVD_CPU_QUANT_GEMM", raising=False)
    monkeypatch.delenv("QSVD_CPU_LATENT_GEMM", raising=False)
    with torch.backends.mkldnn.flags(enabled=False):
        p = qk._C.cpu_paths()
        assert p["latent_digit_scores"] == "none" and p["latent_absorbed"] == "fp32"
        assert qk._C.quant_gemm_cpu_path(128, 4096) == "scalar"
    assert qk._C.cpu_paths()["latent_digit_scores"] == _C_digit_scores_expected()


def _C_digit_scores_expected():
    p = qk._C.cpu_paths()
    if p["int8_brgemm"] and p["mkl_bf16_gemm"]:
        return "brgemm"
    return "onednn" if qk._C.quant_gemm_cpu_path(128, 4096) == "onednn" else "none"
