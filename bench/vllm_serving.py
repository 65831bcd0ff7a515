"""vLLM's own offline engine, on the CPU: an uncompressed LLaMA against its
QSVD W8A8 and W4A4 compressions, in one run, under the same
VLLM_CPU_KVCACHE_SPACE. The honest form of the paper's capacity claim:
what a real engine fits and serves under a fixed memory budget.

    python bench/vllm_serving.py --out bench/results/vllm-cpu-<date>   (in the vLLM venv)

Model: a LLaMA with LLaMA-2-7B's attention geometry per layer (E = 4096 is
scaled to 1024 with the same head size: 8 heads of 128, multi-head K/V),
2 layers, random weights (no hub), bf16. Compressed with the qsvd
allocation at R2 = 15 % for W8A8 and 7.5 % for W4A4 (bits included, as the
paper counts: about the same ranks, half the bytes).

Byte model per token and layer (what vLLM allocates):
  uncompressed bf16: 2 (K, V) x H_kv x d x 2 bytes
  QSVD:              r x bits / 8 code bytes + 4 (fp32 scale), inline
Reported, each as vLLM reports it: blocks x block_size = tokens that fit;
the most concurrent sequences of max_model_len tokens; and decode
throughput (generated tokens / wall time of one batch, prefill included;
32 prompts of 64 tokens, 128 new tokens each, greedy; the median of 3
rounds after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import write_results  # noqa: E402

GEOMETRY = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048,
                num_hidden_layers=2, max_position_embeddings=1024)


def run_engine(spec: dict, env: dict, work: str) -> dict:
    sp, op = os.path.join(work, "spec.json"), os.path.join(work, "out.json")
    with open(sp, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, "-m", "qsvd_kernels.integrations.vllm.run", sp, op], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    with open(op) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results prefix (writes .json and .md)")
    p.add_argument("--kv-space-gib", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=1024)
    args = p.parse_args(argv)

    import torch

    from qsvd_kernels import compress as qc
    from qsvd_kernels import formats
    from qsvd_kernels.integrations import models as M
    from qsvd_kernels.integrations.export import export_vllm

    work = tempfile.mkdtemp(prefix="qsvd-vllm-bench-")
    model, _, _ = M.tiny_llama(seed=0, **GEOMETRY)
    model = model.to(torch.bfloat16)
    model.save_pretrained(os.path.join(work, "hf"))
    model = model.float()
    t0 = time.time()
    comp = qc.Compressor(model, M.random_token_batches(model.config.vocab_size, 32, 64, seed=0), progress=False)
    engines = {"uncompressed bf16": os.path.join(work, "hf")}
    ranks = {}
    # W8A8 at R2 = 15 %; W4A4 at R2 = 7.5 %: about the same ranks at half the bits
    # (at 4 bits even full rank is only 12.5 % of the bf16 cache).
    for q, r2 in (("W8A8", 0.15), ("W4A4", 0.075)):
        cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", r2), qc.QuantConfig.parse(q)),
                           qc.causal_lm_fisher_loss())
        cm.save(os.path.join(work, f"art-{q}"))
        export_vllm(os.path.join(work, "hf"), os.path.join(work, f"art-{q}"), os.path.join(work, f"vllm-{q}"))
        engines[f"QSVD {q}"] = os.path.join(work, f"vllm-{q}")
        ranks[q] = {"ranks": cm.ranks, "bytes_per_token": sum(formats.packed_row_bytes(l.quant.latent_bits, l.rank)
                                                              for l in cm.layers)}
    compress_s = time.time() - t0

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gib))
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    rows = []
    for name, path in engines.items():
        # a warm-up round (first-call allocations), then args.repeats timed rounds of the whole batch
        res = run_engine({"model": path, "dtype": "bfloat16", "max_model_len": args.max_model_len, "block_size": 32,
                          "rounds": [prompts[:2]] + [prompts] * args.repeats, "max_tokens": args.new,
                          "enable_prefix_caching": False}, env, work)
        tokens = res["num_blocks"] * res["block_size"]
        q = name.split()[-1]
        kv_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d * 2  # bf16 K and V
        per_token = ranks[q]["bytes_per_token"] if q in ranks else kv_bytes
        times = sorted(r["seconds"] for r in res["rounds"][1:])
        secs = times[len(times) // 2]  # the median round
        rows.append({"engine": name, "bytes_per_token": per_token, "num_blocks": res["num_blocks"],
                     "block_size": res["block_size"], "tokens_that_fit": tokens,
                     "byte_model_tokens": (args.kv_space_gib * 2**30 // (res["block_size"] * per_token))
                     * res["block_size"],
                     "max_concurrent_sequences": tokens // args.max_model_len, "median_seconds": secs,
                     "round_seconds": times,
                     "tokens_per_s": args.batch * args.new / secs, "ranks": ranks.get(q, {}).get("ranks"),
                     "vllm_version": res["vllm_version"]})
    base = rows[0]
    for r in rows:
        r["capacity_x"] = r["tokens_that_fit"] / base["tokens_that_fit"]
        r["throughput_x"] = r["tokens_per_s"] / base["tokens_per_s"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    data = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "geometry": GEOMETRY, "kv_space_gib": args.kv_space_gib, "batch": args.batch,
            "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "max_model_len": args.max_model_len,
            "compress_seconds": compress_s, "rows": rows}
    md = [f"# vLLM serving on the CPU: uncompressed vs QSVD ({data['date']}, commit {commit})", "",
          f"vLLM {rows[0]['vllm_version']} offline engine, `VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib}` GiB, "
          f"{os.cpu_count()} CPU cores, bf16, block size 32, max_model_len {args.max_model_len}. Model: "
          f"{GEOMETRY['num_hidden_layers']} LLaMA layers, E = {cfg.hidden_size}, {cfg.num_attention_heads} heads of "
          f"{d} (multi-head K/V), random weights; QSVD W8A8 at R2 = 15 %, W4A4 at R2 = 7.5 % (bits included). "
          "Throughput: one batch of "
          f"{args.batch} prompts of {args.prompt} tokens, {args.new} new tokens each, greedy, prefix caching off, the "
          f"median of {args.repeats} rounds after a warm-up round; tokens/s counts generated tokens over the "
          "round's wall time (prefill included). One run on a shared 2-core machine: ratios in one run are what "
          "count.", "",
          "Byte model per token (all layers): uncompressed 2 x H_kv x d x 2 B per layer; QSVD r x bits/8 + 4 B "
          "per layer (codes + inline fp32 scale). `tokens that fit` is vLLM's own report (blocks x block size); "
          "`byte model` is the arithmetic.", "",
          "| engine | ranks | B/token | tokens that fit | byte model | capacity vs uncompressed | max concurrent "
          f"{args.max_model_len}-token sequences | tokens/s | throughput vs uncompressed |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['engine']} | {r['ranks'] or '-'} | {r['bytes_per_token']} | {r['tokens_that_fit']} | "
                  f"{r['byte_model_tokens']} | {r['capacity_x']:.2f}x | {r['max_concurrent_sequences']} | "
                  f"{r['tokens_per_s']:.1f} | {r['throughput_x']:.2f}x |")
    write_results(args.out, data, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
