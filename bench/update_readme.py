"""Regenerate README.md's performance section from the committed results.

    python bench/update_readme.py

Everything between <!-- perf:begin --> and <!-- perf:end --> is rewritten:
for each GPU with results in bench/results/<gpu>-<date>.json (the newest
per GPU), the GPU, date and commit and the summary of bench/summarize.py;
the CPU kernel benchmarks (bench/results/cpu-<date>[-<tag>].json, written by
bench/test_bench_cpu.py) merged into one table, the newest run per CPU and
knob set (bench/cpu_rows.py), every row naming its CPU and paths, with the
goals each run missed; the newest vLLM serving
benchmark (bench/results/vllm-cpu-<date>.md, bench/vllm_serving.py); the other CPU-side
results (compression fidelity and cost, capacity arithmetic) are linked.
What has not been measured is said to be not measured.
"""

from __future__ import annotations

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
RESULTS = os.path.join(ROOT, "bench", "results")
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def gpu_results():
    newest = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        name = os.path.basename(path)
        m = re.match(r"(.+)-(\d{4}-\d{2}-\d{2})\.json$", name)
        if not m or name.startswith(("compress_", "capacity", "cpu-", "vllm-")):
            continue
        gpu, date = m.groups()
        if gpu not in newest or date > newest[gpu][0]:
            newest[gpu] = (date, path)
    return newest


def cpu_results(prefix: str = "cpu"):
    """(date, path of the .md) of the newest bench/results/<prefix>-<date>.md, or None."""
    found = []
    for path in glob.glob(os.path.join(RESULTS, f"{prefix}-*.md")):
        m = re.match(re.escape(prefix) + r"-(\d{4}-\d{2}-\d{2})\.md$", os.path.basename(path))
        if m:
            found.append((m.group(1), path))
    return max(found) if found else None


def cpu_section(results: str = RESULTS) -> list[str]:
    """README's CPU kernel table: the newest run per (CPU, AMX, knobs) in
    `results`, its rows labelled by CPU and paths, each against its baseline
    from the same run; then the goals each run missed."""
    import cpu_rows

    runs = cpu_rows.newest_runs(results)
    if not runs:
        return ["### CPU kernels", "", "Not measured yet (`bench/test_bench_cpu.py`).", ""]
    lines = ["### CPU kernels", "",
             "Each qsvd CPU op against its torch baseline in the same run (op and byte models in"
             " bench/test_bench_cpu.py); ratio = qsvd time / baseline time. One run per CPU and set of forced"
             " paths (the newest); a row's paths are the ISA level, then quant_gemm's path at its M or"
             " latent_attention's GEMMs, \"(forced)\" where a QSVD_CPU_* knob chose it. Runs:", ""]
    for date, path, data in runs:
        rec = cpu_rows.run_record(data)
        md = os.path.splitext(path)[0] + ".md"
        ref = os.path.relpath(md if os.path.exists(md) else path, ROOT)
        commit = (data.get("commit_info", {}).get("id") or "?")[:7]
        lines.append(f"- {cpu_rows.cpu_label(rec)}, {date}, commit {commit}, knobs: {cpu_rows.knobs_label(rec)}"
                     f" ([{ref}]({ref}))")
    lines += [""] + cpu_rows.HEADER
    for _, _, data in runs:
        lines += cpu_rows.table_rows(data)
    lines += ["", "Goals not met:", ""]
    for _, _, data in runs:
        rec = cpu_rows.run_record(data)
        missed = cpu_rows.missed_goals(data)
        lines.append(f"- {cpu_rows.cpu_label(rec)}, knobs: {cpu_rows.knobs_label(rec)}: "
                     + ("; ".join(missed) if missed else "none (every goal row met)"))
    return lines + [""]


def partial_rope_section(results: str = RESULTS) -> list[str]:
    """bench/results/partial_rope.json in a few lines: where the 3 % goal is
    met per latent form, and the decode time per d_rope on the goal shape."""
    path = os.path.join(results, "partial_rope.json")
    if not os.path.exists(path):
        return []
    import json

    with open(path) as f:
        res = json.load(f)
    m = res["meta"]
    lines = [f"### Partial RoPE, CPU ({m['cpu']}), {m['date']}", "",
             "Of each head's d dims, d_rope stay rotary and the rest are absorbed"
             " (`CompressionConfig(rope_dims=...)`; [docs/partial-rope.md](docs/partial-rope.md) has the byte and"
             " operation model, [bench/results/partial_rope.md](bench/results/partial_rope.md) every point).", ""]
    p = res.get("perplexity")
    if p:
        for form in dict.fromkeys(r["latent"] for r in p["rows"]):
            rows = [r for r in p["rows"] if r["latent"] == form]
            met = [r["d_rope"] for r in rows if r["ratio_to_full_rope_qsvd"] <= 1.03]
            lines.append(f"- SmolLM2-135M perplexity, latent {form}: " + ", ".join(
                f"d_rope {r['d_rope']} {r['ratio_to_full_rope_qsvd']:.3f}x" for r in rows)
                + f" the full-RoPE QSVD model's; within 3 % down to d_rope {min(met)}.")
    for shape in dict.fromkeys(r["shape"] for r in res.get("decode", [])):
        rows = [r for r in res["decode"] if r["shape"] == shape]
        lines.append(f"- latent_attention decode, {shape} (r {rows[0]['r']}, {rows[0]['L']} cached tokens, B = 1) vs "
                     "SDPA fp32 over the K/V cache: " + ", ".join(
                         f"d_rope {r['d_rope']} {r['rotary_keys']}"
                         + (f" [{r['cpu_path']}]" if r.get("cpu_path") else "") + f" {r['ratio_vs_sdpa_fp32']:.2f}x"
                         for r in rows) + ".")
    return lines + [""]


def section() -> str:
    from summarize import main as summarize

    lines = [BEGIN, "<!-- generated by bench/update_readme.py from bench/results/: do not edit by hand -->", ""]
    gpus = gpu_results()
    if not gpus:
        lines += ["**No GPU results yet.** No CUDA kernel of this library has been timed, so this README makes no",
                  "speed claim. `bench/gpu_check.sh` measures everything on the next GPU (in one call, or in",
                  "stages: `build test`, `sanitize`, `bench capacity`, where one command's time is limited). Kernel",
                  "microbenchmarks (`bench/test_bench_*.py`, pytest-benchmark) report each time as a ratio against a",
                  "baseline measured in the same run and as a fraction of the GPU's peak, from the byte and op",
                  "models written at the top of each file.", ""]
    for gpu, (date, path) in sorted(gpus.items()):
        text = summarize(path)
        lines += [f"### {gpu.replace('-', ' ')}, {date}", "", text.split("\n", 1)[1].strip(), ""]
    lines += cpu_section()
    serving = cpu_results("vllm-cpu")
    if serving:
        date, md = serving
        import json

        table = [ln for ln in open(md).read().splitlines() if ln.startswith("|")]
        with open(md[:-3] + ".json") as f:
            rows = json.load(f)["rows"]
        lines += [f"### Serving on vLLM, CPU, {date}", "",
                  "vLLM's own offline engine, the uncompressed model against QSVD under the same KV budget"
                  f" ([{os.path.relpath(md, ROOT)}]({os.path.relpath(md, ROOT)}), bench/vllm_serving.py; setup,"
                  " byte and operation model there). Capacity is vLLM's report; tokens/s is generated tokens over"
                  " the wall time (prefill included); the decode phase's is the round's time less that of a"
                  " prefill-only round (max_tokens = 1). d_rope is the rotary dims per head: with full RoPE every"
                  " decode step rebuilds K from the latent (2 r E_kv operations per cached token and layer) where"
                  " the uncompressed model reads K and V; partial RoPE keeps d_rope of d dims rotary and absorbs"
                  " the rest, with their rotary keys cached beside the latent (K cached: 2 H_kv d_rope more bytes"
                  " per token, nothing rebuilt) or rebuilt at each step (K rebuilt). One run on a shared VM"
                  " whose speed drifts between passes: compare rows of one load, and see docs/partial-rope.md"
                  " for the per-pass ratios, the fastest rounds and the profiles.", ""]
        for load in dict.fromkeys(r.get("load", "batch") for r in rows):
            got = [r for r in rows if r.get("load", "batch") == load]
            lines.append(f"- **{load}**: " + "; ".join(
                f"{r['engine']} {r['throughput_x']:.2f}x tokens/s ("
                + (f"decode phase {r['decode_x']:.2f}x, " if "decode_x" in r else "")
                + f"{r['capacity_x']:.1f}x tokens fit)"
                for r in got[1:]) + ".")
        lines += [""] + table
        lines += [""]
    lines += partial_rope_section()
    lines += ["CPU-side results (measured here, committed):", ""]
    for name, what in (("compress_minilm.md", "compression fidelity on the real all-MiniLM-L6-v2"),
                       ("compress_smollm2.md", "held-out perplexity of SmolLM2-135M over R2 and bit widths, with the"
                                               " paper's baselines and plain KV quantization at the same bytes"),
                       ("compress_cost.md", "time and memory of the joint SVD and scoring at 7B layer shapes"),
                       ("prefill_attention.md", "the prefill rows' causal attention in bf16 (vLLM's bf16 models) "
                                                "against torch's SDPA on the same data, same rounds"),
                       ("capacity.md", "batch x context that fit a 12 GiB budget, fp16 vs QSVD (arithmetic over the"
                                       " allocated tensors; throughput needs a GPU)")):
        if os.path.exists(os.path.join(RESULTS, name)):
            lines.append(f"- [bench/results/{name}](bench/results/{name}): {what}")
        else:
            lines.append(f"- {what}: not measured yet")
    lines.append(END)
    return "\n".join(lines)


def main():
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: section(), text, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
