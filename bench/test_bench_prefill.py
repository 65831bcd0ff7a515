"""The prefill rows' causal attention of the engine-neutral step
(integrations/core.causal_attention) on the CPU, against torch's SDPA on the
same bf16 data, in the same test (the kernel it replaced for bf16 models).

    python -m pytest bench/test_bench_prefill.py -p no:cacheprovider \\
        --benchmark-json=bench/results/prefill_attention.json
    python bench/test_bench_prefill.py bench/results/prefill_attention.json   # writes the .md next to it

Cases: n new rows over L keys (the last n of them; lower-right causal),
H query heads on H_kv kv heads of d = 128:
  vllm-bench:  n = L = 960, H = H_kv = 8 (bench/vllm_serving.py's layer and prompt)
  chunk:       n = 256 over L = 1024 (a chunked prefill after a 768-token prefix)
  llama7b:     n = L = 2048, H = H_kv = 32

Operation and byte model (ops: multiply + add = 2; bytes: read and written
once each, bf16):
  pairs = n (L - n) + n (n + 1) / 2   (row-key pairs a row may see)
  ops   = 4 H d pairs                 (scores and the weighted sum of V)
  bytes = 2 (2 H n d + 2 H_kv L d)    (q and out, k and v)
The chunks also multiply the masked triangle of each 192-row chunk's
diagonal square (the model counts the work the math needs). Baseline:
F.scaled_dot_product_attention in bf16 with the same lower-right causal
bias (its CPU kernel converts to fp32); SDPA in fp32, what an fp32 prefill
costs, is timed beside both. No CPU peak is tabulated (bench/conftest.py),
so rows give achieved GFLOP/s, not a fraction of a peak. Run at the
machine's 2 threads.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from qsvd_kernels.integrations.core import CAUSAL_CHUNK_ROWS, causal_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_rows  # noqa: E402

D = 128
CASES = {"vllm-bench": (960, 960, 8, 8), "chunk": (256, 1024, 8, 8), "llama7b": (2048, 2048, 32, 32)}


def _timed(fn, times):
    def run():
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_causal_attention_bf16(benchmark, case):
    n, L, H, H_kv = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(H, n, D, generator=g)
    k, v = torch.randn(H_kv, L, D, generator=g), torch.randn(H_kv, L, D, generator=g)
    kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
    scale = D**-0.5
    rep = H // H_kv
    mask = causal_lower_right(n, L)
    qs = (q * scale).to(torch.bfloat16)[None]
    Kb, Vb = kb.repeat_interleave(rep, 0)[None], vb.repeat_interleave(rep, 0)[None]
    Kf, Vf = k.repeat_interleave(rep, 0)[None], v.repeat_interleave(rep, 0)[None]
    sdpa_bf16 = lambda: F.scaled_dot_product_attention(qs, Kb, Vb, attn_mask=mask, scale=1.0)  # noqa: E731
    sdpa_fp32 = lambda: F.scaled_dot_product_attention(q[None], Kf, Vf, attn_mask=mask, scale=scale)  # noqa: E731
    ours = lambda: causal_attention(q, kb, vb, scale, torch.bfloat16)  # noqa: E731
    rounds = 10 if case != "llama7b" else 4
    for f in (ours, sdpa_bf16, sdpa_fp32):  # warm-up
        f()
    bf16_times, fp32_times = [], []
    timed_bf16, timed_fp32 = _timed(sdpa_bf16, bf16_times), _timed(sdpa_fp32, fp32_times)

    def setup():  # the baselines, interleaved with the timed op in every round
        timed_bf16()
        timed_fp32()

    benchmark.pedantic(ours, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.median
    tb, tf = statistics.median(bf16_times), statistics.median(fp32_times)
    pairs = n * (L - n) + n * (n + 1) // 2
    ops, nbytes = 4 * H * D * pairs, 2 * (2 * H * n * D + 2 * H_kv * L * D)
    benchmark.extra_info.update({
        "device": "cpu", "threads": torch.get_num_threads(), "case": case, "n": n, "L": L, "H": H, "H_kv": H_kv,
        "d": D, "chunk_rows": CAUSAL_CHUNK_ROWS, "ops": ops, "bytes": nbytes, "median_s": t, "gops": ops / t / 1e9,
        "gbps": nbytes / t / 1e9, "baseline": "SDPA bf16 (same causal bias)", "baseline_s": tb, "ratio": t / tb,
        "sdpa_fp32_s": tf, "ratio_vs_sdpa_fp32": t / tf, "cpu": cpu_rows.cpu_record()})


def summarize(path: str) -> str:
    import json

    data = json.load(open(path))
    rec = next((b["extra_info"]["cpu"] for b in data["benchmarks"]), {})
    lines = [f"# Prefill causal attention on the CPU, bf16: {os.path.basename(path)}", "",
             f"- date: {data.get('datetime', '?')}", f"- commit: {data.get('commit_info', {}).get('id', '?')}",
             f"- CPU: {rec.get('model', '?')}, {next((b['extra_info']['threads'] for b in data['benchmarks']), '?')}"
             " threads (a shared VM: compare the columns of one row, timed in the same rounds)",
             f"- torch {torch.__version__}", "",
             "`core.causal_attention` (bf16: chunks of torch's bf16 GEMMs) against SDPA on the same bf16 data and",
             "against SDPA in fp32, medians over the same interleaved rounds. Op and byte model: the docstring of",
             "bench/test_bench_prefill.py. Ratio: time / baseline time (lower is better).", "",
             "| case | n | L | H / H_kv | causal_attention ms | GFLOP/s | SDPA bf16 ms | ratio | SDPA fp32 ms | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in data["benchmarks"]:
        i = b["extra_info"]
        lines.append(f"| {i['case']} | {i['n']} | {i['L']} | {i['H']} / {i['H_kv']} | {i['median_s'] * 1e3:.2f} | "
                     f"{i['gops']:.0f} | {i['baseline_s'] * 1e3:.2f} | {i['ratio']:.2f}x | "
                     f"{i['sdpa_fp32_s'] * 1e3:.2f} | {i['ratio_vs_sdpa_fp32']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from results_io import write_markdown_beside

    write_markdown_beside(sys.argv[1], summarize)
