"""The latent KV cache of a QSVD-compressed Hugging Face decoder: a
transformers ``Cache`` that holds, per layer, only the paged latent.

Paging is vLLM's: one block table for all layers (every layer stores the same
tokens), per-sequence lengths, a free list with reference counts. So

- a left-padded batch stores only each sequence's real tokens (sequence b's
  token t is at block ``block_table[b, t // block_size]``, RoPE position t);
- beam search reorders by remapping block-table rows: full blocks are
  shared between beams, and only a beam's partly filled last block is copied
  when another beam shares it (copy on write: at most one block per beam and
  layer per step, never the whole cache);
- the pool grows by doubling, so earlier blocks never move.

A step is planned once per forward by ``begin_step`` (called by the decoder
stack's pre-hook, which sees the model's 2D attention mask and position ids)
and committed by ``end_step``; the attention blocks of every layer use the
same plan.
"""

from __future__ import annotations


import torch

from ..core import StepMetadata, step_metadata

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - transformers is an optional extra
    Cache, CacheLayerMixin = object, object


class StepPlan:
    """Where the T new columns of a forward go, per sequence."""

    def __init__(self, real, idx, slots, seq_lens, max_len, allocated):
        self.allocated = allocated  # [(sequence, first block index, block ids)] taken by this step
        self.real = real  # [B, T] bool: the column is a real token (not padding)
        self.idx = idx  # [B, T] long: its index in its sequence (valid where real)
        self.slots = slots  # [B * T] long: its pool slot, -1 for padding
        self.seq_lens = seq_lens  # [B] int32: tokens per sequence after this step
        self.max_len = max_len  # int: max(seq_lens)
        self.rope_recorded = False
        self.meta: StepMetadata | None = None  # the attention core's view of the step


class QSVDLatentLayer(CacheLayerMixin):
    """One decoder layer's paged latent (its pool); lengths, blocks and the
    step plan live in the QSVDLatentCache that owns it."""

    is_compileable = False

    def __init__(self, owner: "QSVDLatentCache", projector):
        super().__init__()
        self.owner, self.projector = owner, projector
        self.pool = None

    # CacheLayerMixin interface
    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a QSVDLatentCache holds only the latent: K and V are never stored. It works with "
                           "attention blocks replaced by qsvd_kernels.integrations.hf.apply_qsvd")

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.pool = None

    def reorder_cache(self, beam_idx):
        pass  # the owner remaps the shared block table once for all layers

    def nbytes(self) -> int:
        return 0 if self.pool is None else self.pool.nbytes()


class QSVDLatentCache(Cache):
    """Per-layer latents of a model to which apply_qsvd was applied. Pass it
    as the model's cache (``generate`` in this package does), or let the
    model make one: a forward or ``model.generate`` without a cache gets a
    fresh QSVDLatentCache, returned in the model's output."""

    def __init__(self, model, block_size: int = 16):
        # A model to which apply_qsvd was applied, or its DecoderStack.
        stack = model if hasattr(model, "pre_hook") else getattr(model, "_qsvd_stack", None)
        if stack is None:
            raise ValueError("this model has no QSVD decoder attention: call apply_qsvd(model, compressed) first")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.stack = stack
        layers = [QSVDLatentLayer(self, p) for p in stack.projectors]
        super().__init__(layers=layers)
        self.block_size = block_size
        self.length = 0  # columns seen (the model's view: padding included)
        self.batch = None
        self.seq_lens = None  # [B] int32, real tokens per sequence
        self.block_table = None  # [B, max_blocks] int32
        self.refcount = None  # [num_blocks] int64
        self.step = None
        self._pending = None
        self.rope_cos = self.rope_sin = None  # [capacity, d] fp32, row t = RoPE of position t
        self.device = None

    # ------------------------------------------------------------ transformers API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.length + q, 0

    @property
    def batch_size(self):
        return self.batch

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        for l in self.layers:
            l.reset()
        self.length, self.batch, self.seq_lens, self.block_table, self.refcount, self.step = 0, None, None, None, \
            None, None
        self.rope_cos = self.rope_sin = None

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: sequence b continues from sequence beam_idx[b]."""
        self._remap(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._remap(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch is not None:
            self._remap(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("QSVDLatentCache cannot be cropped (assisted or speculative decoding); use "
                                  "greedy, sampling or beam search")

    # ------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes the cache holds now: every layer's pool, plus the block
        table, reference counts, lengths and the RoPE tables."""
        extra = sum(t.numel() * t.element_size() for t in (self.block_table, self.refcount, self.seq_lens,
                                                            self.rope_cos, self.rope_sin) if t is not None)
        return sum(l.nbytes() for l in self.layers) + extra

    def token_nbytes(self) -> float:
        """Cache bytes per token over all layers (codes + scales, and the
        rotary keys of layers that cache them)."""
        return sum(l.projector.token_nbytes for l in self.layers)

    def fp16_kv_token_nbytes(self) -> int:
        """What an fp16 K/V cache of the original model holds per token."""
        return sum(2 * l.projector.dims.kv_dim * 2 for l in self.layers)

    # ------------------------------------------------------------ blocks
    @property
    def num_blocks(self) -> int:
        return 0 if self.refcount is None else self.refcount.numel()

    def _grow_pool(self, needed: int) -> None:
        have = self.num_blocks
        if needed <= have:
            return
        new = max(needed, 2 * have, 4)
        extra = torch.zeros(new - have, dtype=torch.int64, device=self.device)
        self.refcount = extra if self.refcount is None else torch.cat([self.refcount, extra])
        for l in self.layers:
            if l.pool is None:
                l.pool = l.projector.new_pool(new, self.block_size, self.device)
            else:
                l.pool.grow(new)

    def _allocate(self, n: int) -> torch.Tensor:
        free = (self.refcount == 0).nonzero().flatten() if self.refcount is not None else None
        if free is None or free.numel() < n:
            self._grow_pool(self.num_blocks + n - (0 if free is None else free.numel()))
            free = (self.refcount == 0).nonzero().flatten()
        got = free[:n]
        self.refcount[got] = 1
        return got

    def _blocks_used(self, lens: torch.Tensor) -> torch.Tensor:
        return (lens.long() + self.block_size - 1) // self.block_size

    def _ensure_blocks(self, new_lens: torch.Tensor) -> list:
        """Allocate the blocks the new lengths need; returns what it took."""
        need = self._blocks_used(new_lens)
        width = int(need.max()) if need.numel() else 0
        if width > self.block_table.shape[1]:
            pad = torch.zeros(self.batch, max(width, 2 * self.block_table.shape[1]) - self.block_table.shape[1],
                              dtype=torch.int32, device=self.device)
            self.block_table = torch.cat([self.block_table, pad], 1)
        have = self._blocks_used(self.seq_lens)
        taken = []
        for b in (need > have).nonzero().flatten().tolist():
            lo, hi = int(have[b]), int(need[b])
            got = self._allocate(hi - lo)
            self.block_table[b, lo:hi] = got.to(torch.int32)
            taken.append(got)
        return taken

    def _remap(self, rows: torch.Tensor) -> None:
        """Sequence b becomes a continuation of sequence rows[b]: share its
        blocks, copy a shared partly filled last block (copy on write), free
        blocks no longer used."""
        if self.batch is None:
            return
        rows = rows.to(self.device).long()
        self.block_table = self.block_table[rows].contiguous()
        self.seq_lens = self.seq_lens[rows].contiguous()
        self.batch = int(rows.numel())
        used = self._blocks_used(self.seq_lens)
        width = self.block_table.shape[1]
        mask = torch.arange(width, device=self.device)[None, :] < used[:, None]
        self.refcount = torch.bincount(self.block_table[mask].long(), minlength=self.num_blocks)
        owners = {}
        for b in ((self.seq_lens % self.block_size) != 0).nonzero().flatten().tolist():
            j = int(used[b]) - 1
            blk = int(self.block_table[b, j])
            if blk not in owners:
                owners[blk] = b  # the first sequence keeps the block, later ones get a copy
                continue
            new = self._allocate(1)
            self.refcount[blk] -= 1
            for l in self.layers:
                l.pool.copy_blocks(torch.tensor([blk], device=self.device), new)
            self.block_table[b, j] = int(new)

    # ------------------------------------------------------------ steps
    def begin_step(self, batch: int, new_columns: int, attention_mask, position_ids, device) -> StepPlan:
        """Plan a forward of ``new_columns`` columns for ``batch`` sequences.

        ``attention_mask`` is the model's 2D mask over all columns so far
        (1 = real token, 0 = padding) or None (no padding); ``position_ids``
        the model's positions for the new columns, or None. Raises rather than
        computing with positions the cache cannot represent."""
        B, T = batch, new_columns
        if self._pending is not None:
            self.abandon_step()  # the previous forward raised before committing
        if self.device is None:
            self.device = torch.device(device)
        if self.batch is None:
            self.batch = B
            self.seq_lens = torch.zeros(B, dtype=torch.int32, device=self.device)
            self.block_table = torch.zeros(B, 1, dtype=torch.int32, device=self.device)
        elif B != self.batch:
            raise ValueError(f"the QSVD latent cache holds {self.batch} sequences, this step has {B}: pass a fresh "
                             "cache for a new batch")
        if T < 1:
            raise ValueError(f"this step has no new columns; the cache already holds {self.length} (pass only the "
                             "tokens after them)")
        total = self.length + T
        if attention_mask is None:
            if self.length and bool((self.seq_lens != self.length).any()):
                raise ValueError("attention_mask is required: the cache holds a padded batch (sequences of "
                                 f"{self.seq_lens.tolist()} tokens in {self.length} columns)")
            real = torch.ones(B, T, dtype=torch.bool, device=self.device)
            padded_history = False
        else:
            m = attention_mask
            if not torch.is_tensor(m) or m.dim() != 2:
                raise NotImplementedError("QSVD decoder attention takes a 2D attention_mask [batch, columns] "
                                          "(1 = token, 0 = padding); custom 4D masks are not supported")
            if tuple(m.shape) != (B, total):
                raise ValueError(f"attention_mask has shape {tuple(m.shape)}; the cache has seen {self.length} "
                                 f"columns and this step adds {T}, so it must be [{B}, {total}]")
            m = m.to(self.device).bool()
            if self.length and not torch.equal(m[:, : self.length].sum(1).to(torch.int32), self.seq_lens):
                raise ValueError("attention_mask disagrees with the tokens the QSVD latent cache holds for the "
                                 "columns already seen (padding of earlier steps cannot change)")
            real = m[:, self.length :]
            padded_history = not bool(m.all())
        n_new = real.sum(1).to(torch.int32)
        idx = self.seq_lens.long()[:, None] + torch.cumsum(real.long(), 1) - 1
        if position_ids is not None:
            pos = position_ids.to(self.device).expand(B, T)
            if not torch.equal(pos[real], idx[real]):
                raise ValueError("position_ids: the QSVD latent cache stores each sequence's tokens at positions "
                                 "0, 1, 2, ... of its real tokens, and these position_ids differ (left padding "
                                 "with position_ids = attention_mask.cumsum(-1) - 1 is served; right padding "
                                 "or offset positions are not)")
        elif padded_history:
            raise ValueError("a padded batch needs position_ids (attention_mask.cumsum(-1) - 1, as generate() "
                             "passes): without them the model would rotate padding positions")
        new_lens = self.seq_lens + n_new
        taken = self._ensure_blocks(new_lens)
        blk = self.block_table.long().gather(1, (idx.clamp(min=0) // self.block_size))
        slots = torch.where(real, blk * self.block_size + idx.clamp(min=0) % self.block_size,
                            torch.full_like(idx, -1)).reshape(-1)
        self.step = StepPlan(real, idx, slots, new_lens, int(new_lens.max()) if B else 0, taken)
        real_host = real.tolist()
        self.step.meta = step_metadata(slots, idx.reshape(-1), self.block_table, new_lens,
                                       [[b * T + t for t in range(T) if real_host[b][t]] for b in range(B)],
                                       new_lens.tolist())
        self._pending = (T, new_lens)
        return self.step

    def end_step(self) -> None:
        T, new_lens = self._pending
        self.length += T
        self.seq_lens = new_lens
        self.step, self._pending = None, None

    def abandon_step(self) -> None:
        """A forward failed: the planned columns were not taken, and the
        blocks the step allocated go back to the free list."""
        if self.step is not None:
            for got in self.step.allocated:
                self.refcount[got] -= 1
        self.step, self._pending = None, None
        if self.length == 0:  # nothing committed yet: the next step may bring another batch size
            self.batch = self.seq_lens = self.block_table = None

    def record_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Keep the rotary tables of this step's real tokens, from the model's
        own rotary embedding (so any RoPE scaling is honoured): row t holds
        position t. Done once per step (the first layer)."""
        step = self.step
        if step.rope_recorded:
            return
        B, T = step.real.shape
        d = cos.shape[-1]
        cos, sin = cos.reshape(-1, T, d).expand(B, T, d), sin.reshape(-1, T, d).expand(B, T, d)
        need = max(step.max_len, 1)
        if self.rope_cos is None or self.rope_cos.shape[0] < need:
            cap = max(need, 2 * (0 if self.rope_cos is None else self.rope_cos.shape[0]), 64)
            new_cos = torch.zeros(cap, d, dtype=torch.float32, device=self.device)
            new_sin = torch.zeros(cap, d, dtype=torch.float32, device=self.device)
            if self.rope_cos is not None:
                new_cos[: self.rope_cos.shape[0]] = self.rope_cos
                new_sin[: self.rope_sin.shape[0]] = self.rope_sin
            self.rope_cos, self.rope_sin = new_cos, new_sin
        where = step.idx[step.real]
        self.rope_cos[where] = cos[step.real].float()
        self.rope_sin[where] = sin[step.real].float()
        step.rope_recorded = True
