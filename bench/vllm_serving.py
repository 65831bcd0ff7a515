"""vLLM's own offline engine, on the CPU: an uncompressed LLaMA against its
QSVD compressions (W8A8 and W4A4, full and partial RoPE), in one run, under
the same KV budget. The honest form of the paper's capacity claim: what a
real engine fits and serves under a fixed memory budget, and how fast.

    python bench/vllm_serving.py --out bench/results/vllm-cpu-<date>   (in the vLLM venv)

Model: a LLaMA with LLaMA-2-7B's attention geometry per layer (E = 4096 is
scaled to 1024 with the same head size: 8 heads of 128, multi-head K/V),
2 layers, random weights (no hub), bf16. Compressed with the qsvd
allocation at R2 = 15 % for W8A8 and 7.5 % for W4A4 (bits included, as the
paper counts: about the same ranks, half the bytes); partial RoPE keeps the
d_rope highest-frequency dims of each head rotary (CompressedModel.with_rope_dims)
and absorbs the rest: same ranks, fewer K dims per token. K's rotary part is
either cached beside the latent (the default for partial RoPE, "K cached")
or rebuilt from it at every step ("K rebuilt"; full RoPE always rebuilds).

Byte model per token and layer (what vLLM allocates):
  uncompressed bf16: 2 (K, V) x H_kv x d x 2 bytes
  QSVD:              r x bits / 8 code bytes + 4 (fp32 scale), inline,
                     + 2 x H_kv x d_rope (fp16 rotary keys) when K is cached
Operation model per cached token, layer and decode step (attention only):
  uncompressed: 2 x H x d multiply-adds read from K and V (4 x H x d bytes)
  QSVD:         K rebuilt: 2 x r x d_rope x H_kv to rebuild K's rotary part;
                K cached: H x d_rope against its 2 x H_kv x d_rope bytes;
                then r x H (absorbed scores against q_lat) and r x H (latent V sums)
Loads, each engine's tokens/s = generated tokens / wall time (prefill
included), the median of --passes x --repeats rounds (each pass runs every
engine once, --repeats rounds after a warm-up round; every other pass in
reverse order, so a slow spell of a shared machine spreads over engines):
  batch:         --batch prompts of --prompt tokens, --new new tokens each,
                 under VLLM_CPU_KVCACHE_SPACE = --kv-space-gib (all fit);
  over capacity: --batch requests of --max-model-len tokens each
                 (--long-new of them generated) under a KV budget of
                 --budget-mib MiB, which holds fewer such sequences
                 uncompressed than QSVD: the uncompressed engine queues or
                 preempts, QSVD batches them all.
Reported, each as vLLM reports it: blocks x block_size = tokens that fit
and the most concurrent sequences of max_model_len tokens.

The split of a round's time: after the timed rounds, each pass runs the
load once more with max_tokens = 1 (the prefills and one token: "prefill
s", the median over passes). The decode phase's tokens/s is then
requests x (new - 1) / (round - prefill), from the two medians: where the
capacity win can show. Both engines prefill the same tokens, but an engine
that preempts a sequence under the KV budget recomputes its prefill within
the full round (the prefill-only round never preempts), and that time
counts in its decode phase.
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
    p.add_argument("--passes", type=int, default=2,
                   help="sweeps over the engines (every other one in reverse order): each engine's time is the "
                        "median of its rounds over all passes, so a slow spell of a shared machine does not land "
                        "on one engine only")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--budget-mib", type=int, default=64, help="the over-capacity load's KV budget")
    p.add_argument("--long-new", type=int, default=64, help="new tokens per over-capacity request")
    p.add_argument("--rope-dims", default="128,64,32,16,0", help="W8A8's d_rope sweep (128: full RoPE)")
    p.add_argument("--w4a4-rope-dims", default="128,32")
    p.add_argument("--rebuilt-rope-dims", default="32",
                   help="W8A8 d_rope values also served with K's rotary part rebuilt (the others: cached)")
    p.add_argument("--loads", default="batch,over_capacity",
                   help="the loads to run; an existing --out file keeps its rows of the others")
    args = p.parse_args(argv)

    import torch

    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations.core import cache_token_bytes
    from qsvd_kernels.integrations import models as M
    from qsvd_kernels.integrations.export import export_vllm

    work = tempfile.mkdtemp(prefix="qsvd-vllm-bench-")
    model, _, _ = M.tiny_llama(seed=0, **GEOMETRY)
    model = model.to(torch.bfloat16)
    model.save_pretrained(os.path.join(work, "hf"))
    model = model.float()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    t0 = time.time()
    comp = qc.Compressor(model, M.random_token_batches(model.config.vocab_size, 32, 64, seed=0), progress=False)
    engines = {"uncompressed bf16": (os.path.join(work, "hf"), None)}
    # W8A8 at R2 = 15 %; W4A4 at R2 = 7.5 %: about the same ranks at half the bits
    # (at 4 bits even full rank is only 12.5 % of the bf16 cache).
    sweeps = {"W8A8": (0.15, args.rope_dims), "W4A4": (0.075, args.w4a4_rope_dims)}
    rebuilt = {int(x) for x in args.rebuilt_rope_dims.split(",") if x}
    for q, (r2, dims) in sweeps.items():
        cm = comp.compress(qc.CompressionConfig(qc.Budget("r2", r2), qc.QuantConfig.parse(q)),
                           qc.causal_lm_fisher_loss())
        for d_rope in (int(x) for x in dims.split(",") if x):
            art, out = os.path.join(work, f"art-{q}-{d_rope}"), os.path.join(work, f"vllm-{q}-{d_rope}")
            partial = cm if d_rope == d else cm.with_rope_dims(d_rope)
            partial.save(art)
            export_vllm(os.path.join(work, "hf"), art, out)
            forms = ["auto"] + (["rebuilt"] if q == "W8A8" and d_rope in rebuilt and 0 < d_rope < d else [])
            for form in forms:
                specs = [l.spec() for l in partial.layers]
                k = ("" if d_rope in (0, d) else " K rebuilt" if form == "rebuilt" else " K cached")
                engines[f"QSVD {q} d_rope {d_rope}{k}"] = (out, {
                    "quant": q, "d_rope": d_rope, "ranks": cm.ranks, "rope_key_cache": form,
                    "bytes_per_token": sum(cache_token_bytes(s, form) for s in specs)})
    compress_s = time.time() - t0

    g = torch.Generator().manual_seed(1)
    loads = {
        "batch": dict(prompts=[torch.randint(1, 256, (args.prompt,), generator=g).tolist()
                               for _ in range(args.batch)], new=args.new, kv_bytes=None),
        "over_capacity": dict(prompts=[torch.randint(1, 256, (args.max_model_len - args.long_new,), generator=g)
                                       .tolist() for _ in range(args.batch)], new=args.long_new,
                              kv_bytes=args.budget_mib * 2**20),
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gib))
    kv_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d * 2  # bf16 K and V
    rows = []
    loads_run = args.loads.split(",")
    for load in loads_run:
        L = loads[load]
        budget = L["kv_bytes"] or args.kv_space_gib * 2**30
        # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override kv_cache_memory_bytes: unset it for a budget
        load_env = {k: v for k, v in env.items() if not (L["kv_bytes"] and k == "VLLM_CPU_KVCACHE_SPACE")}
        times, runs = {name: [] for name in engines}, {}
        prefill = {name: [] for name in engines}
        for pass_ in range(args.passes):
            for name in (list(engines) if pass_ % 2 == 0 else list(engines)[::-1]):
                path, info = engines[name]
                # a warm-up round (first-call allocations), then args.repeats timed rounds of the whole load
                res = run_engine({"model": path, "dtype": "bfloat16", "max_model_len": args.max_model_len,
                                  "block_size": 32, "kv_cache_memory_bytes": L["kv_bytes"],
                                  "additional_config": info and {"qsvd": {"rope_key_cache": info["rope_key_cache"]}},
                                  "rounds": [L["prompts"][:2]] + [L["prompts"]] * (args.repeats + 1),
                                  "round_max_tokens": [None] * (1 + args.repeats) + [1],
                                  "max_tokens": L["new"], "enable_prefix_caching": False}, load_env, work)
                times[name] += [r["seconds"] for r in res["rounds"][1:-1]]
                prefill[name].append(res["rounds"][-1]["seconds"])
                runs[name] = res
                print(f"{load} {name} pass {pass_ + 1}: "
                      f"{len(L['prompts']) * L['new'] / sorted(times[name])[len(times[name]) // 2]:.1f} tokens/s "
                      "so far", flush=True)
        for name, (path, info) in engines.items():
            res = runs[name]
            tokens = res["num_blocks"] * res["block_size"]
            per_token = info["bytes_per_token"] if info else kv_bytes
            if tokens * per_token > budget:
                raise RuntimeError(f"{load} {name}: vLLM holds {tokens} tokens of {per_token} B, over the "
                                   f"{budget}-byte budget: the budget was not applied")
            secs_all = sorted(times[name])
            secs = secs_all[len(secs_all) // 2]  # the median round over all passes
            pre = sorted(prefill[name])[len(prefill[name]) // 2]
            rows.append({"load": load, "engine": name, "quant": info and info["quant"],
                         "d_rope": info["d_rope"] if info else d, "bytes_per_token": per_token,
                         "rope_key_cache": info and info["rope_key_cache"],
                         "kv_budget_bytes": budget, "num_blocks": res["num_blocks"],
                         "block_size": res["block_size"], "tokens_that_fit": tokens,
                         "byte_model_tokens": (budget // (res["block_size"] * per_token)) * res["block_size"],
                         "max_concurrent_sequences": tokens // args.max_model_len,
                         "requests": len(L["prompts"]), "request_tokens": len(L["prompts"][0]) + L["new"],
                         "new_tokens": L["new"], "median_seconds": secs, "round_seconds": times[name],
                         "tokens_per_s": len(L["prompts"]) * L["new"] / secs,
                         "prefill_seconds": pre, "prefill_round_seconds": prefill[name],
                         # None where noise made the prefill round the longer
                         "decode_tokens_per_s": len(L["prompts"]) * (L["new"] - 1) / (secs - pre) if secs > pre
                         else None,
                         "ranks": info and info["ranks"], "vllm_version": res["vllm_version"]})
    kept = []
    if args.out and os.path.exists(args.out + ".json"):  # the loads not run this time keep their rows
        with open(args.out + ".json") as f:
            old = json.load(f)
        kept = [dict(r, commit=old.get("commit")) for r in old.get("rows", []) if r.get("load") not in loads_run]
    rows = kept + rows
    for load in {r["load"] for r in rows}:
        base = next(r for r in rows if r["load"] == load and r["quant"] is None)
        for r in rows:
            if r["load"] == load:
                r["capacity_x"] = r["tokens_that_fit"] / base["tokens_that_fit"]
                r["throughput_x"] = r["tokens_per_s"] / base["tokens_per_s"]
                if r.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
                    r["decode_x"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    data = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor() or platform.machine(),
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "geometry": GEOMETRY, "kv_space_gib": args.kv_space_gib,
            "budget_mib": args.budget_mib, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
            "long_new_tokens": args.long_new, "repeats": args.repeats, "passes": args.passes,
            "max_model_len": args.max_model_len,
            "compress_seconds": compress_s, "rows": rows}
    md = [f"# vLLM serving on the CPU: uncompressed vs QSVD ({data['date']}, commit {commit})", "",
          f"vLLM {rows[0]['vllm_version']} offline engine on {data['cpu']} ({os.cpu_count()} CPU cores), bf16, "
          f"block size 32, max_model_len {args.max_model_len}. Model: {GEOMETRY['num_hidden_layers']} LLaMA "
          f"layers, E = {cfg.hidden_size}, {cfg.num_attention_heads} heads of {d} (multi-head K/V), random "
          "weights; QSVD W8A8 at R2 = 15 %, W4A4 at R2 = 7.5 % (bits included); d_rope: rotary dims per head "
          f"({d} = full RoPE; fewer: the highest-frequency pairs rotary, the rest absorbed); K cached / "
          "rebuilt: K's rotary part cached beside the latent (fp16) or rebuilt from it at each step. Produced by "
          "`bench/vllm_serving.py`, whose docstring has the byte and operation model. One run on a shared "
          "machine: ratios within a load are what count.", "",
          f"- **batch**: {args.batch} prompts of {args.prompt} tokens, {args.new} new tokens each, under "
          f"`VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib}` GiB (every engine holds the whole batch).",
          f"- **over_capacity**: {args.batch} requests of {args.max_model_len} tokens "
          f"({args.max_model_len - args.long_new} prompt + {args.long_new} new) under a KV budget of "
          f"{args.budget_mib} MiB (`kv_cache_memory_bytes`): the uncompressed engine holds fewer of them at once "
          "than QSVD.", "",
          *([f"(The {', '.join(dict.fromkeys(r['load'] for r in kept))} rows are from the run at commit "
             f"{kept[0]['commit']}.)", ""] if kept else []),
          "tokens/s: generated tokens over the round's wall time (prefill included), greedy, prefix caching "
          f"off, the median of {args.passes} x {args.repeats} rounds ({args.passes} passes over the engines, every "
          f"other one in reverse order; {args.repeats} rounds after a warm-up round per engine and pass). "
          "`tokens that fit` is vLLM's own "
          "report (blocks x block size); `byte model` is the arithmetic. `prefill s`: the median round of the "
          "same load with max_tokens = 1; `decode phase`: requests x (new - 1) / (round - prefill s), the two "
          "medians (bench/vllm_serving.py's docstring).", "",
          f"| load | engine | ranks | B/token | tokens that fit | byte model | capacity vs uncompressed | max "
          f"concurrent {args.max_model_len}-token sequences | tokens/s | throughput vs uncompressed | prefill s | "
          "decode phase tokens/s | decode phase vs uncompressed |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        split = (f"{r['prefill_seconds']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['decode_x']:.2f}x"
                 if "decode_x" in r else "- | - | -")
        md.append(f"| {r['load']} | {r['engine']} | {r['ranks'] or '-'} | {r['bytes_per_token']} | "
                  f"{r['tokens_that_fit']} | {r['byte_model_tokens']} | {r['capacity_x']:.2f}x | "
                  f"{r['max_concurrent_sequences']} | {r['tokens_per_s']:.1f} | {r['throughput_x']:.2f}x | "
                  f"{split} |")
    write_results(args.out, data, "\n".join(md) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
