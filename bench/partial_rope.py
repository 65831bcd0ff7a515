"""Partial RoPE's trade-off (issue 22), measured in one run on this CPU:

1. Perplexity. SmolLM2-135M-Instruct compressed by QSVD (W8A8, R2 = 25 %
   with bits, the joint "qkv" latent, gradient-scored ranks: the setting of
   compress_smollm2's goal row), then for d_rope in {d, d/2, d/4, d/8, 0}
   the highest-frequency d_rope dims of each head kept rotary and the rest
   made position-free (CompressedModel.with_rope_dims; training-free). Run
   on the ops (apply_qsvd backend="ops": latent_attention with narrow RoPE
   tables) on held-out text (causal_lm.heldout_windows(32, 256), the
   windows of bench/partial_rope_probe.py, whose uncompressed partial-RoPE
   numbers are quoted beside). Ratios against the full-RoPE QSVD model (the
   issue's goal: within 3 % at d/4) and against the original.
2. Decode time of latent_attention (B = 1, 4096 cached tokens, INT8
   latent, int8 weights) at each d_rope against SDPA over the uncompressed
   fp32 and bf16 K/V cache of the same heads, interleaved in the same run
   (median of rounds), for SmolLM2's attention (H = 9, H_kv = 3, d = 64,
   r = the compressed model's median rank) and LLaMA-7B's (H = H_kv = 32,
   d = 128, r = 1536: the issue's goal shape). The latent_attention plan is
   made once per shape (latent_attention_plan) and passed to every call.
   With 0 < d_rope < d, also the cached form: K's rotary part appended once
   in fp16 (latent_rope_keys_append) and read per step, not rebuilt.
   Operation and byte model: docs/partial-rope.md.

    python bench/partial_rope.py [--quick] [--out bench/results/partial_rope]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "python_tests"))

from cpu_rows import cpu_model  # noqa: E402
from results_io import write_results  # noqa: E402

L_CTX = 4096


def perplexity_sweep(quick: bool, forms=("kv", "qkv"), log=print) -> dict:
    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations import causal_lm as C
    from qsvd_kernels.integrations import hf
    from qsvd_kernels.integrations import models as M

    model, tok, _ = M.load_model("smollm2")
    model.eval()
    d = model.config.hidden_size // model.config.num_attention_heads
    calib, _, calib_info = M.lm_calibration(tok, n=256 if quick else None)
    windows, text = C.heldout_windows(tok, 8 if quick else 32, 256)
    comp = qc.Compressor(model, calib, progress=False)
    rows, ranks = [], {}
    for form in forms:
        t0 = time.time()
        cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.25), qc.QuantConfig(8, 8, 8), latent=form),
                           qc.causal_lm_fisher_loss())
        ranks[form] = cm.ranks
        log(f"{form}: compressed in {time.time() - t0:.0f} s: ranks {cm.ranks}")
        form_rows = []
        for d_rope in (d, d // 2, d // 4, d // 8, 0):
            t0 = time.time()
            with torch.no_grad():
                res = C.compare(model, hf.apply_qsvd(copy.deepcopy(model), cm.with_rope_dims(d_rope), backend="ops"),
                                windows)
            form_rows.append({"latent": form, "d_rope": d_rope, "perplexity": res["perplexity"],
                              "ratio_to_original": res["perplexity_ratio"], "mean_kl": res["mean_kl"],
                              "next_token_agreement": res["next_token_agreement"],
                              "original_perplexity": res["perplexity_original"], "seconds": time.time() - t0})
            log(f"{form} d_rope {d_rope}: ppl {res['perplexity']:.3f} ({res['perplexity_ratio']:.4f}x the original)")
        for r in form_rows:
            r["ratio_to_full_rope_qsvd"] = r["perplexity"] / form_rows[0]["perplexity"]
        rows += form_rows
    return {"rows": rows, "ranks": ranks, "head_dim": d, "calibration": calib_info, "heldout": text,
            "setting": "W8A8, R2 = 0.25 (bits included), qsvd allocation (causal_lm_fisher_loss); latent forms "
                       "\"kv\" (the one compress_smollm2 measures best here) and \"qkv\" (the paper's)"}


def _median_interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each fn, the fns run in turn every round (same load)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def decode_timing(shapes: dict, rounds: int, log=print) -> list:
    import qsvd_kernels as qk
    from qsvd_kernels import reference as R

    from helpers import make_paged_cache, make_weights

    rows = []
    for name, (H, H_kv, d, r) in shapes.items():
        paths = {}
        g = torch.Generator().manual_seed(0)
        pc = make_paged_cache([L_CTX], r, 8, 256, extra_blocks=0, generator=g)
        w = make_weights(H_kv, r, d, torch.int8, generator=g)
        q = torch.randn(1, H, d, generator=g)
        sq = torch.randn(1, H, 1, d, generator=g)
        sk, sv = torch.randn(1, H_kv, L_CTX, d, generator=g), torch.randn(1, H_kv, L_CTX, d, generator=g)
        bq, bk, bv = sq.bfloat16(), sk.bfloat16(), sv.bfloat16()
        fns = {"sdpa_fp32": lambda: F.scaled_dot_product_attention(sq, sk, sv, enable_gqa=H != H_kv),
               "sdpa_bf16": lambda: F.scaled_dot_product_attention(bq, bk, bv, enable_gqa=H != H_kv)}
        slots = torch.arange(L_CTX)  # one sequence, blocks in the order of its table
        slots = pc.block_table[0].long()[slots // 256] * 256 + slots % 256
        for d_rope in (d, d // 2, d // 4, d // 8, 0):
            tables = R.rope_tables(L_CTX, d, pairs=range(d_rope // 2)) if d_rope else (None, None)
            args = (q, pc.cache, pc.cache_scale, pc.block_table, pc.seq_lens, *w, 8)
            plan = qk.latent_attention_plan(*args, *tables)
            paths[f"latent_d{d_rope}"] = qk.describe_latent_attention_plan(plan)["cpu_path"]
            fns[f"latent_d{d_rope}"] = (lambda a=args, t=tables, p=plan:
                                        qk.latent_attention(*a, d ** -0.5, *t, True, p))
            if d_rope == 0 and paths["latent_d0"] == "absorbed_split":  # the fp32 GEMMs too, in the same rounds
                fp32_plan = _plan_with_fp32_gemms(args, tables)
                paths["latent_fp32_d0"] = "absorbed_fp32"
                fns["latent_fp32_d0"] = (lambda a=args, t=tables, p=fp32_plan:
                                         qk.latent_attention(*a, d ** -0.5, *t, True, p))
            if 0 < d_rope < d:  # the cached form: K's rotary part appended once, read per step
                keys = torch.zeros(pc.cache.shape[0], 256, H_kv, d_rope, dtype=torch.float16)
                qk.latent_rope_keys_append(pc.cache, pc.cache_scale, slots, torch.arange(L_CTX), w[0], w[1], 8,
                                           *tables, keys)
                cached_plan = qk.latent_attention_plan(*args, *tables, keys)  # its own path (the keys' signature)
                paths[f"cached_d{d_rope}"] = qk.describe_latent_attention_plan(cached_plan)["cpu_path"]
                fns[f"cached_d{d_rope}"] = (lambda a=args, t=tables, p=cached_plan, k=keys:
                                            qk.latent_attention(*a, d ** -0.5, *t, True, p, k))
                if paths[f"cached_d{d_rope}"] == "absorbed_split":  # the fp32 GEMMs too, in the same rounds
                    fp32_plan = _plan_with_fp32_gemms(args, tables, keys)
                    paths[f"cached_fp32_d{d_rope}"] = qk.describe_latent_attention_plan(fp32_plan)["cpu_path"]
                    fns[f"cached_fp32_d{d_rope}"] = (lambda a=args, t=tables, p=fp32_plan, k=keys:
                                                     qk.latent_attention(*a, d ** -0.5, *t, True, p, k))
        med = _median_interleaved(fns, rounds)
        for d_rope, cached, fp32 in [(d, False, False), (d // 2, False, False), (d // 2, True, False),
                                     (d // 2, True, True), (d // 4, False, False), (d // 4, True, False),
                                     (d // 4, True, True), (d // 8, False, False), (d // 8, True, False),
                                     (d // 8, True, True), (0, False, False), (0, False, True)]:
            key = f"{'cached' if cached else 'latent'}{'_fp32' if fp32 else ''}_d{d_rope}"
            if key not in med:  # the fp32 variant where the default is fp32 already
                continue
            t = med[key]
            # docs/partial-rope.md: rotary K rebuilt (2 L r H_kv d_rope), its scores (2 L H d_rope), the
            # absorbed part's q_lat (2 H r (d - d_rope)) and scores (2 L H r, when d_rope < d), V (2 L H r),
            # W_uv (2 H r d); bytes: codes and scales, the int8 weights, the narrow tables (fp32 cos, sin).
            # cached: the rebuild replaced by reading the fp16 rotary keys (2 L H_kv d_rope bytes; no tables).
            ops = ((0 if cached else 2 * L_CTX * r * H_kv * d_rope) + 2 * L_CTX * H * d_rope
                   + 2 * H * r * (d - d_rope) + (2 * L_CTX * H * r if d_rope < d else 0) + 2 * L_CTX * H * r
                   + 2 * H * r * d)
            nbytes = L_CTX * r + 4 * L_CTX + 2 * H_kv * r * d + (2 * L_CTX * H_kv * d_rope if cached
                                                                  else 8 * L_CTX * d_rope)
            rows.append({"shape": name, "H": H, "H_kv": H_kv, "d": d, "r": r, "L": L_CTX, "d_rope": d_rope,
                         "rotary_keys": "cached" if cached else ("rebuilt" if d_rope else "none"),
                         "cpu_path": paths[key] + (" (forced)" if fp32 else ""),
                         "latent_s": t, "sdpa_fp32_s": med["sdpa_fp32"], "sdpa_bf16_s": med["sdpa_bf16"],
                         "ratio_vs_sdpa_fp32": t / med["sdpa_fp32"], "ratio_vs_sdpa_bf16": t / med["sdpa_bf16"],
                         "ops": ops, "bytes": nbytes, "gops": ops / t / 1e9, "gbps": nbytes / t / 1e9,
                         "sdpa_fp32_gbps": 2 * 4 * L_CTX * H_kv * d / med["sdpa_fp32"] / 1e9})
            log(f"{name} d_rope {d_rope}{' cached' if cached else ''}: {t * 1e3:.2f} ms, {t / med['sdpa_fp32']:.2f}x SDPA fp32 "
                f"({med['sdpa_fp32'] * 1e3:.2f} ms), {t / med['sdpa_bf16']:.2f}x SDPA bf16")
    return rows


def to_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Partial RoPE: perplexity and decode time ({m['date']}, commit {m['commit']})", "",
             *([f"(Perplexity rows from the run of {m['perplexity_run']['date']} at commit "
                f"{m['perplexity_run']['commit']}.)", ""] if "perplexity_run" in m else []),
             f"CPU: {m['cpu']}; torch {m['torch']}, {m['threads']} threads. Produced by `bench/partial_rope.py`"
             f"{' --quick' if m['quick'] else ''}; the operation and byte model is docs/partial-rope.md.", ""]
    p = res.get("perplexity")
    if p:
        probe = res.get("probe_uncompressed", {})
        lines += ["## Perplexity (SmolLM2-135M-Instruct, training-free)", "",
                  f"QSVD {p['setting']}; the highest-frequency d_rope dims of each head rotary, the rest "
                  f"position-free; run on the ops. Held-out: {p['heldout'].get('source', 'pydoc topics')} "
                  f"({p['heldout'].get('windows', '?')} windows of {p['heldout'].get('window_length', 256)} "
                  f"tokens). Original perplexity {p['rows'][0]['original_perplexity']:.3f}. Goal: d/4 within "
                  "3 % of the full-RoPE QSVD model.", "",
                  "| latent | d_rope | perplexity | vs full-RoPE QSVD | vs original | mean KL | next-token agreement | "
                  "uncompressed with the same d_rope (probe) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in p["rows"]:
            pr = probe.get(str(r["d_rope"]))
            lines.append(f"| {r['latent']} | {r['d_rope']} | {r['perplexity']:.3f} | "
                         f"{r['ratio_to_full_rope_qsvd']:.4f}x | {r['ratio_to_original']:.4f}x | {r['mean_kl']:.4f} | "
                         f"{r['next_token_agreement']:.3f} | {f'{pr:.3f}' if pr else '-'} |")
        lines.append("")
        for form in dict.fromkeys(r["latent"] for r in p["rows"]):
            met = [r["d_rope"] for r in p["rows"] if r["latent"] == form and r["ratio_to_full_rope_qsvd"] <= 1.03]
            lines.append(f"Latent {form}: within 3 % of its full-RoPE QSVD model at d_rope in {met}"
                         + (f"; the smallest is {min(met)}." if met else "."))
        lines.append("")
    t = res.get("decode")
    if t:
        lines += ["## Decode time (B = 1, 4096 cached tokens, INT8 latent, int8 weights)", "",
                  "latent_attention with its plan made once, against SDPA over the uncompressed K/V cache of the "
                  "same heads (fp32 and bf16), interleaved, median of rounds. GOPS and GB/s by the model in "
                  "docs/partial-rope.md. Goal: d/4 at r = 1536 (LLaMA-7B) <= 1.0x SDPA fp32. CPU path: the plan's "
                  "(absorbed_split: int8 digit scores; where it is the default, the fp32 GEMMs forced by "
                  "QSVD_CPU_LATENT_GEMM=fp32 are timed in the same rounds: rope = the RoPE path's fp32 GEMMs, "
                  "absorbed_fp32 without RoPE).", "",
                  "| shape | d_rope | rotary K | CPU path | latent_attention | SDPA fp32 | SDPA bf16 | vs fp32 | vs bf16 "
                  "| GOPS | GB/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in t:
            lines.append(f"| {r['shape']} (H {r['H']}/{r['H_kv']}, d {r['d']}, r {r['r']}) | {r['d_rope']} | "
                         f"{r['rotary_keys']} | {r.get('cpu_path', '-')} | "
                         f"{r['latent_s'] * 1e3:.2f} ms | {r['sdpa_fp32_s'] * 1e3:.2f} ms | "
                         f"{r['sdpa_bf16_s'] * 1e3:.2f} ms | {r['ratio_vs_sdpa_fp32']:.2f}x | "
                         f"{r['ratio_vs_sdpa_bf16']:.2f}x | {r['gops']:.0f} | {r['gbps']:.1f} |")
    return "\n".join(lines) + "\n"


def _plan_with_fp32_gemms(args, tables, keys=None):
    """The plan with QSVD_CPU_LATENT_GEMM=fp32 (read when the plan is made)."""
    import qsvd_kernels as qk

    old = os.environ.get("QSVD_CPU_LATENT_GEMM")
    os.environ["QSVD_CPU_LATENT_GEMM"] = "fp32"
    try:
        return qk.latent_attention_plan(*args, *tables, keys)
    finally:
        if old is None:
            del os.environ["QSVD_CPU_LATENT_GEMM"]
        else:
            os.environ["QSVD_CPU_LATENT_GEMM"] = old


def _cpu_paths() -> dict:
    """What chose latent_attention's CPU GEMMs in this run (cpu_paths.h)."""
    from qsvd_kernels import _C

    p = _C.cpu_paths()
    return {k: p[k] for k in ("isa", "latent_absorbed", "latent_digit_scores", "int8_brgemm", "mkl_bf16_gemm")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "partial_rope"))
    ap.add_argument("--quick", action="store_true", help="fewer calibration rows, windows and rounds (a check)")
    ap.add_argument("--skip-perplexity", action="store_true", help="keep the perplexity rows of <out>.json")
    ap.add_argument("--skip-decode", action="store_true", help="the perplexity sweep only (time later, on a quiet "
                    "machine, with --skip-perplexity)")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    res = {"meta": {"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpu": cpu_model(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "quick": args.quick, "cpu_paths": _cpu_paths()}}
    ranks = None
    if args.skip_perplexity and os.path.exists(args.out + ".json"):  # keep an earlier run's perplexity rows
        with open(args.out + ".json") as f:
            earlier = json.load(f)
        for key in ("perplexity", "probe_uncompressed"):
            if key in earlier:
                res[key] = earlier[key]
        if "perplexity" in earlier:
            res["meta"]["perplexity_run"] = earlier["meta"]
            ranks = next(iter(earlier["perplexity"]["ranks"].values()))
    if args.skip_decode:
        res["decode"] = []
    if not args.skip_perplexity:
        res["perplexity"] = perplexity_sweep(args.quick)
        ranks = next(iter(res["perplexity"]["ranks"].values()))
        probe = os.path.join(ROOT, "bench", "results", "partial_rope_probe.json")
        if os.path.exists(probe):
            with open(probe) as f:
                rows = json.load(f).get("rows", [])
            res["probe_uncompressed"] = {str(r["d_rope"]): r["perplexity"] for r in rows
                                         if r.get("choice") in ("all", "highest frequency")}
    r_smol = int(statistics.median(ranks)) if ranks else 96
    if not args.skip_decode:
        res["decode"] = decode_timing({"SmolLM2-135M": (9, 3, 64, r_smol), "LLaMA-7B": (32, 32, 128, 1536)},
                                      3 if args.quick else 9)
    write_results(args.out, res, to_markdown(res))


if __name__ == "__main__":
    main()
