"""Small models with real attention blocks, built locally (no downloads)."""

from __future__ import annotations

import math

import torch
from torch import nn


class ToyAttention(nn.Module):
    """Self-attention with q_proj/k_proj/v_proj (GQA when kv_heads < heads)."""

    def __init__(self, hidden, heads, kv_heads, bias=True):
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.num_kv = kv_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden)

    def forward(self, x, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        rep = self.num_heads // self.num_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        o = torch.softmax(s, -1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class ToyEncoder(nn.Module):
    """Embedding -> a few pre-norm attention blocks -> mean-pooled output."""

    def __init__(self, vocab=50, hidden=64, heads=4, kv_heads=2, layers=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers)])
        self.blocks = nn.ModuleList([ToyAttention(hidden, heads, kv_heads) for _ in range(layers)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
            # A decaying spectrum on the Q/K/V weights, as trained models have.
            for blk in self.blocks:
                for lin in (blk.q_proj, blk.k_proj, blk.v_proj):
                    U, _, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
                    s = torch.exp(-torch.arange(U.shape[1], dtype=torch.float32) / 12)
                    lin.weight.copy_((U * s) @ Vh * 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for norm, blk in zip(self.norms, self.blocks):
            h = h + blk(norm(h), attention_mask)
        return h


def pooled(model, batch):
    h = model(**batch)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def toy_batches(n_batches=4, batch=6, length=12, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        lens = torch.randint(length // 2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None, :] < lens[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
