"""Turn a pytest-benchmark JSON into a markdown roofline table.

    python bench/summarize.py bench/results/<gpu>-<date>.json > bench/results/<gpu>-<date>.md

Each row: the benchmark, its median time, the bytes/flops model it declared,
achieved GB/s (and TOPS), the fraction of the device's peak, and the ratio
of the qsvd kernel's time to each baseline measured in the same run. A last
section says what each quant_gemm benchmark ran (config, knobs, source).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict


def main(path: str) -> str:
    data = json.load(open(path))
    rows = []
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        impl = info.get("impl", "qsvd")
        key = re.sub(r"-?(qsvd|torch_[a-z0-9_]+)-?", "-", b["name"])  # the case without the impl
        groups[key][impl] = info.get("median_s") or b["stats"]["median"]
        rows.append((b["name"], info))
    commit = data.get("commit_info", {}).get("id") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = data.get("machine_info", {})
    out = [f"# Benchmarks: {path}", "",
           f"- date: {data.get('datetime', '?')}", f"- commit: {commit}",
           f"- device: {next((i.get('device') for _, i in rows if i.get('device')), '?')}",
           f"- host: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}", "",
           "| benchmark | median (us) | bytes | GB/s | HBM peak | TOPS | INT8 peak | qsvd time / baseline time |"
           " ratios recorded by the benchmark |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, info in rows:
        key = re.sub(r"-?(qsvd|torch_[a-z0-9_]+)-?", "-", name)
        ratio = ""
        if info.get("impl", "qsvd") == "qsvd":
            base = {k: v for k, v in groups[key].items() if k != "qsvd"}
            ratio = ", ".join(f"{groups[key]['qsvd'] / v:.2f}x of {k}" for k, v in base.items())
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "")  # noqa: E731
        out.append(f"| {name} | {fmt(info.get('median_s', 0) * 1e6, '{:.1f}')} | {fmt(info.get('bytes'), '{:,}')} | "
                   f"{fmt(info.get('gbps'), '{:.1f}')} | {fmt(info.get('peak_hbm_frac'), '{:.1%}')} | "
                   f"{fmt(info.get('tops') if info.get('flops') else None, '{:.1f}')} | "
                   f"{fmt(info.get('peak_int8_frac'), '{:.1%}')} | {ratio} | {recorded_ratios(info)} |")
    out += crossover_table(data["benchmarks"])
    out += explain_table(rows)
    return "\n".join(out) + "\n"


def recorded_ratios(info) -> str:
    """Ratios a benchmark computed itself against baselines timed in the same
    run (keys naming a ratio, speedup or fraction, beyond the
    columns above)."""
    shown = {"peak_hbm_frac", "peak_int8_frac"}
    parts = [f"{k}={v:.3g}" for k, v in sorted(info.items())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in shown
             and ("ratio" in k or "speedup" in k or "frac" in k)]
    return ", ".join(parts)


def explain_table(rows) -> list[str]:
    """What each benchmark ran (qsvd_kernels.explain, stored by conftest):
    config, knobs, and where the choice came from."""
    ran = [(name, info["explain"]) for name, info in rows if isinstance(info.get("explain"), dict)]
    if not ran:
        return []
    out = ["", "## What ran", "", "| benchmark | config | stream-K | splits | raster | source |",
           "| --- | --- | --- | ---: | --- | --- |"]
    for name, e in ran:
        if "error" in e:
            out.append(f"| {name} | explain failed: {e['error']} | | | | |")
            continue
        source = e.get("source", "?") + (f" ({e['table']})" if e.get("table") else "")
        out.append(f"| {name} | {e.get('config')} | {e.get('streamk_mode')} | {e.get('splits')} | "
                   f"{e.get('raster')} | {source} |")
    return out


def crossover_table(benchmarks) -> list[str]:
    """For the decode-step benchmark: per (device, context, batch, quant), the
    largest rank at which the QSVD step is faster than the fp16 step."""
    times = defaultdict(dict)
    for b in benchmarks:
        i = b.get("extra_info", {})
        if "rank" not in i or "context" not in i:
            continue
        times[(i["device"], i["context"], i["batch"], i["quant"], i["rank"])][i["impl"]] = i["median_s"]
    rows = defaultdict(list)
    for (dev, L, B, q, r), t in times.items():
        if "qsvd" in t and "torch_fp16" in t:
            rows[(dev, L, B, q)].append((r, t["qsvd"] / t["torch_fp16"]))
    if not rows:
        return []
    out = ["", "## Decode step: where QSVD stops beating fp16", "",
           "| device | context | batch | quant | time ratio qsvd/fp16 by rank | faster up to rank |",
           "| --- | ---: | ---: | --- | --- | --- |"]
    for (dev, L, B, q), lst in sorted(rows.items()):
        lst.sort()
        faster = [r for r, ratio in lst if ratio < 1]
        ratios = ", ".join(f"r{r}: {ratio:.2f}" for r, ratio in lst)
        out.append(f"| {dev} | {L} | {B} | {q} | {ratios} | {max(faster) if faster else 'none measured'} |")
    return out


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1]))
