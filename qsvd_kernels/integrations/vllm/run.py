"""Run a model directory on vLLM's offline engine and report what happened,
as JSON: the tests and the capacity benchmark start this in a fresh process
per engine (one vLLM engine per process is what vLLM supports).

    python -m qsvd_kernels.integrations.vllm.run SPEC.json OUT.json

SPEC: {"model": dir, "dtype": "float32", "max_model_len": 256, "block_size": 16,
       "max_num_batched_tokens": null, "enable_prefix_caching": true,
       "tensor_parallel_size": 1, "kv_cache_memory_bytes": null, "additional_config": null,
       "rounds": [[prompt token ids, ...], ...],
       "max_tokens": 12, "round_max_tokens": null, "logprobs": null, "timed": false}
      (round_max_tokens: a max_tokens per round, overriding max_tokens; e.g. 1
      for a round that times the prefill alone)

OUT: {"rounds": [{"tokens": [[...], ...], "num_cached_tokens": [...], "seconds": s,
                  "logprobs": [[{token id: logprob, ...} per step] per prompt]  (with "logprobs": k)}],
      "num_blocks": n, "block_size": b, "kv_bytes_per_block": p,
      "max_concurrency": c, "vllm_version": v}
"""

from __future__ import annotations

import json
import sys
import time


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True,
              max_model_len=spec.get("max_model_len", 256), skip_tokenizer_init=True,
              enable_prefix_caching=spec.get("enable_prefix_caching", True),
              tensor_parallel_size=spec.get("tensor_parallel_size", 1), seed=0)
    if spec.get("block_size"):
        kw["block_size"] = spec["block_size"]
    if spec.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
        kw["enable_chunked_prefill"] = True
    if spec.get("kv_cache_memory_bytes"):  # a KV budget in bytes (else VLLM_CPU_KVCACHE_SPACE's GiB)
        kw["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
    if spec.get("additional_config"):  # e.g. {"qsvd": {"rope_key_cache": "rebuilt"}}
        kw["additional_config"] = spec["additional_config"]
    if spec.get("max_num_seqs"):
        kw["max_num_seqs"] = spec["max_num_seqs"]
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 12), ignore_eos=True,
                            logprobs=spec.get("logprobs"))
    per_round = spec.get("round_max_tokens") or [None] * len(spec["rounds"])
    if len(per_round) != len(spec["rounds"]):
        raise ValueError(f"round_max_tokens has {len(per_round)} entries for {len(spec['rounds'])} rounds")
    out = {"rounds": []}
    for prompts, n in zip(spec["rounds"], per_round):
        sp = params if n is None else SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                    logprobs=spec.get("logprobs"))
        t0 = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        out["rounds"].append({"tokens": [list(r.outputs[0].token_ids) for r in res],
                              "num_cached_tokens": [r.num_cached_tokens or 0 for r in res], "seconds": dt})
        if spec.get("logprobs") is not None:  # the model's log-softmax: the top k and the sampled token per step
            out["rounds"][-1]["logprobs"] = [[{str(t): lp.logprob for t, lp in step.items()}
                                              for step in r.outputs[0].logprobs] for r in res]
    cfg = llm.llm_engine.vllm_config
    out["num_blocks"] = cfg.cache_config.num_gpu_blocks
    out["block_size"] = cfg.cache_config.block_size
    out["max_model_len"] = cfg.model_config.max_model_len
    import vllm

    out["vllm_version"] = vllm.__version__
    with open(argv[1], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
