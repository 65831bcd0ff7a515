"""The CPU benchmark's records and README's merged CPU table (bench/cpu_rows.py,
bench/update_readme.py): every row names the CPU and paths that produced it,
runs on other CPUs or with forced paths become extra rows, the newest run per
CPU and knob set replaces older ones, and the goals a run missed are listed."""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import qsvd_kernels as qk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cpu_rows  # noqa: E402
import update_readme  # noqa: E402

AMX_RUN = os.path.join(ROOT, "bench", "results", "cpu-2026-11-30.json")


def _load(path):
    with open(path) as f:
        return json.load(f)


def _forced_run(src, model, amx, knobs, date, scale=1.0, miss=None):
    """A run like src, as if made on `model` with `knobs` set: each row's
    record, its times scaled (to tell runs apart), and row `miss` failing
    its goal."""
    data = copy.deepcopy(src)
    data["datetime"] = f"{date}T12:00:00"
    for b in data["benchmarks"]:
        i = b["extra_info"]
        i["median_s"] *= scale
        i["ratio"] = i["median_s"] / i["baseline_s"]
        if i.get("goal_ratio"):
            i["goal_met"] = i["ratio"] <= i["goal_ratio"]
        i["cpu"] = {"model": model, "amx": amx, "isa": knobs.get("QSVD_CPU_ISA", "avx512"),
                    "quant_gemm_small_m": "onednn", "latent_absorbed": "fp32", "weight_streaming": False,
                    "int8_brgemm": False, "knobs": dict(knobs)}
        if b["name"].startswith("test_quant_gemm"):
            i["path"] = "onednn"
        if b["name"] == miss:
            i["median_s"] = i["baseline_s"] * i["goal_ratio"] * 1.5
            i["ratio"], i["goal_met"] = 1.5 * i["goal_ratio"], False
    return data


def test_results_from_before_the_records_keep_their_cpu():
    """The committed AMX run recorded no paths: its rows name the CPU that
    pytest-benchmark recorded (brand, AMX from its flags), paths 'not
    recorded'."""
    data = _load(AMX_RUN)
    rec = cpu_rows.run_record(data)
    assert rec["model"] == data["machine_info"]["cpu"]["brand_raw"] and rec["amx"] is True
    assert cpu_rows.knobs_label(rec) == "not recorded"
    rows = cpu_rows.table_rows(data)
    assert len(rows) == len(data["benchmarks"])
    assert all(r.startswith(f"| {rec['model']} (AMX) | not recorded | ") for r in rows)


def test_runs_merge_into_one_table(tmp_path):
    amx = _load(AMX_RUN)
    runs = {
        "cpu-2026-11-30.json": amx,
        # a CPU without AMX, defaults; an older run of the same CPU and knobs, replaced by it
        "cpu-2026-12-01-zen4.json": _forced_run(amx, "Test EPYC", False, {}, "2026-12-01", 1.001,
                                                "test_quant_gemm[t1-W4A4-1]"),
        "cpu-2026-11-29-zen4.json": _forced_run(amx, "Test EPYC", False, {}, "2026-11-29", 1.002),
        # the same CPU with the avx2 level forced: rows of their own
        "cpu-2026-12-01-avx2.json": _forced_run(amx, "Test EPYC", False, {"QSVD_CPU_ISA": "avx2"}, "2026-12-01",
                                                1.003),
        "not-a-cpu-run.json": {},
    }
    for name, data in runs.items():
        (tmp_path / name).write_text(json.dumps(data))
    text = "\n".join(update_readme.cpu_section(str(tmp_path)))
    n = len(amx["benchmarks"])
    assert len(re.findall(r"^\| Intel\(R\) Xeon\(R\) Processor \(AMX\) \| not recorded \|", text, re.M)) == n
    assert len(re.findall(r"^\| Test EPYC \(no AMX\) \| avx512[, ]", text, re.M)) == n
    assert len(re.findall(r"^\| Test EPYC \(no AMX\) \| avx2 \(forced\)", text, re.M)) == n
    assert "| avx512, onednn | quant_gemm[t1-W8A8-1] |" in text
    assert "| avx2 (forced), fp32 GEMMs, no weight streaming | latent_attention_absorbed[t1-1536] |" in text
    med = amx["benchmarks"][0]["extra_info"]["median_s"] * 1e3
    assert f"| {med * 1.001:.3f} |" in text and f"| {med * 1.002:.3f} |" not in text  # the newer run stays
    assert "cpu-2026-11-29-zen4" not in text and "cpu-2026-12-01-zen4" in text
    missed = text.split("Goals not met:")[1]
    assert "- Test EPYC (no AMX), knobs: none (defaults): quant_gemm[t1-W4A4-1] (1.95x, goal <= 1.3x)" in missed
    assert "- Intel(R) Xeon(R) Processor (AMX), knobs: not recorded: none (every goal row met)" in missed
    assert "- Test EPYC (no AMX), knobs: QSVD_CPU_ISA=avx2: none (every goal row met)" in missed


def test_cpu_record_is_cpu_paths():
    paths = qk._C.cpu_paths()
    rec = cpu_rows.cpu_record()
    assert rec["isa"] == paths["isa"] and rec["amx"] == paths["features"]["amx_int8"]
    assert rec["quant_gemm_small_m"] == paths["quant_gemm_small_m"] and rec["model"] == cpu_rows.cpu_model() != ""
    with qk.cpu_isa("baseline"):
        assert cpu_rows.cpu_record()["isa"] == "baseline"


def test_readme_performance_section_is_generated():
    """README's block between the perf markers is what bench/update_readme.py
    makes from bench/results/ now (rerun it after adding results)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme[readme.index(update_readme.BEGIN):readme.index(update_readme.END) + len(update_readme.END)]
    assert block == update_readme.section()
