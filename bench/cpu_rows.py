"""What produced each row of the CPU kernel benchmark, and its table rows.

bench/test_bench_cpu.py records, in every row's extra_info["cpu"], the CPU
(its /proc/cpuinfo model name, whether it has AMX) and the paths the CPU
kernels took (qsvd_kernels._C.cpu_paths(): the ISA level, quant_gemm's and
latent_attention's GEMM paths, weight streaming, and the QSVD_CPU_* knobs
that were set); quant_gemm rows add the path of their own M
(extra_info["path"]). The per-run markdown (test_bench_cpu.py) and
README's merged CPU table (update_readme.py) are both made here, so a row
always names the CPU and the paths that produced it.

Results written before these records existed (bench/results/cpu-2026-11-30)
are labelled from what pytest-benchmark recorded itself: the CPU brand and
flags in machine_info; their paths read "not recorded".
"""

from __future__ import annotations

import os
import platform
import re

KNOBS = {"isa": "QSVD_CPU_ISA", "quant_gemm": "QSVD_CPU_QUANT_GEMM", "latent": "QSVD_CPU_LATENT_GEMM"}

HEADER = ["| CPU | paths | case | qsvd median (ms) | GOPS | GB/s | baseline | baseline (ms) | ratio | goal | met |",
          "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_record() -> dict:
    """The CPU and the paths the CPU kernels take now (read per row: a knob
    read per call could change between rows)."""
    import qsvd_kernels

    p = qsvd_kernels._C.cpu_paths()
    return {"model": cpu_model(), "amx": bool(p["features"].get("amx_int8")), "isa": p["isa"],
            "quant_gemm_small_m": p["quant_gemm_small_m"], "latent_absorbed": p["latent_absorbed"],
            "weight_streaming": p["weight_streaming"], "int8_brgemm": p["int8_brgemm"],
            "knobs": {k: v for k, v in p["knobs"].items() if v}}


def run_record(data: dict) -> dict:
    """The record of a run: its first row's, or, for results from before the
    records, the CPU that pytest-benchmark's machine_info names (brand and
    AMX from its flags) with paths=None (not recorded)."""
    for b in data.get("benchmarks", []):
        if "cpu" in b.get("extra_info", {}):
            return b["extra_info"]["cpu"]
    cpu = data.get("machine_info", {}).get("cpu", {})
    return {"model": cpu.get("brand_raw") or data.get("machine_info", {}).get("processor") or "unknown CPU",
            "amx": "amx_int8" in cpu.get("flags", []), "isa": None, "knobs": None}


def cpu_label(rec: dict) -> str:
    return f"{rec['model']} ({'AMX' if rec['amx'] else 'no AMX'})"


def knobs_label(rec: dict) -> str:
    if rec.get("knobs") is None:
        return "not recorded"
    return ", ".join(f"{k}={v}" for k, v in sorted(rec["knobs"].items())) or "none (defaults)"


def _forced(rec: dict, knob: str) -> str:
    return " (forced)" if KNOBS[knob] in (rec.get("knobs") or {}) else ""


def row_paths(name: str, info: dict, rec: dict) -> str:
    """The paths that matter for one row: the ISA level, and quant_gemm's
    path at the row's M or latent_attention's GEMMs; "(forced)" where a knob
    chose it."""
    if rec.get("isa") is None:
        return "not recorded"
    parts = [f"{rec['isa']}{_forced(rec, 'isa')}"]
    if name.startswith("quant_gemm"):
        parts.append(f"{info.get('path', rec['quant_gemm_small_m'])}{_forced(rec, 'quant_gemm')}")
    elif name.startswith("latent_attention"):
        if name.startswith("latent_attention_absorbed"):
            parts.append(f"{rec['latent_absorbed']} GEMMs{_forced(rec, 'latent')}")
        parts.append("weight streaming" if rec["weight_streaming"] else "no weight streaming")
    return ", ".join(parts)


def goal_text(info: dict) -> str:
    if info.get("goal_ratio"):
        return f"<= {info['goal_ratio']}x"
    if info.get("goal_abs_s"):
        return f"< {info['goal_abs_s'] * 1e3:.1f} ms"
    return "-"


def table_rows(data: dict) -> list[str]:
    """One markdown row per benchmark, labelled with its CPU and paths."""
    run = run_record(data)
    lines = []
    for b in data["benchmarks"]:
        i = b["extra_info"]
        rec = i.get("cpu", run)
        name = b["name"].replace("test_", "")
        met = {True: "yes", False: "no", None: "-"}[i.get("goal_met")]
        lines.append(f"| {cpu_label(rec)} | {row_paths(name, i, rec)} | {name} | {i['median_s'] * 1e3:.3f} | "
                     f"{i['gops']:.1f} | {i['gbps']:.2f} | {i['baseline']} | {i['baseline_s'] * 1e3:.3f} | "
                     f"{i['ratio']:.2f} | {goal_text(i)} | {met} |")
    return lines


def missed_goals(data: dict) -> list[str]:
    """'case (ratio vs goal)' for every row whose goal was not met."""
    out = []
    for b in data["benchmarks"]:
        i = b["extra_info"]
        if i.get("goal_met") is False:
            got = f"{i['ratio']:.2f}x" if i.get("goal_ratio") else f"{i['median_s'] * 1e3:.3f} ms"
            out.append(f"{b['name'].replace('test_', '')} ({got}, goal {goal_text(i)})")
    return out


RESULT_NAME = re.compile(r"cpu-(\d{4}-\d{2}-\d{2})(?:-([A-Za-z0-9_.-]+))?\.json$")


def run_key(data: dict) -> tuple:
    """Runs with the same key replace each other (the newest stays): the
    CPU, AMX or not, and the knobs that forced paths (a run from before the
    records counts as one without knobs, as its command line had none)."""
    rec = run_record(data)
    return rec["model"], rec["amx"], tuple(sorted((rec.get("knobs") or {}).items()))


def newest_runs(results_dir: str) -> list[tuple[str, str, dict]]:
    """(date, json path, data) of the newest run per run_key among
    results_dir/cpu-<date>[-<tag>].json, oldest first."""
    import json

    newest = {}
    for name in sorted(os.listdir(results_dir)):
        m = RESULT_NAME.match(name)
        if not m:
            continue
        path = os.path.join(results_dir, name)
        with open(path) as f:
            data = json.load(f)
        key = run_key(data)
        if key not in newest or (m.group(1), name) > (newest[key][0], os.path.basename(newest[key][1])):
            newest[key] = (m.group(1), path, data)
    return sorted(newest.values(), key=lambda r: (r[0], r[1]))
