"""``python -m qsvd_kernels <command>``: compress, eval, bench, demo, info.

    python -m qsvd_kernels compress --model minilm --budget r2=0.15 --quant W8A8 --out minilm-qsvd
    python -m qsvd_kernels eval --model minilm --artefact minilm-qsvd
    python -m qsvd_kernels bench --hidden 1024 --rank 384 --context 512
    python -m qsvd_kernels demo

Models: ``minilm`` (real all-MiniLM-L6-v2, offline), ``smollm2`` (real
SmolLM2-135M-Instruct, offline), ``tiny-llama`` (small LLaMA with seeded
random weights), or a local Hugging Face model directory.
Errors in the arguments, the model or the artefact print one line and exit 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch


def _parse_rope_dims(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"--rope-dims must be a number of head dims or auto, got {text!r}") from None


def _parse_budget(text: str):
    from .compress import Budget

    kind, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--budget must look like r2=0.3, r1=0.5 or mean_rank=128, got {text!r}")
    value = value.strip()
    v = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    return Budget(kind.strip().lower(), v)


def cmd_compress(args, out=print) -> int:
    from . import compress as qc
    from .integrations import models as M
    from .integrations import sentence as S

    model, tok, kind = M.load_model(args.model, args.seed)
    sentences = None
    if args.calib_file:
        with open(args.calib_file, encoding="utf-8") as f:
            sentences = [l.strip() for l in f if l.strip()]
        if len(sentences) < 32:
            raise ValueError(f"--calib-file has {len(sentences)} samples; at least 32 are needed")
    n = args.calib_samples if args.calib_samples is not None else (None if kind == "causal_lm" and tok else 256)
    seq_len = args.seq_len if args.seq_len is not None else (256 if kind == "causal_lm" and tok else 64)
    calib, _, calib_info = M.calibration_data(model, tok, kind, n, seq_len=seq_len, seed=args.seed,
                                              sentences=sentences)
    quant = qc.QuantConfig.parse(args.quant)
    budget = _parse_budget(args.budget)
    config = qc.CompressionConfig(budget, quant, whitening=args.whitening, allocation=args.allocation,
                                  align=args.align, seed=args.seed, latent=args.latent,
                                  rope_dims=_parse_rope_dims(args.rope_dims), rope_tolerance=args.rope_tolerance)
    loss = qc.random_projection_loss(S.pooled_embedding, args.seed) if args.model == "minilm" else \
        M.default_loss(kind, args.seed)
    t0 = time.time()
    cm = qc.compress_model(model, calib, config, loss_fn=loss if args.allocation == "qsvd" else None,
                           progress=not args.quiet)
    cm.info["model"] = {"name": args.model, "kind": kind, "class": type(model).__name__}
    cm.info["calibration"] = calib_info
    cm.save(args.out)
    plot = qc.plot_allocation(cm, os.path.join(args.out, "ranks.png"))
    a = cm.info["achieved"]
    out(f"compressed {len(cm.layers)} attention layers of {args.model} in {time.time() - t0:.1f} s -> {args.out}")
    choice = cm.info.get("latent_choice")
    out(f"  latent form {cm.info['latent_form']}" + (
        f" (chosen by {choice['metric']} on {choice['batches']} calibration batches: "
        + ", ".join(f"{f} {v:.4g}" for f, v in choice["measured"].items()) + ")" if choice else ""))
    out(f"  ranks {cm.ranks}")
    out(f"  betas {cm.betas}")
    out(f"  R1 {a['r1']:.1%}  R2 {a['r2']:.1%}  ({quant.name}; R1/R2 as in the paper, bits included)")
    out(f"  KV cache {a['cache_bytes_per_token']:.0f} B/token vs fp16 {a['original_cache_bytes_per_token_fp16']} B/token")
    out(f"  plot {plot}")
    return 0


def _sentence_eval(model, tok, cm, backend, sentences):
    from .integrations import hf
    from .integrations import sentence as S

    ref = S.embed(model, tok, sentences)
    m2 = hf.apply_qsvd(copy.deepcopy(model), cm, backend=backend)
    return S.fidelity(ref, S.embed(m2, tok, sentences))


def _causal_eval(model, cm, backend, windows, new_tokens=16):
    """Perplexity of both models on the held-out windows, next-token
    agreement and KL against the original, greedy generation from the first
    window's first 8 tokens, and the latent cache's bytes per token."""
    from .integrations import causal_lm as C
    from .integrations import hf

    m2 = hf.apply_qsvd(copy.deepcopy(model), cm, backend=backend)
    res = C.compare(model, m2, windows)
    with torch.no_grad():
        prompt = windows[:1, :8]
        ref = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(prompt))
        got, cache = hf.generate(m2, prompt, max_new_tokens=new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(prompt))
    res.update({"greedy_match": float((got[0, 8:] == ref[0, 8:]).float().mean()),
                "cache_bytes_per_token": cache.token_nbytes(), "fp16_kv_bytes_per_token": cache.fp16_kv_token_nbytes()})
    res["kv_bytes_ratio"] = res["fp16_kv_bytes_per_token"] / res["cache_bytes_per_token"]
    return res


def _backend_for(cm, requested):
    if requested != "auto":
        return requested
    q = cm.layers[0].quant
    return "ops" if max(q.w_bits, q.a_bits, q.latent_bits) < 16 else "torch"


def cmd_eval(args, out=print) -> int:
    from .compress import CompressedModel
    from .integrations import models as M

    cm = CompressedModel.load(args.artefact)
    model, tok, kind = M.load_model(args.model, args.seed)
    calib_info = cm.info.get("calibration", {})
    backend = _backend_for(cm, args.backend)
    if kind == "causal_lm" and tok is not None:  # held-out text: another corpus than the calibration sentences
        from .integrations import causal_lm as C

        windows, text = C.heldout_windows(tok, args.eval_windows, args.window_length)
        res = {"heldout": text, **_causal_eval(model, cm, backend, windows)}
    else:
        _, held_out, _ = M.calibration_data(model, tok, kind, calib_info.get("n", 256) if tok is not None else 32,
                                            seq_len=calib_info.get("seq_len", 64), seed=calib_info.get("seed", 0))
        if kind == "encoder":
            res = _sentence_eval(model, tok, cm, backend, held_out[: args.eval_samples])
        else:  # random tokens (tiny-llama): held-out sequences of another seed
            res = _causal_eval(model, cm, backend, torch.cat([b["input_ids"] for b in held_out]))
    a = cm.info.get("achieved", {})
    res.update({"r1": a.get("r1"), "r2": a.get("r2"), "ranks": cm.ranks, "backend": backend,
                "latent_form": cm.info.get("latent_form", "qkv"),
                "weight_bytes": a.get("weight_bytes"), "original_weight_bytes_fp16": a.get("original_weight_bytes_fp16")})
    out(json.dumps(res, indent=1))
    return 0


def cmd_bench(args, out=print) -> int:
    from .bench_layer import bench_decode_layer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    res = bench_decode_layer(hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads or args.heads, rank=args.rank,
                             context=args.context, batch=args.batch, quant=args.quant, device=device,
                             steps=args.steps)
    out(json.dumps(res, indent=1))
    return 0


def cmd_demo(args, out=print) -> int:
    from .demo import run_demo

    report = run_demo(out=out, plot_dir=args.out)
    return 1 if report["failures"] else 0


def cmd_info(args, out=print) -> int:
    from . import build_info

    out(json.dumps(build_info(), indent=2))
    return 0


def cmd_export(args, out=print) -> int:
    from .integrations.export import export_vllm

    qsvd = export_vllm(args.model, args.artefact, args.out)
    bits = sorted({f"W{q['w_bits']}A{q['a_bits']} latent {q['latent_bits']}" for q in qsvd["quant"]})
    out(f"exported {qsvd['base_architecture']} with {len(qsvd['ranks'])} QSVD layers ({', '.join(bits)}; ranks "
        f"{qsvd['ranks']}) -> {args.out}")
    out(f"serve it: vllm serve {args.out}   (needs pip install 'qsvd-kernels[vllm]')")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="python -m qsvd_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model's attention into an artefact")
    c.add_argument("--model", required=True,
                   help="minilm, smollm2, tiny-llama, or a local Hugging Face model directory")
    c.add_argument("--out", required=True, help="artefact directory to write")
    c.add_argument("--budget", default="r2=0.15",
                   help="r1=F, r2=F (fractions or percents; bits included, as the paper counts) or mean_rank=N")
    c.add_argument("--quant", default="W8A8", help="fp, W8A8, W8A4, W4A4, or with the latent's width: W8A8L4")
    c.add_argument("--allocation", default="qsvd", choices=["qsvd", "uniform"])
    c.add_argument("--whitening", default="cholesky", choices=["cholesky", "diag", "none"])
    c.add_argument("--latent", default="auto", choices=["auto", "qkv", "kv"],
                   help="latent form: qkv (the paper's joint latent), kv (q from its own projection), or auto "
                        "(both; the one closer to the original on calibration data)")
    c.add_argument("--rope-dims", default=None,
                   help="partial RoPE: rotary head dims kept per layer (the highest-frequency ones; the rest are "
                        "absorbed), or auto (the fewest of d, d/2, d/4, d/8, 0 within --rope-tolerance of full "
                        "RoPE's calibration perplexity); default: full RoPE")
    c.add_argument("--rope-tolerance", type=float, default=0.03, help="relative perplexity for --rope-dims auto")
    c.add_argument("--align", type=int, default=16)
    c.add_argument("--calib-samples", type=int, default=None,
                   help="calibration sentences (default: 256 for encoders, all for causal LMs)")
    c.add_argument("--calib-file", help="text file, one calibration sample per line (default: built-in sentences)")
    c.add_argument("--seq-len", type=int, default=None,
                   help="calibration context length in tokens (default: 256 for causal LMs with a tokenizer, "
                        "64 for random-token models)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="fidelity and size of an artefact against its original model")
    e.add_argument("--model", required=True)
    e.add_argument("--artefact", required=True)
    e.add_argument("--backend", default="auto", choices=["auto", "ops", "torch"])
    e.add_argument("--eval-samples", type=int, default=384, help="held-out sentences (encoders)")
    e.add_argument("--eval-windows", type=int, default=32, help="held-out text windows (causal LMs)")
    e.add_argument("--window-length", type=int, default=256, help="tokens per held-out window (causal LMs)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="one compressed layer's decode step against the fp16 layer")
    b.add_argument("--hidden", type=int, default=1024)
    b.add_argument("--heads", type=int, default=16)
    b.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention)")
    b.add_argument("--rank", type=int, default=384)
    b.add_argument("--context", type=int, default=512)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--quant", default="W8A8")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("demo", help="the offline demo: MiniLM compression + tiny LLaMA generation")
    d.add_argument("--out", default="qsvd_demo", help="where to write the rank-allocation plot")
    d.set_defaults(fn=cmd_demo)

    x = sub.add_parser("export", help="write a model directory a serving engine runs (vLLM)")
    x.add_argument("--format", required=True, choices=["vllm"])
    x.add_argument("--model", required=True, help="the original Hugging Face model directory")
    x.add_argument("--artefact", required=True, help="its qsvd artefact (python -m qsvd_kernels compress)")
    x.add_argument("--out", required=True, help="new directory to write (refused if it exists and is not empty)")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("info", help="what this installation was built with (JSON)")
    i.set_defaults(fn=cmd_info)

    # tune: options and implementation in qsvd_kernels/tuning/tune.py (docs/tuning.md).
    sub.add_parser("tune", help="time quant_gemm configs on this GPU and write a tuning table", add_help=False)
    return p


def artefact_gemm_args(argv: list) -> list:
    """``tune --artefact DIR [--tokens 1,16,512]``: the quant_gemm shapes and
    bit pairs of a compressed model's layers, as ``--shapes`` / ``--bits``
    (the tuner sits below the compression layer and does not read artefacts).
    Per layer and token count M: the down-projection x -> c (N = r, K = E,
    activation x weight bits) and the query up-projection c -> q (N = E_q,
    K = r, latent x weight bits)."""
    if "--artefact" not in argv:
        return argv
    from .compress.artefact import CompressedModel

    argv = list(argv)
    i = argv.index("--artefact")
    if i + 1 >= len(argv):
        raise ValueError("--artefact needs a directory")
    directory = argv[i + 1]
    del argv[i : i + 2]
    tokens = "1,16,512"
    if "--tokens" in argv:
        j = argv.index("--tokens")
        tokens = argv[j + 1] if j + 1 < len(argv) else ""
        del argv[j : j + 2]
    ms = [int(t) for t in tokens.split(",") if t.strip()]
    if not ms or min(ms) < 1:
        raise ValueError(f"--tokens must be positive token counts, got {tokens!r}")
    cm = CompressedModel.load(directory)
    shapes, bits = [], []
    for layer in cm.layers:
        q, d = layer.quant, layer.dims
        if not (q.w_bits < 16 and q.a_bits < 16 and q.latent_bits < 16):
            raise ValueError(f"{directory}: layer quantization {q.name} does not run on quant_gemm")
        for m in ms:
            shapes += [(m, layer.rank, d.hidden), (m, d.q_dim, layer.rank)]
        bits += [(q.a_bits, q.w_bits), (q.latent_bits, q.w_bits)]
    if "--shapes" not in argv:
        argv += ["--shapes", ",".join(f"{m}x{n}x{k}" for m, n, k in dict.fromkeys(shapes))]
    if "--bits" not in argv:
        for a, b in dict.fromkeys(bits):
            argv += ["--bits", f"{a},{b}"]
    return argv


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:  # its own argument parser
        from .tuning.tune import main as tune_main

        try:
            return tune_main(artefact_gemm_args(argv[1:]))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, ImportError, NotImplementedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
