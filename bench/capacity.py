"""Capacity under a fixed GPU memory budget: the honest version of the
paper's 13.1x (which came mostly from not offloading to the CPU).

    python bench/capacity.py [--budget-gb 12] [--layers 32] [--rank 1536] [--quant W8A8] [--measure]

A LLaMA-7B-like attention stack (E = 4096, H = 32, d = 128, 32 layers):
the memory it needs is exact arithmetic over the tensors it allocates:
  fp16:  weights 2 (4 E^2) per layer (Q, K, V, O)    + cache B L 4 E_kv per layer
  QSVD:  weights r (2 E + 2 E_kv) w/8 + scales + 2 E^2 (O in fp16) per layer
         + cache B L (r l/8 + 4) per layer (latent codes + fp32 scale)
For each context length, the largest batch that fits the budget (all the
memory goes to attention: the stacks, not the whole model). With --measure on
a GPU, the decode step of one layer is timed at that (batch, context) and
tokens/s = batch / (layers x step time). Without a GPU the throughput column
says "not measured".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import write_results  # noqa: E402

E, H, D = 4096, 32, 128


def stack_bytes(kind, layers, batch, context, rank, quant):
    from qsvd_kernels.compress import QuantConfig

    q = QuantConfig.parse(quant)
    E_kv = H * D
    if kind == "fp16":
        return layers * (2 * 4 * E * E + batch * context * 4 * E_kv)
    w = rank * (2 * E + 2 * E_kv) * q.w_bits / 8 + 4 * (rank + E + 2 * E_kv) + 2 * E * E
    return layers * (w + batch * context * (rank * q.latent_bits / 8 + 4))


def max_batch(kind, budget, layers, context, rank, quant):
    lo, hi = 0, 1
    while stack_bytes(kind, layers, hi, context, rank, quant) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if stack_bytes(kind, layers, mid, context, rank, quant) <= budget else (lo, mid)
    return lo


def run(budget_gb=12.0, layers=32, rank=1536, quant="W8A8", measure=False, contexts=(1024, 4096, 16384, 32768)):
    import torch

    budget = budget_gb * 2**30
    rows = []
    device = "cuda" if (measure and torch.cuda.is_available()) else None
    for L in contexts:
        row = {"context": L}
        for kind in ("fp16", "qsvd"):
            B = max_batch(kind, budget, layers, L, rank, quant)
            row[f"{kind}_max_batch"] = B
            row[f"{kind}_tokens_in_flight"] = B * L
            row[f"{kind}_tok_per_s"] = None
            if device and B > 0:
                from qsvd_kernels.bench_layer import _median_time, make_decode_steps

                try:
                    qsvd_step, base_step, _ = make_decode_steps(E, H, H, rank, L, B, quant, device, max_steps=12)
                    step = qsvd_step if kind == "qsvd" else base_step
                    for _ in range(2):
                        step()
                    t = _median_time(step, 5, device)
                    row[f"{kind}_tok_per_s"] = B / (layers * t)
                except NotImplementedError as e:
                    row[f"{kind}_tok_per_s"] = f"not measured: {e}"
        rows.append(row)
    return {"budget_gb": budget_gb, "layers": layers, "rank": rank, "quant": quant, "rows": rows,
            "device": torch.cuda.get_device_name() if device else "none (capacity is arithmetic; no throughput)",
            "date": time.strftime("%Y-%m-%d")}


def to_markdown(res):
    out = [f"# Capacity of a LLaMA-7B-like attention stack in {res['budget_gb']:g} GiB "
           f"({res['layers']} layers, QSVD r = {res['rank']}, {res['quant']}; {res['date']})", "",
           f"Throughput device: {res['device']}.", "",
           "| context | fp16 max batch | QSVD max batch | capacity ratio | fp16 tok/s | QSVD tok/s |",
           "| ---: | ---: | ---: | ---: | --- | --- |"]
    for r in res["rows"]:
        ratio = r["qsvd_max_batch"] / r["fp16_max_batch"] if r["fp16_max_batch"] else float("inf")
        fmt = lambda v: "not measured" if v is None else (f"{v:.0f}" if isinstance(v, float) else str(v))  # noqa: E731
        out.append(f"| {r['context']} | {r['fp16_max_batch']} | {r['qsvd_max_batch']} | {ratio:.1f}x | "
                   f"{fmt(r['fp16_tok_per_s'])} | {fmt(r['qsvd_tok_per_s'])} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-gb", type=float, default=12.0)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=1536)
    p.add_argument("--quant", default="W8A8")
    p.add_argument("--measure", action="store_true", help="time the decode step at each capacity point (GPU)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    a = p.parse_args(argv)
    res = run(a.budget_gb, a.layers, a.rank, a.quant, a.measure)
    write_results(a.out, res, to_markdown(res))


if __name__ == "__main__":
    main()
