"""tune for latent_attention's plan and hadamard's variant (tune.py runs it
with ``--op latent_attention`` or ``--op hadamard``).

latent_attention, per shape (B, H, H_kv, r, d, ctx) with --rope / --no-rope,
--weight-dtype and --latent-bits: candidate plans are the default knobs plus
kernel (simt | tc) x splits x tile_tokens x ctas_per_sm; each goes through
the C++ plan checker first (the same function the launcher calls, with the
device's SM count and opt-in shared memory), a refused one is recorded as
skipped with the checker's reason, and candidates giving a plan identical to
an earlier one are not timed twice. On the GPU each output is checked
against the CPU kernel within the derived bound (testing.
latent_attention_error_bound, with the CUDA kernel's kind: "cuda" for simt,
"cuda_tc" for tc, "cuda_auto" for auto, plus the CPU kernel's own bound),
then timed. Rules: exact r, d, group selectors with (b, ctx) buckets.

hadamard, per shape (rows x K) and --hadamard-dtypes: candidates are
elems_per_thread 0 (built-in), 1, 2, 4, 8, 32; each output must equal the
CPU kernel's bit for bit before it is timed. Rules: K buckets per dtype.

Fake timings (--dry-run): {"latent_attention": {"times": [{"B", "H", "H_kv",
"r", "d", "ctx", "kernel", "splits", "tile_tokens", "heads_per_cta",
"ctas_per_sm", "time_s"}], "fail": [same keys without time_s]}, "hadamard":
{"times": [{"rows", "K", "dtype", "elems_per_thread", "time_s"}], "fail":
[...]}}. A candidate with no fake time is recorded as skipped.
"""

from __future__ import annotations

import statistics

from . import tables

LATENT_DEFAULT = {"kernel": "auto", "splits": 0, "tile_tokens": 0, "heads_per_cta": 0, "ctas_per_sm": 2}
KNOB_KEYS = ("kernel", "splits", "tile_tokens", "heads_per_cta", "ctas_per_sm")
HADAMARD_EPTS = (0, 1, 2, 4, 8, 32)
TORCH_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
WEIGHTS = {"f16": "float16", "bf16": "bfloat16", "int8": "int8"}


# -- latent_attention ----------------------------------------------------------

def parse_latent_shapes(items) -> list:
    shapes = []
    for item in items or []:
        for part in item.replace(";", " ").split():
            try:
                vals = tuple(int(x) for x in part.split(","))
            except ValueError:
                raise SystemExit(f"tune: a latent shape is B,H,H_kv,r,d,ctx, got {part!r}") from None
            if len(vals) != 6 or min(vals) < 1 or vals[1] % vals[2]:
                raise SystemExit(f"tune: a latent shape is B,H,H_kv,r,d,ctx (positive, H_kv divides H), got {part!r}")
            shapes.append(vals)
    if not shapes:
        raise SystemExit("tune --op latent_attention needs --latent-shapes B,H,H_kv,r,d,ctx")
    return shapes


def latent_candidates(kernels, splits, tiles, ctas) -> list:
    """The default knobs first, then every combination (a tile only where the kernel takes it)."""
    out = [dict(LATENT_DEFAULT)]
    for k in kernels:
        for s in splits:
            for t in tiles:
                if t and ((k == "simt" and (t % 8 or t > 32)) or (k == "tc" and t % 16)):
                    continue
                for c in ctas:
                    cand = {"kernel": k, "splits": s, "tile_tokens": t, "heads_per_cta": 0, "ctas_per_sm": c}
                    if cand not in out:
                        out.append(cand)
    return out


def latent_key(c: dict, shape, variant) -> str:
    B, H, H_kv, r, d, ctx = shape
    rope, wd, bits = variant
    return (f"latent|{c['kernel']}|{c['splits']}|{c['tile_tokens']}|{c['heads_per_cta']}|{c['ctas_per_sm']}|"
            f"{B},{H},{H_kv},{r},{d},{ctx}|{'rope' if rope else 'norope'}|{wd}|{bits}")


def plan_of(C, c: dict, shape, variant, sm_count: int, smem_limit: int) -> dict:
    B, H, H_kv, r, d, ctx = shape
    rope, wd, bits = variant
    return dict(C.plan_latent_attention_shape(B, H, H_kv, r, d, bits, rope, "i8" if wd == "int8" else wd, ctx, sm_count,
                                        smem_limit, **c))


def plan_signature(plan: dict) -> tuple:
    return tuple(plan.get(k) for k in ("split_kernel", "splits", "split_tokens", "tile_tokens", "heads_per_cta",
                                      "r_slices", "slice_cols", "combine_heads"))


def fake_latent_lookup(fake: dict, variant):
    times, fails = {}, set()
    sect = fake.get("latent_attention", {})

    def key(rec):
        c = {**LATENT_DEFAULT, **{k: rec[k] for k in KNOB_KEYS if k in rec}}
        return latent_key(c, (rec["B"], rec["H"], rec["H_kv"], rec["r"], rec["d"], rec["ctx"]), variant)

    for rec in sect.get("times", []):
        times[key(rec)] = float(rec["time_s"])
    for rec in sect.get("fail", []):
        fails.add(key(rec))
    return times, fails


def median_cuda_seconds(fn, reps: int, warmup: int = 0) -> float:
    """Median seconds of ``reps`` calls of ``fn`` (after ``warmup`` untimed
    ones), each timed with CUDA events on the current stream (the tuner and
    the GPU benches time this way)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class _Runner:
    """What the runners share: torch and the tuning module (imported on
    first use: the tuner runs without a GPU too), the device, the timing
    repetitions, and a cache of inputs per shape."""

    def __init__(self, device: int, warmup: int, reps: int):
        import torch

        from .. import tuning

        self.torch, self.tuning = torch, tuning
        self.device, self.warmup, self.reps = device, warmup, reps
        self.cache = {}

    def _median_time(self, call) -> float:
        return median_cuda_seconds(call, self.reps)


class LatentRunner(_Runner):
    """Checks a plan's output against the CPU kernel within the derived bound, then times it."""

    def _inputs(self, shape, variant):
        import math

        from .. import reference as R
        from ..formats import code_format
        from ..testing import LATENT_BOUND, latent_attention_error_bound, random_codes

        torch = self.torch
        key = (shape, variant)
        if key in self.cache:
            return self.cache[key]
        B, H, H_kv, r, d, ctx = shape
        rope, wd, bits = variant
        g = torch.Generator().manual_seed(0)
        block = 16
        per_seq = -(-ctx // block)
        num_blocks = B * per_seq
        perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
        block_table = perm.reshape(B, per_seq).contiguous()
        _, cache = random_codes(bits, (num_blocks, block, r), g)
        scale = (torch.rand(num_blocks, block, generator=g) + 0.5) / code_format(bits).qmax
        seq_lens = torch.full((B,), ctx, dtype=torch.int32)
        w = [torch.randn(H_kv, r, d, generator=g) / math.sqrt(r) for _ in range(2)]
        if wd == "int8":
            ws = []
            for x in w:
                s = x.abs().amax(dim=1) / 127
                ws += [torch.round(x / s.unsqueeze(1)).clamp(-127, 127).to(torch.int8), s]
            w_uk, w_uk_s, w_uv, w_uv_s = ws
        else:
            dt = getattr(torch, WEIGHTS[wd])
            w_uk, w_uk_s, w_uv, w_uv_s = w[0].to(dt), None, w[1].to(dt), None
        q = torch.randn(B, H, d, generator=g).to(torch.float16)
        cos, sin = R.rope_tables(ctx + 1, d) if rope else (None, None)
        sm_scale = 1.0 / math.sqrt(d)
        args = [cache, scale, block_table, seq_lens, w_uk, w_uk_s, w_uv, w_uv_s, bits, sm_scale, cos, sin]
        cpu_out, _ = torch.ops.qsvd.latent_attention(q, *args)
        cpu_bound, _ = latent_attention_error_bound(q, *args, **LATENT_BOUND["cpu"])
        bounds = {}
        for kind in ("cuda", "cuda_tc", "cuda_auto"):
            bounds[kind] = latent_attention_error_bound(q, *args, u=LATENT_BOUND["cpu"]["u"], kernel=kind)[0]
        dev = f"cuda:{self.device}"
        dargs = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
        self.cache = {key: (q.to(dev), dargs, cpu_out, cpu_bound, bounds)}
        return self.cache[key]

    def run(self, c: dict, shape, variant):
        from ..testing import EPS, TINY

        torch = self.torch
        q, dargs, cpu_out, cpu_bound, bounds = self._inputs(shape, variant)
        kind = {"simt": "cuda", "tc": "cuda_tc", "auto": "cuda_auto"}[c["kernel"]]
        try:
            self.tuning.force("latent_attention", device=self.device, **c)
            got, _ = torch.ops.qsvd.latent_attention(q, *dargs)
            torch.cuda.synchronize(self.device)
            got = got.cpu().double()
            want = cpu_out.double()
            # |cuda - cpu| <= both kernels' bounds against the exact value + both outputs' roundings
            allowed = bounds[kind].double() + cpu_bound.double() + 2 * EPS[torch.float16] * want.abs() \
                + 2 * TINY[torch.float16]
            if not torch.isfinite(got).all() or bool(((got - want).abs() > allowed).any()):
                return "failed", None, "output outside the derived bound around the CPU kernel's"
            for _ in range(self.warmup):
                torch.ops.qsvd.latent_attention(q, *dargs)
            return "ok", self._median_time(lambda: torch.ops.qsvd.latent_attention(q, *dargs)), ""
        except (RuntimeError, ValueError) as e:
            return "failed", None, str(e).splitlines()[0][:200]
        finally:
            self.tuning.clear(self.device)


def _cand(rec) -> tuple:
    return tuple(rec[k] for k in KNOB_KEYS)


def cover(by_shape: dict, tolerance: float):
    """Per shape (records with a "cand" key and "time_s") the candidates within
    tolerance of its best; the fewest that cover every shape (greedy set
    cover; among those covering as many shapes, the fastest on them). The
    one reducer of every op's tuner. Returns (good per shape, chosen)."""
    good, rel = {}, {}
    for s, rs in by_shape.items():
        best = min(r["time_s"] for r in rs)
        good[s] = {r["cand"] for r in rs if r["time_s"] <= best * (1 + tolerance)}
        for r in rs:
            rel[(r["cand"], s)] = r["time_s"] / best
    chosen, uncovered = [], set(good)
    while uncovered:
        score: dict = {}
        for s in uncovered:
            for c in good[s]:
                n, t = score.get(c, (0, 0.0))
                score[c] = (n + 1, t - rel[(c, s)])
        c = max(sorted(score, key=repr), key=lambda x: score[x])
        chosen.append(c)
        uncovered = {s for s in uncovered if c not in good[s]}
    return good, chosen


def _buckets(values: list) -> list:
    """Ascending distinct values -> [lo, hi] buckets, the last unbounded."""
    out, lo = [], 1
    for i, v in enumerate(values):
        out.append([lo, None if i == len(values) - 1 else v])
        lo = v + 1
    return out


def reduce_latent(records: list, variant, tolerance: float) -> list:
    """Rules from the ok records: exact (r, d, group) selectors, (b, ctx)
    buckets, the fewest plans within tolerance of each shape's best; the
    default plan as the catch-all."""
    rope, wd, bits = variant
    by_shape: dict = {}
    for r in records:
        if r["status"] == "ok":
            by_shape.setdefault(tuple(r["shape"]), []).append({**r, "cand": _cand(r)})
    if not by_shape:
        raise SystemExit("tune: no latent_attention candidate passed; nothing to reduce")
    good, chosen = cover(by_shape, tolerance)
    rank = {c: i for i, c in enumerate(chosen)}
    rules = []
    selectors = sorted({(s[3], s[4], s[1] // s[2]) for s in good})
    for r_, d_, g_ in selectors:
        shapes = [s for s in good if (s[3], s[4], s[1] // s[2]) == (r_, d_, g_)]
        bs = sorted({s[0] for s in shapes})
        ctxs = sorted({s[5] for s in shapes})
        b_buckets, ctx_buckets = _buckets(bs), _buckets(ctxs)
        for B, bb in zip(bs, b_buckets):
            for ctx, cb in zip(ctxs, ctx_buckets):
                here = [s for s in shapes if s[0] == B and s[5] == ctx]
                if not here:  # not measured: the nearest measured ctx of this B decides below
                    here = [s for s in shapes if s[0] == B]
                pick = max(chosen, key=lambda c: (sum(c in good[s] for s in here), -rank[c]))
                rule = {"rope": rope, "weight_dtype": wd, "bits": bits, "r": [r_, r_], "d": [d_, d_],
                        "group": [g_, g_], "b": bb, "ctx": cb, **dict(zip(KNOB_KEYS, pick))}
                prev = rules[-1] if rules else None
                # merge with the previous ctx bucket of the same b bucket when the plan is the same
                if (prev is not None and prev["b"] == bb and prev["r"] == rule["r"] and prev["d"] == rule["d"]
                        and prev["group"] == rule["group"] and _cand(prev) == pick):
                    prev["ctx"] = [prev["ctx"][0], cb[1]]
                    continue
                rules.append(rule)
    rules.append({"b": [1, None], **LATENT_DEFAULT})
    return rules


def _gain(pairs) -> dict:
    """Total tuned and default seconds over the shapes timed both ways
    (pairs of (tuned, default), None where not timed)."""
    tuned = base = 0.0
    n = 0
    for t, b in pairs:
        if t is None or b is None:
            continue
        tuned += t
        base += b
        n += 1
    return {"shapes": n, "default_s": base, "tuned_s": tuned, "speedup": (base / tuned) if tuned else None}


def gain_latent(records: list, rules: list, variant) -> dict:
    """Total time of the table's plans vs the default plan's, over the shapes where both were timed."""
    rope, wd, bits = variant
    parsed = [tables.latent_rule("tuned", d) for d in rules]
    times = {(tuple(r["shape"]), _cand(r)): r["time_s"] for r in records if r["status"] == "ok"}
    default = tuple(LATENT_DEFAULT[k] for k in KNOB_KEYS)
    pairs = []
    for shape in sorted({s for s, _ in times}):
        B, H, H_kv, r, d, ctx = shape
        _, rule = tables.evaluate_latent(parsed, B=B, H=H, H_kv=H_kv, r=r, d=d, bits=bits, rope=rope,
                                         weight_dtype=wd, token_capacity=ctx)
        pairs.append((times.get((shape, tuple(rule.knobs[k] for k in KNOB_KEYS))) if rule is not None else None,
                      times.get((shape, default))))
    return _gain(pairs)


# -- hadamard ------------------------------------------------------------------

def parse_hadamard_shapes(text) -> list:
    shapes = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"tune: a hadamard shape is ROWSxK, got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    if not shapes:
        raise SystemExit("tune --op hadamard needs --hadamard-shapes ROWSxK,...")
    return shapes


def hadamard_key(ept: int, shape, dtype: str) -> str:
    return f"hadamard|{ept}|{shape[0]}x{shape[1]}|{dtype}"


def fake_hadamard_lookup(fake: dict):
    times, fails = {}, set()
    sect = fake.get("hadamard", {})
    for rec in sect.get("times", []):
        times[hadamard_key(rec["elems_per_thread"], (rec["rows"], rec["K"]), rec["dtype"])] = float(rec["time_s"])
    for rec in sect.get("fail", []):
        fails.add(hadamard_key(rec["elems_per_thread"], (rec["rows"], rec["K"]), rec["dtype"]))
    return times, fails


class HadamardRunner(_Runner):
    """Checks a variant's output against the CPU kernel bit for bit, then times it."""

    def run(self, ept: int, shape, dtype: str):
        torch = self.torch
        key = (shape, dtype)
        if key not in self.cache:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(*shape, generator=g).to(getattr(torch, TORCH_DTYPES[dtype]))
            signs = (torch.randint(0, 2, (shape[1],), generator=g) * 2 - 1).float()
            want = torch.ops.qsvd.hadamard_transform(x, signs)
            dev = f"cuda:{self.device}"
            self.cache = {key: (x.to(dev), signs.to(dev), want)}
        x, signs, want = self.cache[key]
        try:
            self.tuning.force("hadamard", elems_per_thread=ept, device=self.device)
            got = torch.ops.qsvd.hadamard_transform(x, signs)
            torch.cuda.synchronize(self.device)
            if not torch.equal(got.cpu(), want):
                return "failed", None, "output differs from the CPU kernel"
            for _ in range(self.warmup):
                torch.ops.qsvd.hadamard_transform(x, signs)
            return "ok", self._median_time(lambda: torch.ops.qsvd.hadamard_transform(x, signs)), ""
        except (RuntimeError, ValueError) as e:
            return "failed", None, str(e).splitlines()[0][:200]
        finally:
            self.tuning.clear(self.device)


def reduce_hadamard(records: list, tolerance: float) -> list:
    """Rules from the ok records: per dtype, K buckets with the fewest
    variants within tolerance of each shape's best; the built-in as catch-all."""
    by_shape: dict = {}
    for r in records:
        if r["status"] == "ok":
            by_shape.setdefault((r["dtype"], r["K"], r["rows"]), []).append({**r, "cand": r["elems_per_thread"]})
    if not by_shape:
        raise SystemExit("tune: no hadamard candidate passed; nothing to reduce")
    good, chosen = cover(by_shape, tolerance)
    rank = {c: i for i, c in enumerate(chosen)}
    rules = []
    for dtype in sorted({s[0] for s in good}):
        ks = sorted({s[1] for s in good if s[0] == dtype})
        for K, kb in zip(ks, _buckets(ks)):
            here = [s for s in good if s[0] == dtype and s[1] == K]
            pick = max(chosen, key=lambda c: (sum(c in good[s] for s in here), -rank[c]))
            prev = rules[-1] if rules else None
            if prev is not None and prev["dtype"] == dtype and prev["elems_per_thread"] == pick:
                prev["k"] = [prev["k"][0], kb[1]]
                continue
            rules.append({"k": kb, "dtype": dtype, "elems_per_thread": pick})
    rules.append({"k": [1, None], "elems_per_thread": 0})
    return rules


def gain_hadamard(records: list, rules: list) -> dict:
    parsed = [tables.hadamard_rule("tuned", d) for d in rules]
    times = {((r["dtype"], r["K"], r["rows"]), r["elems_per_thread"]): r["time_s"] for r in records
             if r["status"] == "ok"}
    pairs = []
    for s in sorted({s for s, _ in times}):
        _, rule = tables.evaluate_hadamard(parsed, s[1], s[0])
        pairs.append((times.get((s, rule.elems_per_thread)) if rule is not None else None, times.get((s, 0))))
    return _gain(pairs)
