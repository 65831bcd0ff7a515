"""How much position a training-free partial RoPE loses, before any kernel:
SmolLM2-135M (uncompressed) held-out perplexity when only ``d_rope`` of each
head's ``d`` dims rotate and the other pairs are position-free (their rows of
the model's own rotary tables set to cos 1, sin 0, for q and k alike), for
two choices of the rotary pairs:

- highest frequency: pairs 0 .. d_rope/2 - 1 (rotate-half layout);
- 2-norm: the pairs with the largest mean |q_pair| |k_pair| over calibration
  tokens, summed over layers and heads (MHA2MLA's score, one global choice).

Issue 22's perplexity goal is 3 % at d_rope = d/4 (there on the QSVD model).

    python bench/partial_rope_probe.py     # -> bench/results/partial_rope_probe.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from cpu_rows import cpu_model  # noqa: E402


def pair_scores(model, windows) -> torch.Tensor:
    """sum over layers and heads of mean_t |q_pair| |k_pair| (pre-RoPE), [d/2]."""
    cfg = model.config
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    half = d // 2
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda m, inp, out, key=(name, i): seen.__setitem__(key, out)))
    try:
        with torch.no_grad():
            model(windows)
    finally:
        for h in hooks:
            h.remove()
    score = torch.zeros(half, dtype=torch.float64)
    for i in range(len(model.model.layers)):
        q = seen[("q_proj", i)].double().view(*windows.shape, H, d)
        k = seen[("k_proj", i)].double().view(*windows.shape, H_kv, d).repeat_interleave(H // H_kv, dim=2)
        norm = lambda t: (t[..., :half] ** 2 + t[..., half:] ** 2).sqrt().mean(dim=(0, 1))  # noqa: E731
        score += (norm(q) * norm(k)).sum(0)
    return score


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "partial_rope_probe"))
    args = p.parse_args(argv)
    from qsvd_kernels.integrations import causal_lm as C
    from qsvd_kernels.integrations import models as M

    model, tok, _ = M.load_model("smollm2")
    model.eval()
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    half = d // 2
    windows, text = C.heldout_windows(tok, 32, 256)
    score = pair_scores(model, windows[:4])
    rotary = model.model.rotary_emb
    original = rotary.forward

    def rotary_pairs(pairs: torch.Tensor):
        keep = torch.zeros(d, dtype=torch.bool)
        keep[pairs] = True
        keep[pairs + half] = True

        def forward(x, position_ids, *a, **k):
            cos, sin = original(x, position_ids, *a, **k)
            return torch.where(keep, cos, torch.ones_like(cos)), torch.where(keep, sin, torch.zeros_like(sin))

        return forward

    rows, full = [], None
    t0 = time.time()
    for d_rope in (d, d // 2, d // 4, d // 8, 0):
        n = d_rope // 2
        if d_rope in (d, 0):
            choices = {"all" if d_rope else "none": torch.arange(n)}
        else:
            choices = {"highest frequency": torch.arange(n), "2-norm": torch.argsort(score, descending=True)[:n]}
        for how, pairs in choices.items():
            rotary.forward = rotary_pairs(pairs)
            try:
                with torch.no_grad():
                    ppl = C.perplexity(model, windows)
            finally:
                rotary.forward = original
            full = full or ppl
            rows.append({"d_rope": d_rope, "choice": how, "pairs": sorted(pairs.tolist()), "perplexity": ppl,
                         "ratio": ppl / full})
            print(f"d_rope {d_rope:3d} {how:17s} perplexity {ppl:8.3f} ({ppl / full:.4f}x)", flush=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"model": "SmolLM2-135M-Instruct (uncompressed)", "head_dim": d,
            "rope_theta": getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
                "rope_theta"),
            "heldout": {"windows": 32, "length": 256, **text}, "score_windows": 4, "commit": commit,
            "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1)}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    lines = ["# Partial RoPE, training-free: SmolLM2-135M held-out perplexity", "",
             f"Written by `bench/partial_rope_probe.py` at {commit}. The uncompressed model; only `d_rope` of "
             f"d = {d} dims rotate, the other pairs are position-free (cos 1, sin 0 in the model's own tables). "
             "Held-out: causal_lm.heldout_windows(32, 256); the 2-norm score uses the first 4 of them. Not QSVD "
             "yet: the partial form is not implemented (docs/partial-rope.md).", "",
             "| d_rope | rotary pairs | perplexity | vs full RoPE |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['d_rope']} | {r['choice']} | {r['perplexity']:.3f} | {r['ratio']:.4f}x |" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written {args.out}.json / .md")


if __name__ == "__main__":
    main()
