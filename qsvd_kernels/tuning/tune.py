"""python -m qsvd_kernels tune: time quant_gemm's compiled configs and knobs on
the local GPU for given shapes, and reduce the results to a small table.

    python -m qsvd_kernels tune --shapes 1x4096x4096,16x4096x4096,512x11008x4096 \\
        --bits 8,8 --bits 8,4 --results tune.jsonl --out my-gpu.json

For every (shape, bit pair) and every candidate (compiled config that can
run it x stream-K mode x splits x raster):
  1. check: the candidate's output is compared with the CPU kernel's, bit for
     bit (integer sums are exact, so every config and knob must agree); a
     failing candidate is skipped and recorded;
  2. time: CUDA events, median of --reps runs after --warmup runs;
  3. record: one JSON line appended to --results and flushed at once, so a
     crash loses nothing; a rerun with the same --results skips what is there.
Then the reduction: per shape the candidates within --tolerance (2 %) of the
best; the fewest candidates that cover every shape (greedy set cover); rules
per bit pair with ascending M buckets; the built-in prefill config as the
catch-all. The table is validated by the loader before it is written.

No GPU: ``--dry-run --cc 89 --fake-timings t.json`` runs all of the above but
the GPU steps: candidates come from the menu for that compute capability
(compiled or not), the check and the timing are read from the fake-timings
file ({"times": [{"config", "M", "N", "K", "bits", "streamk_mode", "splits",
"raster", "time_s"}], "fail": [same keys without time_s]}); candidates with
no fake time are recorded as skipped.

A compressed model's shapes: ``python -m qsvd_kernels tune --artefact DIR
[--tokens 1,16,512]`` (the CLI turns the artefact's layers into --shapes and
--bits; cli.artefact_gemm_args).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from . import gemm_menu, tables

DEFAULT_MODES = ("heuristic", "data_parallel", "split_k")
DEFAULT_SPLITS = (2, 4)
DEFAULT_RASTERS = ("heuristic", "along_m", "along_n")


def _parse_shapes(text: str) -> list:
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"tune: a shape is MxNxK with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    if not shapes:
        raise SystemExit("tune: no shapes")
    return shapes


def _parse_bits(items) -> list:
    out = []
    for item in items or ["8,8"]:
        try:
            a, b = (int(x) for x in item.split(","))
        except ValueError:
            raise SystemExit(f"tune: --bits is a_bits,b_bits, got {item!r}") from None
        if (a, b) not in gemm_menu.PAIR_BITS:
            raise SystemExit(f"tune: --bits must be one of {list(gemm_menu.PAIR_BITS)}, got {item!r}")
        out.append((a, b))
    return out


def _runs_on(entry, cc: int, a_bits: int, b_bits: int) -> bool:
    if (a_bits, b_bits) not in entry.pairs:
        return False
    if entry.arch == "sm90":
        return cc == 90 and (a_bits, b_bits) == (8, 8)
    return 80 <= cc < 90 or (cc == 90 and (a_bits == 4 or b_bits == 4))


def candidates(entries, cc: int, a_bits: int, b_bits: int, modes, splits, rasters) -> list:
    """Every (config, mode, splits, raster) to try for a bit pair on cc."""
    out = []
    for e in entries:
        if not _runs_on(e, cc, a_bits, b_bits):
            continue
        for mode in modes:
            for s in (splits if mode == "split_k" else (1,)):
                # CUTLASS 2.x's stream-K swizzle has no raster option.
                for r in (rasters if e.arch == "sm90" else ("heuristic",)):
                    out.append({"config": e.name, "streamk_mode": mode, "splits": s, "raster": r})
    return out


def _key(c: dict, shape, bits) -> str:
    M, N, K = shape
    return f"{c['config']}|{c['streamk_mode']}|{c['splits']}|{c['raster']}|{M}x{N}x{K}|a{bits[0]}w{bits[1]}"


def _fake_lookup(fake: dict):
    times, fails = {}, set()
    for rec in fake.get("times", []):
        times[_key(rec, (rec["M"], rec["N"], rec["K"]), tuple(rec["bits"]))] = float(rec["time_s"])
    for rec in fake.get("fail", []):
        fails.add(_key(rec, (rec["M"], rec["N"], rec["K"]), tuple(rec["bits"])))
    return times, fails


class GpuRunner:
    """Checks (bit-exact against the CPU kernel) and times one candidate."""

    def __init__(self, device: int, warmup: int, reps: int, out_dtype):
        import torch

        from .. import tuning

        self.torch, self.tuning = torch, tuning
        self.device, self.warmup, self.reps, self.out_dtype = device, warmup, reps, out_dtype
        self.cache = {}

    def _inputs(self, shape, bits):
        torch = self.torch
        key = (shape, bits)
        if key not in self.cache:
            M, N, K = shape
            g = torch.Generator().manual_seed(0)

            def codes(rows, b):
                q = torch.randint(-(2 ** (b - 1)) + 1, 2 ** (b - 1), (rows, K), generator=g, dtype=torch.int8)
                if b == 8:
                    return q
                u = (q & 0xF).to(torch.uint8)
                return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()

            a, b = codes(M, bits[0]), codes(N, bits[1])
            sa = torch.rand(M, generator=g) + 0.5
            sb = torch.rand(N, generator=g) + 0.5
            cpu = torch.ops.qsvd.quant_gemm(a, sa, b, sb, bits[0], bits[1], self.out_dtype, None)
            dev = f"cuda:{self.device}"
            self.cache = {key: ((a.to(dev), sa.to(dev), b.to(dev), sb.to(dev)), cpu)}
        return self.cache[key]

    def run(self, c: dict, shape, bits):
        """(status, time_s or None, note)."""
        torch = self.torch
        if shape[2] % 2 and 4 in bits:
            return "skipped", None, "odd K with INT4"
        (a, sa, b, sb), want = self._inputs(shape, bits)
        try:
            self.tuning.force("quant_gemm", config=c["config"], streamk_mode=c["streamk_mode"], splits=c["splits"],
                              raster=c["raster"], device=self.device)
            got = torch.ops.qsvd.quant_gemm(a, sa, b, sb, bits[0], bits[1], self.out_dtype, None)
            torch.cuda.synchronize(self.device)
            if not torch.equal(got.cpu(), want):
                return "failed", None, "output differs from the CPU kernel"
            for _ in range(self.warmup):
                torch.ops.qsvd.quant_gemm(a, sa, b, sb, bits[0], bits[1], self.out_dtype, None)
            times = []
            for _ in range(self.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.ops.qsvd.quant_gemm(a, sa, b, sb, bits[0], bits[1], self.out_dtype, None)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return "ok", statistics.median(times), ""
        except RuntimeError as e:
            return "failed", None, str(e).splitlines()[0][:200]
        finally:
            self.tuning.clear(self.device)


def reduce(records: list, cc: int, tolerance: float) -> list:
    """Rules from the ok records: fewest candidates within tolerance of each
    shape's best, M buckets per bit pair, the built-in prefill as catch-all."""
    by_shape: dict = {}
    for r in records:
        if r["status"] == "ok":
            by_shape.setdefault((tuple(r["bits"]), r["M"], r["N"], r["K"]), []).append(r)
    if not by_shape:
        raise SystemExit("tune: no candidate passed; nothing to reduce")

    def cand(r):
        return (r["config"], r["streamk_mode"], r["splits"], r["raster"])

    good, rel = {}, {}
    for s, rs in by_shape.items():
        best = min(r["time_s"] for r in rs)
        good[s] = {cand(r) for r in rs if r["time_s"] <= best * (1 + tolerance)}
        for r in rs:
            rel[(cand(r), s)] = r["time_s"] / best
    # Greedy set cover: the fewest candidates that serve every shape within
    # tolerance; among those covering as many shapes, the fastest on them.
    chosen, uncovered = [], set(good)
    while uncovered:
        score: dict = {}
        for s in uncovered:
            for c in good[s]:
                n, t = score.get(c, (0, 0.0))
                score[c] = (n + 1, t - rel[(c, s)])
        c = max(sorted(score), key=lambda x: score[x])
        chosen.append(c)
        uncovered = {s for s in uncovered if c not in good[s]}
    rank = {c: i for i, c in enumerate(chosen)}
    rules = []
    for bits in sorted({s[0] for s in good}, key=lambda b: gemm_menu.PAIRS_ALL.index(b)):
        ms = sorted({s[1] for s in good if s[0] == bits})
        per_m = []
        for M in ms:
            shapes = [s for s in good if s[0] == bits and s[1] == M]
            # the chosen candidate good for the most shapes of this M (then the earliest = widest)
            pick = max(chosen, key=lambda c: (sum(c in good[s] for s in shapes), -rank[c]))
            per_m.append((M, pick))
        lo = 1
        for i, (M, pick) in enumerate(per_m):
            last = i == len(per_m) - 1
            if not last and per_m[i + 1][1] == pick:
                continue
            hi = None if last else M
            c = dict(zip(("config", "streamk_mode", "splits", "raster"), pick))
            rules.append({"m": [lo, hi], "bits": list(bits), **c})
            lo = M + 1
    catch_all = tables.builtin_choice(cc, 10**9, 8, 8) if cc == 90 else tables.builtin_choice(cc, 10**9, 4, 4)
    rules.append({"m": [1, None], "config": catch_all})
    return rules


def gain_over_default(records: list, rules: list, cc: int) -> dict:
    """Sum of the chosen rules' times vs the built-in choice's, over the shapes
    where both were timed (heuristic knobs for the built-in)."""
    times = {}
    for r in records:
        if r["status"] == "ok":
            times[(r["config"], r["streamk_mode"], r["splits"], r["raster"], r["M"], r["N"], r["K"],
                   tuple(r["bits"]))] = r["time_s"]
    parsed = [tables._rule("tuned", d, {e.name for e in gemm_menu.MENU}) for d in rules]
    tuned = base = 0.0
    shapes = 0
    for (cfg, mode, s, ras, M, N, K, bits) in list(times):
        _, rule = tables.evaluate(parsed, M, N, K, *bits)
        if rule is None or (rule.config, rule.streamk_mode, rule.splits, rule.raster) != (cfg, mode, s, ras):
            continue
        b = times.get((tables.builtin_choice(cc, M, *bits), "heuristic", 1, "heuristic", M, N, K, bits))
        if b is None:
            continue
        tuned += times[(cfg, mode, s, ras, M, N, K, bits)]
        base += b
        shapes += 1
    return {"shapes": shapes, "default_s": base, "tuned_s": tuned, "speedup": (base / tuned) if tuned else None}


def _done_keys(path: str) -> dict:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                done[rec["key"]] = rec
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsvd_kernels tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", required=True, help="MxNxK,MxNxK,...")
    p.add_argument("--bits", action="append", help="a_bits,b_bits (repeat; default 8,8)")
    p.add_argument("--out-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--configs", help="comma-separated menu names (default: every compiled one that runs)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES))
    p.add_argument("--splits", default=",".join(map(str, DEFAULT_SPLITS)))
    p.add_argument("--rasters", default=",".join(DEFAULT_RASTERS))
    p.add_argument("--tolerance", type=float, default=0.02, help="within this fraction of the best (0.02)")
    p.add_argument("--results", default="tune-results.jsonl", help="JSON lines, appended as results come")
    p.add_argument("--out", default="tuned-table.json", help="the reduced table")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--dry-run", action="store_true", help="no GPU: candidates from the menu, fake timings")
    p.add_argument("--cc", type=int, help="compute capability (10*major+minor); --dry-run only")
    p.add_argument("--gpu-name", default="dry-run GPU", help="--dry-run only")
    p.add_argument("--sm-count", type=int, default=1, help="--dry-run only")
    p.add_argument("--fake-timings", help="JSON with 'times' and 'fail' records (see the module doc)")
    args = p.parse_args(argv)

    shapes = _parse_shapes(args.shapes)
    bit_pairs = _parse_bits(args.bits)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in tables.MODES]
    if bad:
        raise SystemExit(f"tune: unknown modes {bad}")
    splits = [int(s) for s in args.splits.split(",") if s]
    rasters = [r for r in args.rasters.split(",") if r]
    if any(r not in tables.RASTERS for r in rasters):
        raise SystemExit(f"tune: rasters are {sorted(tables.RASTERS)}")

    menu = {e.name: e for e in gemm_menu.MENU}
    if args.dry_run:
        if args.cc is None:
            raise SystemExit("tune --dry-run needs --cc")
        cc, gpu_name, sm_count = args.cc, args.gpu_name, args.sm_count
        available = list(menu)
        fake_times, fake_fails = ({}, set())
        if args.fake_timings:
            with open(args.fake_timings) as f:
                fake_times, fake_fails = _fake_lookup(json.load(f))
        runner = None
        info = {"cuda_archs": "dry-run", "cutlass_version": "dry-run", "gemm_menu": "dry-run"}
    else:
        import torch

        from .. import _C
        from .. import tuning

        if not torch.cuda.is_available():
            raise SystemExit("tune: no CUDA device (use --dry-run --cc N --fake-timings FILE to exercise it)")
        props = torch.cuda.get_device_properties(args.device)
        cc, gpu_name, sm_count = 10 * props.major + props.minor, props.name, props.multi_processor_count
        available = sorted(tuning.compiled_configs())
        runner = GpuRunner(args.device, args.warmup, args.reps, getattr(torch, args.out_dtype))
        info = dict(_C.build_info())
    if args.configs:
        wanted = [c for c in args.configs.split(",") if c]
        missing = [c for c in wanted if c not in available]
        if missing:
            raise SystemExit(f"tune: configs not available here {missing}; available: {available}")
        available = wanted
    entries = [menu[n] for n in available if n in menu]

    done = _done_keys(args.results)
    records = list(done.values())
    counts = {"ok": 0, "failed": 0, "skipped": 0, "reused": 0}
    with open(args.results, "a") as out:
        for bits in bit_pairs:
            cands = candidates(entries, cc, *bits, modes, splits, rasters)
            for shape in shapes:
                for c in cands:
                    key = _key(c, shape, bits)
                    if key in done:
                        counts["reused"] += 1
                        continue
                    if runner is None:
                        if key in fake_fails:
                            status, t, note = "failed", None, "fake: check failed"
                        elif key in fake_times:
                            status, t, note = "ok", fake_times[key], "fake timing"
                        else:
                            status, t, note = "skipped", None, "no fake timing"
                    else:
                        status, t, note = runner.run(c, shape, bits)
                    rec = {"key": key, **c, "M": shape[0], "N": shape[1], "K": shape[2], "bits": list(bits),
                           "status": status, "time_s": t, "note": note}
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    records.append(rec)
                    counts[status] += 1
    print(f"tune: {counts['ok']} timed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['reused']} reused from {args.results}")

    # Only this run's shapes and pairs (the results file may hold others).
    scope = {(s, b) for s in shapes for b in bit_pairs}
    records = [r for r in records if ((r["M"], r["N"], r["K"]), tuple(r["bits"])) in scope]
    rules = reduce(records, cc, args.tolerance)
    gain = gain_over_default(records, rules, cc)
    table = {
        "schema": tables.SCHEMA,
        "match": {"gpu_name": gpu_name, "sm_count": sm_count},
        "recorded": {
            "library_commit": _commit(),
            "cutlass_version": info.get("cutlass_version") or "unknown",
            "archs": info.get("cuda_archs") or "unknown",
            "menu": info.get("gemm_menu") or "unknown",
            "measured": not args.dry_run,
            "tolerance": args.tolerance,
            "shapes": [f"{M}x{N}x{K}" for M, N, K in shapes],
            "gain_over_default": gain,
        },
        "ops": {"quant_gemm": rules},
    }
    tables.parse_table(args.out, data=table)  # the loader must accept what we write
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"tune: {len(rules)} rules ({len({r['config'] for r in rules})} configs) written to {args.out}")
    if gain["speedup"] is not None:
        kind = "measured" if not args.dry_run else "FAKE (dry run)"
        print(f"tune: {kind} total time over {gain['shapes']} shapes: default {gain['default_s']:.3e} s, "
              f"tuned {gain['tuned_s']:.3e} s")
    return 0


def _commit() -> str:
    import subprocess

    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
