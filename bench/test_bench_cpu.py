"""The CPU kernels against torch on the same data, in the same run (issue 15).

    python -m pytest bench/test_bench_cpu.py -p no:cacheprovider \\
        --benchmark-json=bench/results/cpu-<date>[-<tag>].json
    python bench/test_bench_cpu.py bench/results/cpu-<date>[-<tag>].json   # writes the .md next to it
    python bench/update_readme.py                                          # README's merged CPU table

Rows for other paths on the same CPU come from runs with the knobs that
force them (qsvd_kernels._C.cpu_paths() reports what they chose), each in
its own file, e.g. on a CPU with AMX and AVX-512:

    QSVD_CPU_QUANT_GEMM=onednn QSVD_CPU_LATENT_GEMM=fp32 python -m pytest bench/test_bench_cpu.py \\
        -p no:cacheprovider --benchmark-json=bench/results/cpu-<date>-no-amx-paths.json
    QSVD_CPU_ISA=avx2 python -m pytest ... --benchmark-json=bench/results/cpu-<date>-avx2.json

Every row records what produced it (bench/cpu_rows.py): the CPU's model
name (/proc/cpuinfo) and whether it has AMX, the ISA level, quant_gemm's
path at the row's M, latent_attention's GEMMs, weight streaming, and the
QSVD_CPU_* knobs that were set. README's table keeps the newest run per
(CPU, AMX, knobs), so runs on several CPUs and with several knob sets sit
side by side, each row against its baseline from the same run. A quick
partial run (-k, e.g. -k "quant_gemm and t1") checks the scripts.

Every case times the qsvd op (pytest-benchmark, median of `rounds`) and its
baseline (the same median over the same number of rounds, interleaved in
the same test, so both see the same machine load), and records in
extra_info: the op and byte model below, achieved GOPS and GB/s, the
baseline's time and the ratio qsvd / baseline (lower is better), and the
issue's goal for that ratio.

Operation and byte model (ops: one multiply and one add = 2 ops; bytes:
what the op must read and write at least, once each):

latent_attention, B = 1, L = 4096 cached tokens, H = H_kv = 32 heads of
d = 128, rank r, INT8 latent codes (E_kv = H_kv d = 4096):
  RoPE: K must be rebuilt per token:
    ops   = 2 L r E_kv (K = codes W_uk) + 2 L H d (scores) + 2 L H r (V
            absorbed) + 2 H r d (W_uv)                   ~ 51.5 G at r = 1536
    bytes = L r + 4 L (codes, scales) + 2 H_kv r d w (W_uk, W_uv; w = 1 for
            int8, 2 for fp16 bytes per weight) + 4 L d (rope tables)
    baseline (the GEMM floor): torch._int_mm [L, r] x [r, E_kv] for int8
    weights, torch.mm fp32 of the same shape for fp16 weights; also SDPA
    fp32 over the full K/V cache, the uncompressed alternative.
  absorbed (no RoPE):
    ops   = 2 H r d (q_lat) + 2 L H r (scores) + 2 L H r (V) + 2 H r d
    bytes = L r + 4 L + 2 H_kv r d w
    baseline: SDPA fp32 over a full K/V cache ([1, H, L, d] each, 4 L E_kv
    bytes apiece). (The kernel's int8-digit scores run two int8 products
    per score term, and the model counts one: the work the math needs.)
quant_gemm, N = K = 4096, out fp16, no bias:
    ops   = 2 M N K;  bytes = M K a/8 + N K b/8 + 4 (M + N) + 2 M N
    baseline: torch._int_mm of the same INT8 GEMM (int32 out, no
    dequantisation) for W8A8; the qsvd W8A8 op at the same M for W4A4.
hadamard_transform, fp32:
    bytes = 8 rows K (one read, one write);  ops = rows K (log2 K + 1)
    baseline: x.clone() (the same bytes moved, no arithmetic).

Every case runs at 2 threads (t2) and at 1 (t1). The machine this ran on
is shared (other processes compete for its two cores): the 2-thread times
then suffer from threads waiting on each other at every parallel region,
in the baselines as in the qsvd ops. Ratios are measured in one test each.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import qsvd_kernels as qk
from qsvd_kernels import reference as R
from qsvd_kernels.testing import random_codes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python_tests"))

import cpu_rows  # noqa: E402

L_CTX, H, H_KV, D = 4096, 32, 32, 128


@pytest.fixture(params=[2, 1], ids=lambda n: f"t{n}", autouse=True)
def threads(request):
    """Every case at two threads (the machine's cores) and at one: on a
    shared machine the one-thread numbers are the steadier ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(request.param, os.cpu_count() or 1))
    yield request.param
    torch.set_num_threads(before)


def _median_s(fn, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bench(benchmark, fn, baseline, *, rounds, ops, bytes_moved, baseline_name, goal, **info):
    """Time fn with pytest-benchmark and baseline with the same clock, after
    a warm-up, interleaved: every round runs the baseline (in pedantic's
    untimed setup, timed here) and then fn, so both see the same load on a
    shared machine. The ratio is median over median."""
    fn()
    baseline()
    base_times = []

    def timed_baseline():
        t0 = time.perf_counter()
        baseline()
        base_times.append(time.perf_counter() - t0)

    benchmark.pedantic(fn, setup=timed_baseline, rounds=rounds, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.median
    tb = statistics.median(base_times)
    benchmark.extra_info.update({
        "device": "cpu", "threads": torch.get_num_threads(), "impl": "qsvd", "ops": ops, "bytes": bytes_moved,
        "median_s": t, "gops": ops / t / 1e9, "gbps": bytes_moved / t / 1e9, "baseline": baseline_name,
        "baseline_s": tb, "ratio": t / tb, "goal_ratio": goal, "goal_met": (t / tb) <= goal if goal else None,
        "cpu": cpu_rows.cpu_record(), **info})


def _latent_case(r, wdtype, rope, seed=0, d_rope=D):
    from helpers import make_paged_cache, make_weights

    g = torch.Generator().manual_seed(seed)
    pc = make_paged_cache([L_CTX], r, 8, 256, extra_blocks=0, generator=g)
    w = make_weights(H_KV, r, D, wdtype, generator=g)
    q = torch.randn(1, H, D, generator=g)
    cos, sin = R.rope_tables(L_CTX, D, pairs=range(d_rope // 2)) if rope else (None, None)
    args = (q, pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8, D**-0.5, cos, sin)
    return args


def _sdpa_inputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, 1, D, generator=g)
    k = torch.randn(1, H, L_CTX, D, generator=g)
    v = torch.randn(1, H, L_CTX, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("wdtype", [torch.int8, torch.float16], ids=["int8", "fp16"])
def test_latent_attention_rope(benchmark, wdtype):
    r = 1536
    args = _latent_case(r, wdtype, True)
    E = H_KV * D
    wb = 1 if wdtype == torch.int8 else 2
    ops = 2 * L_CTX * r * E + 2 * L_CTX * H * D + 2 * L_CTX * H * r + 2 * H * r * D
    bytes_moved = L_CTX * r + 4 * L_CTX + 2 * H_KV * r * D * wb + 4 * L_CTX * D * 2
    if wdtype == torch.int8:
        a = torch.randint(-127, 128, (L_CTX, r), dtype=torch.int8)
        b = torch.randint(-127, 128, (r, E), dtype=torch.int8)
        baseline, name = (lambda: torch._int_mm(a, b)), "torch._int_mm [4096,1536]x[1536,4096]"
    else:
        a, b = torch.randn(L_CTX, r), torch.randn(r, E)
        baseline, name = (lambda: torch.mm(a, b)), "torch.mm fp32 [4096,1536]x[1536,4096]"
    sq, sk, sv = _sdpa_inputs()
    sdpa_s = _median_s(lambda: F.scaled_dot_product_attention(sq, sk, sv), 5)
    _bench(benchmark, lambda: qk.latent_attention(*args), baseline, rounds=5, ops=ops, bytes_moved=bytes_moved,
           baseline_name=name, goal=2.0, sdpa_fp32_s=sdpa_s)
    benchmark.extra_info["ratio_vs_sdpa_fp32"] = benchmark.extra_info["median_s"] / sdpa_s


@pytest.mark.parametrize("d_rope", [D // 2, D // 4, D // 8], ids=lambda n: f"drope{n}")
def test_latent_attention_partial_rope(benchmark, d_rope):
    """Partial RoPE (issue 22): the first d_rope dims of each head rebuilt
    and rotated per token, the rest absorbed. Model (int8 weights, E_r =
    H_kv d_rope): ops = 2 L r E_r (rotary K) + 2 L H d_rope (its scores) +
    2 H r (d - d_rope) (q_lat) + 2 L H r (absorbed scores) + 2 L H r (V) +
    2 H r d (W_uv); bytes = L r + 4 L + 2 H_kv r d + 8 L d_rope. Baseline:
    SDPA fp32 over the full K/V cache (goal at d/4: <= 1.0x)."""
    r = 1536
    args = _latent_case(r, torch.int8, True, d_rope=d_rope)
    ops = (2 * L_CTX * r * H_KV * d_rope + 2 * L_CTX * H * d_rope + 2 * H * r * (D - d_rope) + 4 * L_CTX * H * r
           + 2 * H * r * D)
    bytes_moved = L_CTX * r + 4 * L_CTX + 2 * H_KV * r * D + 8 * L_CTX * d_rope
    sq, sk, sv = _sdpa_inputs()
    _bench(benchmark, lambda: qk.latent_attention(*args), lambda: F.scaled_dot_product_attention(sq, sk, sv),
           rounds=5, ops=ops, bytes_moved=bytes_moved, baseline_name="SDPA fp32, full K/V cache",
           goal=1.0 if d_rope == D // 4 else None, d_rope=d_rope)


@pytest.mark.parametrize("r", [1536, 512])
def test_latent_attention_absorbed(benchmark, r):
    args = _latent_case(r, torch.float16, False)
    ops = 4 * H * r * D + 4 * L_CTX * H * r
    bytes_moved = L_CTX * r + 4 * L_CTX + 2 * H_KV * r * D * 2
    sq, sk, sv = _sdpa_inputs()
    _bench(benchmark, lambda: qk.latent_attention(*args), lambda: F.scaled_dot_product_attention(sq, sk, sv),
           rounds=20, ops=ops, bytes_moved=bytes_moved, baseline_name="SDPA fp32, full K/V cache",
           goal=1.0 if r == 1536 else 0.5)


def _codes(rows, K, bits, g):
    return random_codes(bits, (rows, K), g)[1]


@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("quant", ["W8A8", "W4A4"])
def test_quant_gemm(benchmark, M, quant):
    N = K = 4096
    g = torch.Generator().manual_seed(M)
    bits = 8 if quant == "W8A8" else 4
    a, b = _codes(M, K, bits, g), _codes(N, K, bits, g)
    sa, sb = torch.rand(M, generator=g), torch.rand(N, generator=g)
    ops = 2 * M * N * K
    bytes_moved = M * K * bits // 8 + N * K * bits // 8 + 4 * (M + N) + 2 * M * N
    if quant == "W8A8":
        baseline, name = (lambda: torch._int_mm(a, b.t())), "torch._int_mm (int32 out)"
        goal = 1.5 if M == 1 else 1.2
    else:
        a8, b8 = _codes(M, K, 8, g), _codes(N, K, 8, g)
        baseline, name = (lambda: qk.quant_gemm(a8, sa, b8, sb, 8, 8, torch.float16)), "qsvd quant_gemm W8A8"
        goal = 1.3
    rounds = 40 if M < 512 else 12
    _bench(benchmark, lambda: qk.quant_gemm(a, sa, b, sb, bits, bits, torch.float16), baseline, rounds=rounds,
           ops=ops, bytes_moved=bytes_moved, baseline_name=name, goal=goal, path=qk._C.quant_gemm_cpu_path(M, K))


@pytest.mark.parametrize("rows", [4096, 64])
def test_hadamard(benchmark, rows):
    K = 4096
    x = torch.randn(rows, K)
    _bench(benchmark, lambda: qk.hadamard_transform(x), lambda: x.clone(), rounds=20 if rows > 64 else 400,
           ops=rows * K * (int(math.log2(K)) + 1), bytes_moved=8 * rows * K, baseline_name="x.clone()",
           goal=1.5 if rows > 64 else None, goal_abs_s=None if rows > 64 else 0.2e-3)
    if rows == 64:
        benchmark.extra_info["goal_met"] = benchmark.extra_info["median_s"] < 0.2e-3


def summarize(path: str) -> str:
    """Markdown table of a pytest-benchmark JSON written by this file."""
    import json

    data = json.load(open(path))
    rec = cpu_rows.run_record(data)
    lines = [f"# CPU kernels against torch, same run: {os.path.basename(path)}", "",
             f"- date: {data.get('datetime', '?')}", f"- commit: {data.get('commit_info', {}).get('id', '?')}",
             f"- CPU: {cpu_rows.cpu_label(rec)}, "
             f"{next((b['extra_info'].get('threads') for b in data['benchmarks']), '?')} threads (shared, noisy)",
             f"- ISA level: {rec.get('isa') or 'not recorded'}; knobs set: {cpu_rows.knobs_label(rec)}",
             f"- torch {torch.__version__}", "",
             "Ratio = qsvd median time / baseline median time, both measured in the same test (lower is better).",
             "The op and byte models are at the top of bench/test_bench_cpu.py. Cases run at 2 threads (t2) and 1",
             "(t1). On this shared machine, 2-thread times of small ops that sit near multiples of 4 ms (a 1 MiB",
             "`clone` among them) are scheduler ticks, a thread of the parallel region waiting for its core, not",
             "kernel time: the 1-thread rows are the steadier comparison. Paths: the ISA level, then quant_gemm's",
             "path at the row's M or latent_attention's GEMMs (bench/cpu_rows.py).", ""]
    lines += cpu_rows.HEADER + cpu_rows.table_rows(data)
    missed = cpu_rows.missed_goals(data)
    lines += ["", "Goals not met: " + ("; ".join(missed) if missed else "none") + "."]
    extra = [b for b in data["benchmarks"] if "ratio_vs_sdpa_fp32" in b["extra_info"]]
    if extra:
        lines += ["", "RoPE decode against SDPA fp32 over a full K/V cache (the uncompressed alternative), same test:", ""]
        for b in extra:
            i = b["extra_info"]
            lines.append(f"- {b['name'].replace('test_', '')}: {i['median_s'] * 1e3:.1f} ms vs "
                         f"{i['sdpa_fp32_s'] * 1e3:.2f} ms ({i['ratio_vs_sdpa_fp32']:.1f}x)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from results_io import write_markdown_beside

    write_markdown_beside(sys.argv[1], summarize)
