"""The QSVD decoder attention step on torch.ops.qsvd, engine-neutral: what
the Hugging Face block and the vLLM layer both run. Their adapters turn
their engine's metadata into a ``StepMetadata`` and call ``run``; they add
nothing to the arithmetic.

Per step, for N new token rows ``x`` [N, E] (any mix of prefills, chunks of
prefills, decodes and padding rows):

1. ``project(x)``: x codes = hadamard_quant(x) (H1, per-token
   quantization), c = x W_d (quant_gemm, fp32 [N, r]);
2. ``store``: latent_cache_append writes each real row's quantized c at its
   slot of the paged cache (padding rows have slot -1), and reads the rows
   back when q is made from them; with partial RoPE's cached form, K's
   rotary part of those rows is written beside them (latent_rope_keys_append,
   ``LatentCache.rope_keys``), so no later step rebuilds it;
3. ``queries``: q, fp32 [N, H d] (plus b_q): in the "qkv" latent form from
   the *cached* rows (queries see exactly what later steps' keys are made
   of), in the "kv" form from x's codes with W_q (the same activation codes
   as c; q is never cached); then rotated at each row's position;
4. attention over the cache: a sequence with one new row is decoded by
   ``latent_attention`` (K rebuilt and V absorbed inside the op); the rows of
   a sequence with several are attended causally over its whole context,
   K (rotated) and V rebuilt by ``latent_reconstruct_kv`` for this call only
   (prefill, chunked prefill, prefix-cache hits). The V bias is added once,
   after attention (softmax weights sum to 1). Padding rows give zeros.

A cache is ``LatentCache(codes, scale, rope_keys)``: separate codes and fp32
scales, or packed rows (``scale`` None; docs/ops.md "The latent cache
layouts"), and the rotary keys when the layer caches them
(``rope_keys_cached``: the byte and operation model is there).
The operands are read by name from ``operands`` (a module holding them as
buffers or parameters, laid out as model.layer_tensors says), at every
call, so moving or loading them needs nothing from the core.

``run`` is written once over the primitives (``project``, ``store``,
``queries``, ``decode``, ``keys_values``); the Hugging Face integration's
plain-PyTorch simulation (hf/projector.py) provides the same primitives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .. import formats, ops
from .. import reference as R
from ..model.layer_tensors import QSVDLayerSpec


# A K bias adds q.b_k to every score, which cancels in softmax without RoPE;
# under RoPE, q.R(b_k) depends on the key's position, which latent_attention
# does not model. Export, the Hugging Face ops backend and the vLLM layer
# refuse it through refuse_k_bias.
K_BIAS_UNDER_ROPE = ("a K bias under RoPE is position-dependent after rotation, which latent_attention does not "
                     "model")


def has_nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool((t != 0).any())


def refuse_k_bias(bk: torch.Tensor | None, where: str, error: type[Exception] = ValueError, hint: str = "") -> None:
    """Raise ``error`` naming ``where`` when ``bk`` (a layer's K bias, under
    RoPE) has a nonzero entry; a zero bias changes nothing and passes."""
    if has_nonzero(bk):
        raise error(f"{where}: {K_BIAS_UNDER_ROPE}" + (f"; {hint}" if hint else ""))


class LatentCache(NamedTuple):
    codes: torch.Tensor  # [num_blocks, block_size, row bytes] (separate) or [.., row bytes + 4] uint8 (packed)
    scale: torch.Tensor | None  # [num_blocks, block_size] fp32, or None for packed rows
    # [num_blocks, block_size, H_kv, d_rope] fp16: K's rotary part per cached
    # token, for a layer that caches it (rope_keys_cached), else None
    rope_keys: torch.Tensor | None = None


ROPE_KEY_CACHE_CHOICES = ("auto", "cached", "rebuilt")


def check_rope_key_cache(rope_key_cache: str) -> None:
    if rope_key_cache not in ROPE_KEY_CACHE_CHOICES:
        raise ValueError(f"rope_key_cache must be one of {ROPE_KEY_CACHE_CHOICES}, got {rope_key_cache!r}")


def rope_keys_cached(spec: QSVDLayerSpec, rope_key_cache: str = "auto") -> bool:
    """Whether a layer keeps K's rotary part in the cache beside the latent.

    Per cached token and kv head, rebuilding it costs ``2 r d_rope``
    operations at every decode step (RoPE(c W_uk[:, :d_rope]) cannot be
    absorbed); caching it costs ``2 d_rope`` bytes (fp16), written once and
    read at every step: r operations per byte read. For the ranks QSVD keeps
    (hundreds to thousands) that is at or above a CPU's or GPU's ratio of
    compute to memory bandwidth, so reading is the cheaper way, and "auto"
    caches it whenever the layer has partial RoPE (0 < d_rope < d), trading
    capacity (docs/partial-rope.md has the table; measured there). The
    keys are fp16: a key past its range is refused by the append, naming
    "rebuilt" as the way out. Full RoPE rebuilds:
    caching all of K's dims would store K itself (2 H_kv d bytes per token,
    more than the latent it was compressed to), and keeps the exact form's
    tokens. "cached" / "rebuilt" force a form (a layer without rotary dims has
    nothing to cache)."""
    check_rope_key_cache(rope_key_cache)
    if rope_key_cache == "auto":
        return 0 < spec.d_rope < spec.head_dim
    if rope_key_cache == "cached" and spec.d_rope == 0:
        raise ValueError("rope_key_cache='cached': this layer has no rotary dims (d_rope 0), so K has no rotary "
                         "part to cache")
    return rope_key_cache == "cached"


def rope_key_bytes(spec: QSVDLayerSpec) -> int:
    """Bytes per token of a layer's cached rotary keys (fp16, its kv heads)."""
    return 2 * spec.num_kv_heads * spec.d_rope


def cache_token_bytes(spec: QSVDLayerSpec, rope_key_cache: str = "auto") -> int:
    """A layer's cache bytes per token: the packed latent row (codes and fp32
    scale), plus the rotary keys where they are cached."""
    return spec.cache_row_bytes + (rope_key_bytes(spec) if rope_keys_cached(spec, rope_key_cache) else 0)


class Projection(NamedTuple):
    c: torch.Tensor  # [N, r] fp32, the latent before quantization
    x_codes: torch.Tensor  # x's activation codes (quant_gemm a operand)
    x_scale: torch.Tensor  # [N] fp32


@dataclass
class StepMetadata:
    """One step's rows and sequences, made once per step by the engine's
    adapter and reused by every layer (as FlashInfer's plan)."""

    slots: torch.Tensor  # [N] int64: each row's cache slot; -1: a padding row (not stored, output zero)
    positions: torch.Tensor  # [N] int64: each row's index in its sequence (its RoPE position)
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: each sequence's cached tokens, this step's included
    decode_rows: torch.Tensor  # [n] int64: rows that are their sequence's only new token
    decode_seqs: torch.Tensor  # [n] int64: those sequences
    # (sequence, its rows in position order [n_i] int64, sequence length L_i) of the
    # sequences with several new rows: host values, as their K/V sizes depend on them
    prefills: list[tuple[int, torch.Tensor, int]]
    # latent_attention plans of this step's decode batch, one per layer shape
    # (the layers of a QSVD model differ in rank): made by the first layer of
    # each shape, run by the others (FlashInfer's plan/run)
    plans: dict = field(default_factory=dict)


def step_metadata(slots: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  rows_of_seq: list, seq_lens_host: list[int]) -> StepMetadata:
    """``StepMetadata`` from each sequence's new rows (host: ``rows_of_seq[b]``,
    a range or list of row indices in position order) and host sequence
    lengths (read for sequences with several new rows only)."""
    dev = slots.device
    dec = [b for b, rows in enumerate(rows_of_seq) if len(rows) == 1]
    return StepMetadata(
        slots, positions, block_table, seq_lens,
        decode_rows=torch.tensor([rows_of_seq[b][0] for b in dec], dtype=torch.long, device=dev),
        decode_seqs=torch.tensor(dec, dtype=torch.long, device=dev),
        prefills=[(b, torch.as_tensor(list(rows), dtype=torch.long, device=dev), int(seq_lens_host[b]))
                  for b, rows in enumerate(rows_of_seq) if len(rows) > 1])


class AttentionStep:
    """``run``: the step over the primitives a subclass provides (module
    docstring). ``fused_decode`` False: ``decode`` is not offered, and
    decoded sequences take the prefill path."""

    spec: QSVDLayerSpec
    fused_decode = True

    def run(self, proj, cache, meta: StepMetadata, rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None,
            sm_scale: float, q: torch.Tensor | None = None, layer_tables: bool = False,
            prefill_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Store the step's latents and attend: out fp32 [N, H, d], zero at
        padding rows. ``rope_cos``/``rope_sin`` [max_len, d] fp32 hold row t =
        position t (the model's rotate-half tables; a layer with partial RoPE
        takes its pairs' columns); ``layer_tables``: they are already this
        layer's (``layer_rope_tables``, None without rotary pairs), as an
        engine with fixed tables selects them once. ``q`` [N, H d] may be
        given already made ("kv" form: an engine that projects outside its
        attention op). ``prefill_dtype``: the arithmetic of the prefill
        rows' attention (``causal_attention``): fp32, or the model's bf16 /
        fp16, as the engine's own attention computes them."""
        s = self.spec
        N = meta.slots.shape[0]
        rows = self.store(proj, meta.slots, cache)
        if q is None:
            q = self.queries(proj, rows)
        # This layer's tables: partial RoPE rotates its rotary pairs only (laid
        # out first in q and k); no pairs: no rotation, K absorbed.
        if not layer_tables:
            rope_cos, rope_sin = self.layer_rope_tables(rope_cos, rope_sin)
        self.store_rope_keys(cache, meta, rope_cos, rope_sin)
        q = q.reshape(N, s.num_heads, s.head_dim)
        if rope_cos is not None:
            pos = meta.positions.clamp(min=0)
            q = R.apply_rope_ref(q, rope_cos[pos][:, None], rope_sin[pos][:, None])
        out = q.new_zeros(N, s.num_heads, s.head_dim)
        prefills = meta.prefills
        if meta.decode_rows.numel():
            if self.fused_decode:
                seqs = meta.decode_seqs
                out[meta.decode_rows] = self.decode(q[meta.decode_rows], cache, meta.block_table[seqs],
                                                    meta.seq_lens[seqs], rope_cos, rope_sin, sm_scale, meta.plans)
            else:
                lens = meta.seq_lens[meta.decode_seqs].tolist()
                prefills = prefills + [(int(b), r.view(1), int(n)) for b, r, n in
                                       zip(meta.decode_seqs.tolist(), meta.decode_rows, lens)]
        if prefills:
            self._prefill(q, cache, meta, prefills, rope_cos, rope_sin, sm_scale, out, prefill_dtype)
        return out

    def layer_rope_tables(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        """The model's tables restricted to this layer's rotary pairs
        (reference.select_rope_pairs: (None, None) without any)."""
        return R.select_rope_pairs(rope_cos, rope_sin, self.spec.rope_pairs)

    def store_rope_keys(self, cache, meta: StepMetadata, rope_cos, rope_sin) -> None:
        """Write the rotary keys of the step's stored rows (a layer that caches
        them, ``rope_keys_cached``); nothing otherwise."""

    def _prefill(self, q, cache, meta: StepMetadata, prefills, rope_cos, rope_sin, sm_scale, out,
                 dtype: torch.dtype = torch.float32) -> None:
        """Each listed sequence's new rows attend causally over its whole
        context (cached prefix + these rows: the last n of its L tokens)."""
        seqs = torch.tensor([p[0] for p in prefills], dtype=torch.long, device=q.device)
        k, v = self.keys_values(cache, meta.block_table[seqs], meta.seq_lens[seqs], rope_cos, rope_sin,
                                attention_dtype(q.device, dtype))
        start = 0
        for _, rows, L in prefills:
            K, V = k[start : start + L].transpose(0, 1), v[start : start + L].transpose(0, 1)  # [H_kv, L, d]
            start += L
            out[rows] = causal_attention(q[rows].transpose(0, 1), K, V, sm_scale, dtype).transpose(0, 1)


# Query rows per step of the CPU's low-precision causal attention: a step's
# scores [H, C, keys] stay a few MiB, and the keys past its last row are never
# multiplied (C = 192 measured best of 64..320 at n = L = 960, bf16, 8 heads
# of 128, on the 2-core AMD EPYC of bench/results).
CAUSAL_CHUNK_ROWS = 192


def attention_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The arithmetic ``causal_attention`` runs for a requested ``dtype``:
    bf16, fp16 (on CUDA; on the CPU fp16 runs in fp32: no fp16 GEMM is
    assumed there), else fp32."""
    if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type != "cpu"):
        return dtype
    return torch.float32


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(sm_scale q k^T + causal) v for one sequence's n new rows over
    its L keys, lower-right causal (row i sees keys <= L - n + i): fp32
    [H, n, d] from q fp32 [H, n, d] and k, v [H_kv, L, d] (GQA: query head h
    reads kv head h // (H / H_kv)).

    ``dtype`` is the arithmetic. fp32: SDPA in fp32. bf16 / fp16: q (on the
    CPU, q sm_scale), k and v rounded to it, as a bf16 / fp16 model's own
    attention reads them;
    on CUDA SDPA's fused kernels in that dtype; on the CPU, bf16 runs as
    chunks of GEMMs on torch's bf16 GEMM (oneDNN: AVX-512 BF16 or AMX), the
    scores rounded to bf16 and softmax accumulated in fp32: 0.45x the time
    of torch's CPU SDPA on the same bf16 data (7.4 against 16.3 ms at
    n = L = 960, 8 heads of 128, 2-core AMD EPYC; SDPA's CPU kernel converts
    bf16 to fp32 and runs at its fp32 speed; bench/test_bench_prefill.py,
    bench/results/prefill_attention.md). fp16 on the CPU computes in fp32 (no fp16
    GEMM is assumed there). The error bound: ``testing.causal_attention_bound``."""
    H, n, d = q.shape
    H_kv, L = k.shape[:2]
    if L < n:
        raise ValueError(f"causal_attention: {n} new rows but only {L} keys (the rows are the last n of the keys)")
    rep = H // H_kv
    dtype = attention_dtype(q.device, dtype)
    if dtype == torch.float32 or q.device.type != "cpu":
        K, V = k.to(dtype).repeat_interleave(rep, 0), v.to(dtype).repeat_interleave(rep, 0)
        # SDPA's lower-right causal bias keeps its fused kernels (an explicit
        # mask costs 1.5x at n = L = 960 on the CPU)
        return F.scaled_dot_product_attention(q.to(dtype)[None], K[None], V[None], attn_mask=causal_lower_right(n, L),
                                              scale=sm_scale)[0].float()
    # query heads grouped by their kv head: one GEMM per kv head and chunk, no K/V copies per query head
    qs = (q.float() * sm_scale).to(dtype).view(H_kv, rep, n, d)
    kt, vv = k.to(dtype).transpose(1, 2), v.to(dtype)  # [H_kv, d, L], [H_kv, L, d]
    out = torch.empty(H_kv, rep, n, d, dtype=dtype, device=q.device)
    off = L - n
    for s in range(0, n, CAUSAL_CHUNK_ROWS):
        e = min(n, s + CAUSAL_CHUNK_ROWS)
        last = off + e  # rows s..e-1 see keys [0, off + row]: none past off + e - 1
        scores = torch.bmm(qs[:, :, s:e].reshape(H_kv, rep * (e - s), d), kt[:, :, :last])
        scores = scores.view(H_kv, rep, e - s, last)
        # the square of keys off + s .. last - 1: key off + s + b is past row s + a when b > a
        scores[..., off + s:].masked_fill_(torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu_(1),
                                          float("-inf"))
        p = torch.softmax(scores, -1)
        out[:, :, s:e] = torch.bmm(p.view(H_kv, rep * (e - s), last), vv[:, :last]).view(H_kv, rep, e - s, d)
    return out.view(H, n, d).float()


class QSVDAttentionCore(AttentionStep):
    """One layer's QSVD attention step (module docstring); ``spec`` is the
    layer (this rank's heads), ``operands`` holds its tensors by name.
    ``check_indices`` False: the engine guarantees its slots, block tables
    and lengths (vLLM's are valid by construction), so the CUDA launchers skip
    their host check (a sync per call); the kernels still guard every index."""

    def __init__(self, spec: QSVDLayerSpec, operands, check_indices: bool = True, rope_key_cache: str = "auto"):
        self.spec = spec
        self.operands = operands
        self.check_indices = check_indices
        self.rope_keys_cached = rope_keys_cached(spec, rope_key_cache)

    @property
    def rope_key_bytes(self) -> int:
        """Cache bytes per token for the rotary keys: 0 when they are rebuilt."""
        return rope_key_bytes(self.spec) if self.rope_keys_cached else 0

    def new_rope_keys(self, num_blocks: int, block_size: int, device) -> torch.Tensor | None:
        """Zeroed rotary-key storage for a pool of ``num_blocks`` blocks, or
        None when this layer rebuilds them."""
        if not self.rope_keys_cached:
            return None
        s = self.spec
        return torch.zeros(num_blocks, block_size, s.num_kv_heads, s.d_rope, dtype=torch.float16, device=device)

    def _rope_keys(self, cache: LatentCache) -> torch.Tensor | None:
        """The cache's rotary keys, checked against this layer's form: never
        a rebuild where keys were expected, nor stale keys read."""
        if self.rope_keys_cached and cache.rope_keys is None:
            raise ValueError("this layer caches K's rotary part (rope_keys_cached): the cache has no rope_keys")
        if not self.rope_keys_cached and cache.rope_keys is not None:
            raise ValueError("this layer rebuilds K's rotary part: a cache with rope_keys would never be written")
        return cache.rope_keys

    def _t(self, name: str):
        return getattr(self.operands, name, None)

    # ---------------------------------------------------------------- steps
    def project(self, x2d: torch.Tensor) -> Projection:
        s = self.spec
        codes, scale = ops.hadamard_quant(x2d.contiguous(), s.a_bits, s.a_clip, self._t("signs"))
        c = ops.quant_gemm(codes, scale, self._t("wd"), self._t("wd_scale"), s.a_bits, s.w_bits, torch.float32)
        return Projection(c, codes, scale)

    def append(self, proj: Projection, slots: torch.Tensor, cache: LatentCache) -> None:
        """Quantize the rows of ``proj.c`` whose slot is >= 0 into the cache (in place)."""
        ops.latent_cache_append(proj.c, slots, cache.codes, cache.scale, self.spec.latent_bits,
                                self.spec.latent_clip, self.check_indices)

    def store(self, proj: Projection, slots: torch.Tensor, cache: LatentCache):
        """Append, and return the cached rows when q is made from them ("qkv"
        form), else None. A cache of the other rotary-key form is refused
        before anything is written."""
        self._rope_keys(cache)
        self.append(proj, slots, cache)
        return self.read_rows(cache, slots) if self.queries_need_rows else None

    def store_rope_keys(self, cache: LatentCache, meta: StepMetadata, rope_cos, rope_sin) -> None:
        rope_keys = self._rope_keys(cache)
        if rope_keys is None:
            return
        s = self.spec
        ops.latent_rope_keys_append(cache.codes, cache.scale, meta.slots, meta.positions.clamp(min=0),
                                    self._t("wuk"), self._t("wuk_scale"), s.latent_bits, rope_cos, rope_sin,
                                    rope_keys, self.check_indices)

    def read_rows(self, cache: LatentCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rows at ``slots`` as quant_gemm operands (codes, fp32
        scales); a negative slot (padding) reads a zero scale, so its row is 0."""
        s = self.spec
        if cache.scale is None:
            codes, scale = formats.split_latent_rows(cache.codes.view(-1, cache.codes.shape[-1]), s.latent_bits,
                                                     s.rank)
        else:
            codes, scale = cache.codes.view(-1, cache.codes.shape[-1]), cache.scale.view(-1)
        rows = slots.clamp(min=0)
        got = torch.where(slots >= 0, scale[rows], torch.zeros((), device=scale.device, dtype=scale.dtype))
        return codes[rows].contiguous(), got.contiguous()

    def queries(self, proj: Projection, rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q fp32 [N, H d] (plus b_q), before RoPE: from the cached ``rows``
        ("qkv" form) or from x's codes ("kv" form, which needs no rows)."""
        s = self.spec
        if s.form == "kv":
            return ops.quant_gemm(proj.x_codes, proj.x_scale, self._t("wq"), self._t("wq_scale"), s.a_bits,
                                  s.w_bits, torch.float32, self._t("bq"))
        if rows is None:
            raise ValueError("the 'qkv' latent form computes q from the cached rows: pass rows=read_rows(...)")
        codes, scale = rows
        return ops.quant_gemm(codes, scale, self._t("wuq"), self._t("wuq_scale"), s.latent_bits, s.w_bits,
                              torch.float32, self._t("bq"))

    @property
    def queries_need_rows(self) -> bool:
        return self.spec.form == "qkv"

    def decode(self, q: torch.Tensor, cache: LatentCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
               cos: torch.Tensor | None, sin: torch.Tensor | None, sm_scale: float,
               plans: dict | None = None) -> torch.Tensor:
        """One new token per sequence over its cache: out fp32 [B, H, d]
        (q [B, H, d], rotated). ``plans``: the step's plans by layer shape
        (``StepMetadata.plans``), filled on first use."""
        s = self.spec
        q = q.contiguous()
        args = (q, cache.codes, cache.scale, block_table, seq_lens, self._t("wuk"), self._t("wuk_scale"),
                self._t("wuv"), self._t("wuv_scale"), s.latent_bits)
        rope_keys = self._rope_keys(cache)
        plan = None
        if plans is not None:
            w = self._t("wuk")
            key = (tuple(w.shape), w.dtype, w.device, q.shape[1], s.latent_bits, 0 if cos is None else cos.shape[1],
                   rope_keys is not None)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = ops.latent_attention_plan(*args, cos, sin, rope_keys)
        out, _ = ops.latent_attention(*args, sm_scale, cos, sin, self.check_indices, plan, rope_keys)
        bv = self.v_bias_per_query_head()
        return out.float() if bv is None else out.float() + bv

    def keys_values(self, cache: LatentCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    cos: torch.Tensor | None, sin: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """K (rotated) and V of every cached token of the sequences, varlen
        [sum(seq_lens), H_kv, d] in ``dtype`` (the attention's arithmetic:
        rounded once, by the op's epilogue), the V bias included."""
        s = self.spec
        bv = self._t("bv")
        # with a V bias, V is made in fp32 and rounded once, after the bias
        k, v = ops.latent_reconstruct_kv(cache.codes, cache.scale, block_table, seq_lens, self._t("wuk"),
                                         self._t("wuk_scale"), self._t("wuv"), self._t("wuv_scale"), s.latent_bits,
                                         cos, sin, dtype if bv is None else torch.float32, self.check_indices,
                                         self._rope_keys(cache))
        if bv is not None:
            k, v = k.to(dtype), (v + bv.float().view(1, s.num_kv_heads, s.head_dim)).to(dtype)
        return k, v

    def v_bias_per_query_head(self) -> torch.Tensor | None:
        """b_v repeated per query head [H, d] (GQA), or None."""
        bv, s = self._t("bv"), self.spec
        if bv is None:
            return None
        return bv.view(s.num_kv_heads, 1, s.head_dim).expand(-1, s.num_heads // s.num_kv_heads, -1).reshape(
            s.num_heads, s.head_dim)
