"""Global rank allocation: rank the singular values of all layers together.

Each layer keeps a prefix of its singular values (its top-r by sigma), so a
layer's choice is its rank. Ranks move in units of ``align`` (kernel tiles
like multiples of 16) between ``min_rank`` and the layer's largest aligned
rank. The allocator maximises the total importance kept subject to the budget
(budget.py): the gain of a block of ``align`` components is the sum of their
scores, its cost the block's share of R1 or R2.

- When every layer's block costs the same (R2 and mean-rank budgets, and R1
  over identical layers) this is solved exactly by dynamic programming over
  the number of blocks, and the budget is spent to the last whole block.
- Otherwise (R1 over layers of different widths) a greedy pass takes, best
  gain-per-cost first, the groups of blocks along each layer's upper concave
  envelope of cumulative gain (so a cheap block is never skipped just because
  the one after it is better); it stops within one block of the budget.

Deterministic: ties break by layer, then position.
"""

from __future__ import annotations

import math

import torch

from ..model.dims import LayerDims, latent_dims
from .budget import Budget


def _aligned_max(d: LayerDims, align: int) -> int:
    return (latent_dims(d).max_rank // align) * align


def _check(dims, align, min_rank):
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if min_rank < align or min_rank % align:
        raise ValueError(f"min_rank must be a positive multiple of align ({align}), got {min_rank}")
    for i, d in enumerate(dims):
        if _aligned_max(d, align) < min_rank:
            raise ValueError(f"layer {i}: its largest aligned rank {_aligned_max(d, align)} is below min_rank {min_rank}")


def _free_layers(budget: Budget, dims, caches) -> list[bool]:
    """Layers the budget does not count (R2 and a layer without a KV cache):
    they keep their largest aligned rank."""
    if budget.kind != "r2" or caches is None:
        return [False] * len(dims)
    free = [not c for c in caches]
    if all(free):
        raise ValueError("an R2 budget counts only the layers that keep a KV cache, and none of the selected "
                         "layers does: use an R1 or mean-rank budget")
    return free


def _on_counted_layers(fn, budget, dims, caches, per_layer=(), **kw):
    """Run ``fn(per_layer..., dims, budget, **kw)`` on the layers the budget
    counts; the others get their largest aligned rank."""
    free = _free_layers(budget, dims, caches)
    if not any(free):
        return fn(*per_layer, dims, budget, **kw)
    keep = [i for i, f in enumerate(free) if not f]
    sub = fn(*[[x[i] for i in keep] for x in per_layer], [dims[i] for i in keep], budget, **kw)
    out = [_aligned_max(d, kw["align"]) for d in dims]
    for i, r in zip(keep, sub):
        out[i] = r
    return out


def _limit_in_blocks(budget, dims, align, min_rank):
    cost, limit = budget.rank_units(dims)
    base = sum(c * min_rank for c in cost)
    if limit <= 0:
        raise ValueError(f"the budget {budget.kind.upper()} = {budget.value:g} does not even cover the weights no "
                         "rank scales (the 'kv' latent form keeps W_q whole): use a larger budget or the 'qkv' form")
    if base > limit * (1 + 1e-12):
        ach = limit / base
        raise ValueError(
            f"the budget {budget.kind.upper()} = {budget.value:g} is below what the minimum rank allows "
            f"(every layer at min_rank = {min_rank} already costs {1 / ach:.3g}x the budget)")
    full = sum(c * _aligned_max(d, align) for c, d in zip(cost, dims))
    if full <= limit:
        if budget.kind == "mean_rank" or (budget.w_bits or 16) >= 16 and (budget.latent_bits or 16) >= 16:
            raise ValueError(
                f"the budget {budget.kind.upper()} = {budget.value:g} is at or above full rank for every layer: "
                "nothing would be compressed")
        return cost, None  # quantization alone meets it: every layer keeps its full (aligned) rank
    return cost, limit - base


def check_budget(dims: list[LayerDims], budget: Budget, align: int = 16, min_rank: int | None = None,
                 caches: list[bool] | None = None) -> None:
    """ValueError unless some aligned ranks in [min_rank, max] meet ``budget``
    (``caches``: which layers keep a KV cache, for R2; None: all)."""
    min_rank = align if min_rank is None else min_rank
    _check(dims, align, min_rank)
    free = _free_layers(budget, dims, caches)
    _limit_in_blocks(budget, [d for d, f in zip(dims, free) if not f], align, min_rank)


def uniform_ranks(dims: list[LayerDims], budget: Budget, *, align: int = 16, min_rank: int | None = None,
                  caches: list[bool] | None = None) -> list[int]:
    """The same rank for every layer the budget counts (capped at each
    layer's largest aligned rank): the largest multiple of ``align`` that
    fits the budget. Layers an R2 budget does not count (``caches`` False)
    keep their largest aligned rank."""
    if caches is not None:
        return _on_counted_layers(uniform_ranks, budget, dims, caches, align=align, min_rank=min_rank)
    min_rank = align if min_rank is None else min_rank
    _check(dims, align, min_rank)
    cost, room = _limit_in_blocks(budget, dims, align, min_rank)
    if room is None:
        return [_aligned_max(d, align) for d in dims]
    r = min_rank
    while True:
        nxt = [min(r + align, _aligned_max(d, align)) for d in dims]
        if nxt == [min(r, _aligned_max(d, align)) for d in dims]:
            break
        extra = sum(c * (n - min_rank) for c, n in zip(cost, nxt))
        if extra > room * (1 + 1e-12):
            break
        r += align
    return [min(r, _aligned_max(d, align)) for d in dims]


def _envelope_items(gains: list[float]) -> list[tuple[int, int, float]]:
    """Split a layer's block gains into consecutive groups along the upper
    concave envelope of their prefix sums: (first block, count, mean gain)
    with non-increasing mean gains."""
    items: list[list[float]] = []  # [first, count, total]
    for j, g in enumerate(gains):
        items.append([j, 1, g])
        while len(items) > 1 and items[-1][2] / items[-1][1] > items[-2][2] / items[-2][1]:
            last = items.pop()
            items[-1][1] += last[1]
            items[-1][2] += last[2]
    return [(int(f), int(n), t / n) for f, n, t in items]


def allocate_ranks(scores: list[torch.Tensor], dims: list[LayerDims], budget: Budget, *, align: int = 16,
                   min_rank: int | None = None, caches: list[bool] | None = None) -> list[int]:
    """Ranks per layer maximising the kept importance under ``budget``.
    Layers an R2 budget does not count (``caches`` False: no KV cache) keep
    their largest aligned rank.

    scores[l]: the importance of layer l's singular values, in sigma order
    (scores.py), at least as long as the layer's largest aligned rank.
    """
    if len(scores) != len(dims):
        raise ValueError(f"{len(scores)} score vectors for {len(dims)} layers")
    if caches is not None:
        return _on_counted_layers(allocate_ranks, budget, dims, caches, per_layer=(scores,), align=align,
                                  min_rank=min_rank)
    min_rank = align if min_rank is None else min_rank
    _check(dims, align, min_rank)
    cost, room = _limit_in_blocks(budget, dims, align, min_rank)
    if room is None:
        return [_aligned_max(d, align) for d in dims]

    blocks_of = []
    for l, (s, d) in enumerate(zip(scores, dims)):
        s = torch.as_tensor(s, dtype=torch.float64).flatten()
        top = _aligned_max(d, align)
        if s.numel() < top:
            raise ValueError(f"layer {l}: {s.numel()} scores, but ranks up to {top} are possible")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"layer {l}: scores contain NaN or Inf")
        blocks_of.append(s[min_rank:top].reshape(-1, align).sum(1))
    if all(c == cost[0] for c in cost):
        units = int(math.floor(room / (cost[0] * align) * (1 + 1e-12)))
        return [min_rank + align * n for n in _exact_blocks(blocks_of, units)]

    candidates = []  # (-gain per cost, layer, first block, count)
    for l, blocks in enumerate(blocks_of):
        for first, count, mean_gain in _envelope_items(blocks.tolist()):
            candidates.append((-mean_gain / (cost[l] * align), l, first, count))
    candidates.sort()

    extra_blocks = [0] * len(dims)
    next_block = [0] * len(dims)
    for _, l, first, count in candidates:
        if first != next_block[l]:  # an earlier item of this layer did not fit: keep the prefix
            continue
        block_cost = cost[l] * align
        take = min(count, int(math.floor(room / block_cost * (1 + 1e-12))))
        if take <= 0:
            next_block[l] = -1
            continue
        extra_blocks[l] += take
        room -= take * block_cost
        next_block[l] = first + take if take == count else -1
    return [min_rank + align * n for n in extra_blocks]


def _exact_blocks(blocks_of: list[torch.Tensor], units: int) -> list[int]:
    """Blocks per layer (a prefix each) maximising the summed gain with at most
    ``units`` blocks in all: a multiple-choice knapsack with unit costs,
    solved by dynamic programming over the blocks spent so far.
    Gains are non-negative, so the optimum spends every block it can."""
    best = torch.full((units + 1,), -math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for gains in blocks_of:
        G = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(gains, 0)])  # gain of the first j blocks
        new = torch.full_like(best, -math.inf)
        pick = torch.zeros(units + 1, dtype=torch.long)
        for j in range(min(len(G) - 1, units) + 1):
            cand = torch.full_like(best, -math.inf)
            cand[j:] = best[: units + 1 - j] + G[j]
            better = cand > new  # strict: ties keep the smaller j (deterministic)
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        choices.append(pick)
    # The largest total among the best: spend the budget (ties -> more blocks).
    finite = torch.isfinite(best)
    top = best[finite].max()
    b = int(torch.nonzero(finite & (best >= top - 1e-12 * max(1.0, abs(float(top))))).max())
    out = []
    for pick in reversed(choices):
        j = int(pick[b])
        out.append(j)
        b -= j
    return out[::-1]
