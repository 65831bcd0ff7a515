"""What compressing a real model costs on the CPU: time and peak memory of
the joint SVD (with Cholesky whitening) and of the importance scoring, for
one LLaMA-7B-shaped layer (E = 4096, H = H_kv = 32, d = 128).

    python bench/compress_cost.py [--hidden 4096] [--tokens 2048] [--out bench/results/compress_cost]

Each stage runs in a fresh subprocess so its peak resident memory (ru_maxrss)
is its own. Scoring is measured on ``--tokens`` calibration tokens through one
attention layer and reported per token; multiply by the model's layers and
calibration tokens (the paper: 256 samples) to budget a full run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import write_results  # noqa: E402


def _rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _svd_stage(hidden, tokens, q):
    import torch

    from qsvd_kernels import compress as qc

    torch.manual_seed(0)
    dims = qc.LayerDims(hidden, hidden // 128, hidden // 128, 128)
    W = [torch.randn(hidden, n) / hidden**0.5 for n in (dims.q_dim, dims.kv_dim, dims.kv_dim)]
    st = qc.LayerStats(hidden, keep_rows=0)
    for _ in range(max(1, tokens // 1024)):
        st.update(torch.randn(1024, hidden))
    base = _rss_mb()
    t0 = time.perf_counter()
    w = qc.make_whitening(st, "cholesky")
    t1 = time.perf_counter()
    svd = qc.joint_svd(*W, dims, w)
    t2 = time.perf_counter()
    svd.factors(hidden // 3, 0.5)
    q.put({"whitening_s": t1 - t0, "joint_svd_s": t2 - t1, "peak_rss_mb": _rss_mb(), "rss_before_mb": base})


def _score_stage(hidden, tokens, q):
    import torch
    from torch import nn

    from qsvd_kernels import compress as qc

    torch.manual_seed(0)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = hidden // 128, 128
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(3))

        def forward(self, input_ids):
            x = input_ids
            B, T, _ = x.shape
            sh = lambda t: t.view(B, T, self.num_heads, 128).transpose(1, 2)  # noqa: E731
            o = torch.nn.functional.scaled_dot_product_attention(sh(self.q_proj(x)), sh(self.k_proj(x)),
                                                                 sh(self.v_proj(x)), is_causal=True)
            return o.transpose(1, 2).reshape(B, T, -1)

    model = Layer()
    seq = 512
    batches = [{"input_ids": torch.randn(1, seq, hidden)} for _ in range(max(1, tokens // seq))]
    comp = qc.Compressor(model, batches[:1], progress=False)
    svds = comp.svds("none")
    base = _rss_mb()
    t0 = time.perf_counter()
    qc.importance_scores(model, comp.sites, svds, qc.random_projection_loss(lambda m, b: m(**b).mean(1)), batches,
                         progress=False)
    t = time.perf_counter() - t0
    q.put({"scoring_s": t, "tokens": len(batches) * seq, "scoring_s_per_token": t / (len(batches) * seq),
           "peak_rss_mb": _rss_mb(), "rss_before_mb": base})


def _run(stage, hidden, tokens):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=stage, args=(hidden, tokens, q))
    p.start()
    p.join()
    if p.exitcode != 0 or q.empty():
        raise RuntimeError(f"{stage.__name__} failed (exit code {p.exitcode})")
    return q.get()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    res = {"hidden": a.hidden, "tokens": a.tokens, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "svd": _run(_svd_stage, a.hidden, a.tokens), "scoring": _run(_score_stage, a.hidden, a.tokens)}
    s, c = res["svd"], res["scoring"]
    md = (f"# Compression cost of one {a.hidden}-wide layer on the CPU ({res['date']}, {res['cpu']}, "
          f"{res['threads']} threads)\n\n"
          "| stage | time | peak RSS |\n| --- | ---: | ---: |\n"
          f"| Cholesky whitening (Gram {a.hidden}^2, fp64) | {s['whitening_s']:.2f} s | {s['peak_rss_mb']:.0f} MB |\n"
          f"| joint SVD of [W_q W_k W_v] ({a.hidden} x {3 * a.hidden}, fp64) | {s['joint_svd_s']:.1f} s | "
          f"{s['peak_rss_mb']:.0f} MB |\n"
          f"| importance scores ({c['tokens']} tokens, forward + backward + projections) | {c['scoring_s']:.1f} s "
          f"({c['scoring_s_per_token'] * 1e3:.2f} ms/token) | {c['peak_rss_mb']:.0f} MB |\n\n"
          f"A 32-layer model with 256 calibration samples of 512 tokens: about "
          f"{32 * s['joint_svd_s'] / 60:.0f} min of SVD and "
          f"{32 * 256 * 512 * c['scoring_s_per_token'] / 3600:.1f} h of scoring projections on this CPU "
          "(the model's own forward/backward not included beyond one attention layer).\n")
    write_results(a.out, res, md)


if __name__ == "__main__":
    main()
