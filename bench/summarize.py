"""Turn a pytest-benchmark JSON into a markdown roofline table.

    python bench/summarize.py bench/results/<gpu>-<date>.json > bench/results/<gpu>-<date>.md

Each row: the benchmark, its median time, the bytes/flops model it declared,
achieved GB/s (and TOPS), the fraction of the device's peak, and the ratio
of the qsvd kernel's time to each baseline measured in the same run.
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
        key = re.sub(r"-?(qsvd|torch_[a-z_]+)-?", "-", b["name"])  # the case without the impl
        groups[key][impl] = info.get("median_s") or b["stats"]["median"]
        rows.append((b["name"], info))
    commit = data.get("commit_info", {}).get("id") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = data.get("machine_info", {})
    out = [f"# Benchmarks: {path}", "",
           f"- date: {data.get('datetime', '?')}", f"- commit: {commit}",
           f"- device: {next((i.get('device') for _, i in rows if i.get('device')), '?')}",
           f"- host: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}", "",
           "| benchmark | median (us) | bytes | GB/s | HBM peak | TOPS | INT8 peak | qsvd time / baseline time |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, info in rows:
        key = re.sub(r"-?(qsvd|torch_[a-z_]+)-?", "-", name)
        ratio = ""
        if info.get("impl", "qsvd") == "qsvd":
            base = {k: v for k, v in groups[key].items() if k != "qsvd"}
            ratio = ", ".join(f"{groups[key]['qsvd'] / v:.2f}x of {k}" for k, v in base.items())
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "")  # noqa: E731
        out.append(f"| {name} | {fmt(info.get('median_s', 0) * 1e6, '{:.1f}')} | {fmt(info.get('bytes'), '{:,}')} | "
                   f"{fmt(info.get('gbps'), '{:.1f}')} | {fmt(info.get('peak_hbm_frac'), '{:.1%}')} | "
                   f"{fmt(info.get('tops') if info.get('flops') else None, '{:.1f}')} | "
                   f"{fmt(info.get('peak_int8_frac'), '{:.1%}')} | {ratio} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1]))
