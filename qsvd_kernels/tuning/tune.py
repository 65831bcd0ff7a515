"""python -m qsvd_kernels tune: time quant_gemm's compiled configs and knobs
(or, with --op, latent_attention's plans or hadamard's variants; see
tune_ops.py) on the local GPU for given shapes, and reduce the results to a
small table.

    python -m qsvd_kernels tune --op latent_attention --latent-shapes 1,32,8,512,128,4096 \\
        --latent-shapes 16,32,8,512,128,4096 --results tune.jsonl --out my-gpu.json
    python -m qsvd_kernels tune --op hadamard --hadamard-shapes 1x4096,512x4096,512x11008 \\
        --results tune.jsonl --out my-gpu.json

An --out that already holds a table for this GPU keeps its other ops' rules
(so one table can collect all three ops).

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
    """The launcher's rule (quant_gemm_menu.h), compiled in or not."""
    from .. import _C

    return _C.quant_gemm_runs_on(entry.name, cc, a_bits, b_bits)


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

    from .tune_ops import cover

    def cand(r):
        return (r["config"], r["streamk_mode"], r["splits"], r["raster"])

    good, chosen = cover({s: [{**r, "cand": cand(r)} for r in rs] for s, rs in by_shape.items()}, tolerance)
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
    p.add_argument("--op", default="quant_gemm", choices=("quant_gemm", "latent_attention", "hadamard"),
                   help="what to tune (default quant_gemm)")
    p.add_argument("--shapes", help="quant_gemm: MxNxK,MxNxK,...")
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
    g = p.add_argument_group("latent_attention (--op latent_attention)")
    g.add_argument("--latent-shapes", action="append", help="B,H,H_kv,r,d,ctx (repeat, or separate with ';'); "
                   "ctx = token capacity (every sequence full)")
    g.add_argument("--rope", action=argparse.BooleanOptionalAction, default=True, help="RoPE tables (default) or not")
    g.add_argument("--weight-dtype", default="f16", choices=sorted(tables.LATENT_WEIGHTS))
    g.add_argument("--latent-bits", type=int, default=8, choices=(4, 8))
    g.add_argument("--latent-kernels", default="simt,tc", help="split kernels to try besides the default (auto)")
    g.add_argument("--latent-splits", default="0,1,4,16", help="KV splits to try (0 = choose)")
    g.add_argument("--latent-tiles", default="0,16,32", help="tile_tokens to try (0 = choose)")
    g.add_argument("--latent-ctas", default="2,4", help="ctas_per_sm to try (2 = the default)")
    g.add_argument("--smem-limit", type=int, help="--dry-run: opt-in shared memory per block in bytes (default: "
                   "163 KB for cc 80/87, 227 KB for 90, else 99 KB)")
    g = p.add_argument_group("hadamard (--op hadamard)")
    g.add_argument("--hadamard-shapes", help="ROWSxK,ROWSxK,... (K a supported Hadamard size)")
    g.add_argument("--hadamard-dtypes", default="f16,bf16", help="input dtypes: f16, bf16, f32")
    args = p.parse_args(argv)

    if args.op != "quant_gemm":
        return _main_op(args)
    if not args.shapes:
        raise SystemExit("tune: --shapes MxNxK,... is required for quant_gemm")
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
                        status, t, note = _fake_result(key, fake_times, fake_fails)
                    else:
                        status, t, note = runner.run(c, shape, bits)
                    rec = {"key": key, **c, "M": shape[0], "N": shape[1], "K": shape[2], "bits": list(bits),
                           "status": status, "time_s": t, "note": note}
                    _append(out, rec)
                    records.append(rec)
                    counts[status] += 1
    print(f"tune: {counts['ok']} timed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['reused']} reused from {args.results}")

    # Only this run's shapes and pairs (the results file may hold others).
    scope = {(s, b) for s in shapes for b in bit_pairs}
    records = [r for r in records if r.get("op", "quant_gemm") == "quant_gemm"
               and ((r["M"], r["N"], r["K"]), tuple(r["bits"])) in scope]
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
    if os.path.exists(args.out):  # keep latent_attention / hadamard rules of a table for this GPU
        try:
            old = tables.parse_table(args.out)
        except tables.TableError:
            old = None
        if old is not None and old.match == table["match"]:
            with open(args.out) as f:
                kept = json.load(f)
            table["ops"] = {**kept["ops"], "quant_gemm": rules}
            table["recorded"] = {**kept["recorded"], **table["recorded"],
                                 "measured": bool(kept["recorded"].get("measured", True)) and not args.dry_run}
    return _write_table(args, table, f"{len(rules)} rules ({len({r['config'] for r in rules})} configs)", gain)


def _device_info(args):
    """(cc, gpu_name, sm_count, smem_limit, build info) of the device, or of the dry run."""
    if args.dry_run:
        if args.cc is None:
            raise SystemExit("tune --dry-run needs --cc")
        smem = args.smem_limit
        if smem is None:
            smem = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024}.get(args.cc, 99 * 1024)
        info = {"cuda_archs": "dry-run", "cutlass_version": "dry-run", "gemm_menu": "dry-run"}
        return args.cc, args.gpu_name, args.sm_count, smem, info
    import torch

    from .. import _C

    if not torch.cuda.is_available():
        raise SystemExit("tune: no CUDA device (use --dry-run --cc N --fake-timings FILE to exercise it)")
    props = torch.cuda.get_device_properties(args.device)
    smem = getattr(props, "shared_memory_per_block_optin", None) or args.smem_limit
    if smem is None:
        raise SystemExit("tune: this torch does not report the opt-in shared memory; pass --smem-limit")
    return 10 * props.major + props.minor, props.name, props.multi_processor_count, smem, dict(_C.build_info())


def _fake_result(key, fake_times: dict, fake_fails: set) -> tuple:
    """(status, time, note) of a --dry-run candidate from the fake-timings input."""
    if key in fake_fails:
        return "failed", None, "fake: check failed"
    if key in fake_times:
        return "ok", fake_times[key], "fake timing"
    return "skipped", None, "no fake timing"


def _append(out, rec: dict) -> None:
    out.write(json.dumps(rec) + "\n")
    out.flush()
    os.fsync(out.fileno())


def _main_op(args) -> int:
    """tune --op latent_attention | hadamard (tune_ops.py)."""
    from .. import _C

    from . import tune_ops as T

    cc, gpu_name, sm_count, smem_limit, info = _device_info(args)
    fake = {}
    if args.dry_run and args.fake_timings:
        with open(args.fake_timings) as f:
            fake = json.load(f)
    done = _done_keys(args.results)
    counts = {"ok": 0, "failed": 0, "skipped": 0, "reused": 0}
    records = []
    with open(args.results, "a") as out:
        if args.op == "latent_attention":
            shapes = T.parse_latent_shapes(args.latent_shapes)
            variant = (args.rope, args.weight_dtype, args.latent_bits)
            kernels = [k for k in args.latent_kernels.split(",") if k]
            if any(k not in tables.LATENT_KERNELS for k in kernels):
                raise SystemExit(f"tune: --latent-kernels are {sorted(tables.LATENT_KERNELS)}")
            ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
            cands = T.latent_candidates(kernels, ints(args.latent_splits), ints(args.latent_tiles),
                                        ints(args.latent_ctas))
            fake_times, fake_fails = T.fake_latent_lookup(fake, variant)
            runner = None if args.dry_run else T.LatentRunner(args.device, args.warmup, args.reps)
            for shape in shapes:
                seen = {}
                for c in cands:
                    key = T.latent_key(c, shape, variant)
                    if key in done:
                        counts["reused"] += 1
                        records.append(done[key])
                        continue
                    plan = T.plan_of(_C, c, shape, variant, sm_count, smem_limit)
                    if not plan["ok"]:
                        status, t, note = "skipped", None, f"plan refused: {plan['reason']}"
                    elif T.plan_signature(plan) in seen:
                        status, t, note = "skipped", None, f"same plan as {seen[T.plan_signature(plan)]}"
                    else:
                        seen[T.plan_signature(plan)] = key
                        status, t, note = (_fake_result(key, fake_times, fake_fails) if runner is None
                                           else runner.run(c, shape, variant))
                    rec = {"key": key, "op": "latent_attention", **c, "shape": list(shape), "rope": variant[0],
                           "weight_dtype": variant[1], "bits": variant[2], "status": status, "time_s": t,
                           "note": note, "plan": {k: plan.get(k) for k in ("split_kernel", "splits", "tile_tokens",
                                                                           "heads_per_cta", "split_smem")}}
                    _append(out, rec)
                    records.append(rec)
                    counts[status] += 1
            scope = {tuple(s) for s in shapes}
            records = [r for r in records if r.get("op") == "latent_attention" and tuple(r["shape"]) in scope
                       and (r["rope"], r["weight_dtype"], r["bits"]) == variant]
            rules = T.reduce_latent(records, variant, args.tolerance)
            gain = T.gain_latent(records, rules, variant)
            described = [",".join(map(str, s)) for s in shapes]
        else:
            shapes = T.parse_hadamard_shapes(args.hadamard_shapes)
            dtypes = [d for d in args.hadamard_dtypes.split(",") if d]
            if any(d not in tables.HADAMARD_DTYPES for d in dtypes):
                raise SystemExit(f"tune: --hadamard-dtypes are {sorted(tables.HADAMARD_DTYPES)}")
            bad = [K for _, K in shapes if not _C.is_supported_hadamard_dim(K)]
            if bad:
                raise SystemExit(f"tune: hadamard does not serve K = {bad}")
            fake_times, fake_fails = T.fake_hadamard_lookup(fake)
            runner = None if args.dry_run else T.HadamardRunner(args.device, args.warmup, args.reps)
            for dtype in dtypes:
                for shape in shapes:
                    for ept in T.HADAMARD_EPTS:
                        key = T.hadamard_key(ept, shape, dtype)
                        if key in done:
                            counts["reused"] += 1
                            records.append(done[key])
                            continue
                        if runner is None:
                            status, t, note = _fake_result(key, fake_times, fake_fails)
                        else:
                            status, t, note = runner.run(ept, shape, dtype)
                        rec = {"key": key, "op": "hadamard", "elems_per_thread": ept, "rows": shape[0], "K": shape[1],
                               "dtype": dtype, "status": status, "time_s": t, "note": note}
                        _append(out, rec)
                        records.append(rec)
                        counts[status] += 1
            rules = T.reduce_hadamard(records, args.tolerance)
            gain = T.gain_hadamard(records, rules)
            described = [f"{r}x{K}" for r, K in shapes]
    print(f"tune: {counts['ok']} timed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['reused']} reused from {args.results}")
    table = _merged_table(args.out, gpu_name, sm_count, info, args, args.op, rules, described, gain)
    return _write_table(args, table, f"{len(rules)} {args.op} rules", gain)


def _write_table(args, table: dict, what: str, gain: dict) -> int:
    tables.parse_table(args.out, data=table)  # the loader must accept what we write
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"tune: {what} written to {args.out}")
    if gain["speedup"] is not None:
        kind = "measured" if not args.dry_run else "FAKE (dry run)"
        print(f"tune: {kind} total time over {gain['shapes']} shapes: default {gain['default_s']:.3e} s, "
              f"tuned {gain['tuned_s']:.3e} s")
    return 0


def _merged_table(path, gpu_name, sm_count, info, args, op, rules, described, gain) -> dict:
    """A new table, or the table at path (same match) with op's rules replaced:
    the three tune runs of bench/gpu_check.sh write one table."""
    match = {"gpu_name": gpu_name, "sm_count": sm_count}
    table = None
    if os.path.exists(path):
        try:
            old = tables.parse_table(path)
        except tables.TableError:
            old = None
        if old is not None and old.match == match:
            with open(path) as f:
                table = json.load(f)
    if table is None:
        table = {"schema": tables.SCHEMA, "match": match,
                 "recorded": {"library_commit": _commit(), "cutlass_version": info.get("cutlass_version") or "unknown",
                              "archs": info.get("cuda_archs") or "unknown", "menu": info.get("gemm_menu") or "unknown",
                              "measured": not args.dry_run},
                 "ops": {}}
    table["ops"][op] = rules
    rec = table["recorded"]
    rec["measured"] = bool(rec.get("measured", True)) and not args.dry_run
    rec[f"{op}_shapes"] = described
    rec[f"{op}_tolerance"] = args.tolerance
    rec[f"{op}_gain_over_default"] = gain
    return table


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
