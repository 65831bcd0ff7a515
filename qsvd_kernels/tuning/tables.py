"""Per-GPU tuning tables: JSON data, validated here, installed into the
extension (``_C.set_quant_gemm_rules``, ``_C.set_latent_rules``,
``_C.set_hadamard_rules``) per device. Each rule crosses as its JSON record
(``as_json``), converted once in C++ (csrc/tuning_records.h); matching a
shape against rules is the launchers' C++ (``_C.match_rule``), never a
Python copy.

Where tables are looked for, in this order: ``$QSVD_TUNING_DIR`` (if set),
then ``qsvd_kernels/tuning/tables/`` (shipped with the package). For each CUDA
device the most specific match wins:
  1. ``match.gpu_name`` + ``match.sm_count`` equal the device's;
  2. ``match.cc`` lists its compute capability ("8.9");
  3. no table: the built-in choice (``quant_gemm_menu.h: select_config``).
Within one level ``$QSVD_TUNING_DIR`` comes first, then files in name order.

A table (schema 1)::

    {"schema": 1,
     "match": {"gpu_name": "NVIDIA L40S", "sm_count": 142} | {"cc": ["8.9"]},
     "recorded": {"library_commit": "...", "cutlass_version": "4.2.0", "archs": "8.9",
                  "menu": "tune", "measured": true, "gain_over_default": "...", "note": "..."},
     "ops": {"quant_gemm": [rule, ..., catch-all],
             "latent_attention": [rule, ..., catch-all],   # optional, see LatentRule
             "hadamard": [rule, ..., catch-all]}}          # optional, see HadamardRule

A quant_gemm rule: ``m: [lo, hi]`` (an M bucket; hi null = unbounded),
optional ``n``, ``k`` ranges, optional ``bits: [a_bits, b_bits]``, then
``config`` (a menu name) and knobs ``streamk_mode`` (heuristic |
data_parallel | split_k), ``splits`` (2..64 with split_k, else 1) and
``raster`` (heuristic | along_m | along_n). Rules are tried in order and the
first match wins; within the rules of one selector (same bits, n, k) the M
buckets must ascend without overlap, and the last rule must be a catch-all
(``m: [1, null]``, no n, k or bits).

latent_attention and hadamard rules: see LatentRule and HadamardRule below
(keys, knobs, bucket order); their C++ side is
include/qsvd/kernels/tuning_rules.h.

Problems never make a call fail: a malformed table is skipped with one
warning (TableError says why); a rule naming a config that is in the menu but
not compiled into this build is dropped with one warning; a rule whose config
cannot serve a call (wrong arch or bit pair) gives the built-in choice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

from . import gemm_menu

SCHEMA = 1
TABLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")
DEFAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults")
INT_MAX = 2**63 - 1
MODES = {"heuristic": 0, "data_parallel": 1, "split_k": 2}
RASTERS = {"heuristic": 0, "along_m": 1, "along_n": 2}
MAX_SPLITS = 64
OPS = ("quant_gemm", "latent_attention", "hadamard")
_RULE_KEYS = {"m", "n", "k", "bits", "config", "streamk_mode", "splits", "raster", "note"}


class TableError(ValueError):
    """A table that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class GemmRule:
    m: tuple
    n: tuple
    k: tuple
    bits: tuple | None
    config: str
    streamk_mode: str = "heuristic"
    splits: int = 1
    raster: str = "heuristic"

    @property
    def is_catch_all(self) -> bool:
        return self.m == (1, INT_MAX) and self.n == (1, INT_MAX) and self.k == (1, INT_MAX) and self.bits is None

    def as_json(self) -> dict:
        d = {"m": [self.m[0], None if self.m[1] == INT_MAX else self.m[1]]}
        for key in ("n", "k"):
            lo, hi = getattr(self, key)
            if (lo, hi) != (1, INT_MAX):
                d[key] = [lo, None if hi == INT_MAX else hi]
        if self.bits is not None:
            d["bits"] = list(self.bits)
        d.update(config=self.config, streamk_mode=self.streamk_mode, splits=self.splits, raster=self.raster)
        return d


@dataclasses.dataclass
class Table:
    path: str
    match: dict
    recorded: dict
    rules: dict  # op -> [GemmRule] | [LatentRule] | [HadamardRule]

    def specificity(self) -> int:
        return 1 if "gpu_name" in self.match else 2


def _range(where, v):
    if not (isinstance(v, list) and len(v) == 2):
        raise TableError(f"{where}: a range is [lo, hi] (hi null = unbounded), got {v!r}")
    lo, hi = v
    hi = INT_MAX if hi is None else hi
    if not (isinstance(lo, int) and isinstance(hi, int)) or isinstance(lo, bool) or lo < 1 or hi < lo:
        raise TableError(f"{where}: a range needs integers 1 <= lo <= hi, got {v!r}")
    return (lo, hi)


def _check_object(where, d, keys) -> None:
    if not isinstance(d, dict):
        raise TableError(f"{where}: a rule is an object")
    extra = set(d) - keys
    if extra:
        raise TableError(f"{where}: unknown keys {sorted(extra)}")


def _rule(where, d, menu_names) -> GemmRule:
    _check_object(where, d, _RULE_KEYS)
    if "m" not in d or "config" not in d:
        raise TableError(f"{where}: a rule needs 'm' (an M bucket) and 'config'")
    m = _range(f"{where}.m", d["m"])
    n = _range(f"{where}.n", d["n"]) if "n" in d else (1, INT_MAX)
    k = _range(f"{where}.k", d["k"]) if "k" in d else (1, INT_MAX)
    bits = d.get("bits")
    if bits is not None:
        if not (isinstance(bits, list) and tuple(bits) in gemm_menu.PAIR_BITS):
            raise TableError(f"{where}.bits: one of {[list(p) for p in gemm_menu.PAIRS_ALL]}, got {bits!r}")
        bits = tuple(bits)
    config = d["config"]
    if config not in menu_names:
        raise TableError(f"{where}.config: {config!r} is not in the quant_gemm menu")
    mode = d.get("streamk_mode", "heuristic")
    if mode not in MODES:
        raise TableError(f"{where}.streamk_mode: one of {sorted(MODES)}, got {mode!r}")
    splits = d.get("splits", 1)
    if not isinstance(splits, int) or isinstance(splits, bool):
        raise TableError(f"{where}.splits: an integer, got {splits!r}")
    if mode == "split_k" and not 2 <= splits <= MAX_SPLITS:
        raise TableError(f"{where}.splits: split_k needs 2..{MAX_SPLITS} splits, got {splits}")
    if mode != "split_k" and splits != 1:
        raise TableError(f"{where}.splits: only split_k takes splits, got {splits} with {mode}")
    raster = d.get("raster", "heuristic")
    if raster not in RASTERS:
        raise TableError(f"{where}.raster: one of {sorted(RASTERS)}, got {raster!r}")
    return GemmRule(m, n, k, bits, config, mode, splits, raster)


def check_rules(where: str, rules: list) -> None:
    """Sorted, non-overlapping M buckets per selector, and a final catch-all."""
    if not rules:
        raise TableError(f"{where}: no rules")
    if not rules[-1].is_catch_all:
        raise TableError(f"{where}: the last rule must be a catch-all (m [1, null], no n, k or bits)")
    groups: dict = {}
    for i, r in enumerate(rules):
        groups.setdefault((r.n, r.k, r.bits), []).append((i, r))
    for sel, members in groups.items():
        prev = None
        for i, r in members:
            if prev is not None:
                if r.m[0] <= prev.m[0]:
                    raise TableError(f"{where}[{i}]: M buckets of one selector must ascend (m {list(r.m)} after "
                                     f"{list(prev.m)})")
                if r.m[0] <= prev.m[1]:
                    raise TableError(f"{where}[{i}]: M bucket {list(r.m)} overlaps {list(prev.m)}")
            prev = r


# -- latent_attention ---------------------------------------------------------
#
# A rule: selectors (all optional) ``rope`` (bool), ``weight_dtype`` (f16 |
# bf16 | int8), ``bits`` (4 | 8), ``r``, ``d``, ``group`` (H / H_kv) ranges,
# and the buckets ``b`` (batch) and ``ctx`` (token capacity = max_blocks *
# block_size, capped by the RoPE table); then the plan knobs ``kernel`` (auto
# | simt | tc), ``splits`` (0 = choose, else 1..1024), ``tile_tokens`` (0 =
# choose; simt: 8..32 step 8, tc: 16..64 step 16), ``heads_per_cta`` (0 =
# choose, else 1..16) and ``ctas_per_sm`` (1..64, 2 = the default). Within the
# rules of one selector (same rope, weight_dtype, bits, r, d, group) the (b,
# ctx) buckets ascend (by b, then ctx) and do not overlap; the last rule is a
# catch-all (no key but b [1, null] / ctx [1, null]), outside those checks. A rule whose plan the
# plan checker refuses for a call gives the default plan for that call.

LATENT_KERNELS = {"auto": 0, "simt": 1, "tc": 2}
LATENT_WEIGHTS = ("f16", "bf16", "int8")
MAX_LATENT_SPLITS = 1024
_LATENT_KEYS = {"rope", "weight_dtype", "bits", "r", "d", "group", "b", "ctx", "kernel", "splits", "tile_tokens",
                "heads_per_cta", "ctas_per_sm", "note"}
FULL = (1, INT_MAX)


@dataclasses.dataclass(frozen=True)
class LatentRule:
    rope: bool | None = None
    weight_dtype: str | None = None
    bits: int | None = None
    r: tuple = FULL
    d: tuple = FULL
    group: tuple = FULL
    b: tuple = FULL
    ctx: tuple = FULL
    kernel: str = "auto"
    splits: int = 0
    tile_tokens: int = 0
    heads_per_cta: int = 0
    ctas_per_sm: int = 2

    @property
    def selector(self) -> tuple:
        return (self.rope, self.weight_dtype, self.bits, self.r, self.d, self.group)

    @property
    def is_catch_all(self) -> bool:
        return self.selector == (None, None, None, FULL, FULL, FULL) and self.b == FULL and self.ctx == FULL

    @property
    def knobs(self) -> dict:
        return {"kernel": self.kernel, "splits": self.splits, "tile_tokens": self.tile_tokens,
                "heads_per_cta": self.heads_per_cta, "ctas_per_sm": self.ctas_per_sm}

    def as_json(self) -> dict:
        out = {}
        for key in ("rope", "weight_dtype", "bits"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("r", "d", "group", "b", "ctx"):
            lo, hi = getattr(self, key)
            if (lo, hi) != FULL or key == "b":
                out[key] = [lo, None if hi == INT_MAX else hi]
        out.update(self.knobs)
        return out


def _int(where, v, lo, hi, what=""):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise TableError(f"{where}: an integer in [{lo}, {hi}]{what}, got {v!r}")
    return v


def latent_rule(where, d) -> LatentRule:
    _check_object(where, d, _LATENT_KEYS)
    kw = {}
    if "rope" in d:
        if not isinstance(d["rope"], bool):
            raise TableError(f"{where}.rope: true or false, got {d['rope']!r}")
        kw["rope"] = d["rope"]
    if "weight_dtype" in d:
        if d["weight_dtype"] not in LATENT_WEIGHTS:
            raise TableError(f"{where}.weight_dtype: one of {sorted(LATENT_WEIGHTS)}, got {d['weight_dtype']!r}")
        kw["weight_dtype"] = d["weight_dtype"]
    if "bits" in d:
        if d["bits"] not in (4, 8) or isinstance(d["bits"], bool):
            raise TableError(f"{where}.bits: 4 or 8, got {d['bits']!r}")
        kw["bits"] = d["bits"]
    for key in ("r", "d", "group", "b", "ctx"):
        if key in d:
            kw[key] = _range(f"{where}.{key}", d[key])
    kernel = d.get("kernel", "auto")
    if kernel not in LATENT_KERNELS:
        raise TableError(f"{where}.kernel: one of {sorted(LATENT_KERNELS)}, got {kernel!r}")
    kw["kernel"] = kernel
    kw["splits"] = _int(f"{where}.splits", d.get("splits", 0), 0, MAX_LATENT_SPLITS, " (0 = choose)")
    tile = _int(f"{where}.tile_tokens", d.get("tile_tokens", 0), 0, 64, " (0 = choose)")
    if tile:
        if kernel == "simt" and (tile % 8 or tile > 32):
            raise TableError(f"{where}.tile_tokens: the CUDA-core kernel takes 8, 16, 24 or 32, got {tile}")
        if kernel == "tc" and tile % 16:
            raise TableError(f"{where}.tile_tokens: the tensor-core kernels take 16, 32, 48 or 64, got {tile}")
        if kernel == "auto" and tile % 16:
            raise TableError(f"{where}.tile_tokens: with kernel auto, 16 or 32 (both kernels), got {tile}")
        if kernel == "auto" and tile > 32:
            raise TableError(f"{where}.tile_tokens: with kernel auto, 16 or 32 (both kernels), got {tile}")
    kw["tile_tokens"] = tile
    kw["heads_per_cta"] = _int(f"{where}.heads_per_cta", d.get("heads_per_cta", 0), 0, 16, " (0 = choose)")
    kw["ctas_per_sm"] = _int(f"{where}.ctas_per_sm", d.get("ctas_per_sm", 2), 1, 64)
    return LatentRule(**kw)


def _overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def check_latent_rules(where: str, rules: list) -> None:
    """Per selector, (b, ctx) buckets ascending and disjoint; a final catch-all."""
    if not rules:
        raise TableError(f"{where}: no rules")
    if not rules[-1].is_catch_all:
        raise TableError(f"{where}: the last rule must be a catch-all (no keys but b [1, null])")
    groups: dict = {}
    for i, r in enumerate(rules[:-1]):  # the catch-all stands apart: it serves what nothing before it matched
        groups.setdefault(r.selector, []).append((i, r))
    for members in groups.values():
        for j in range(1, len(members)):
            i, r = members[j]
            _, prev = members[j - 1]
            if (r.b[0], r.ctx[0]) <= (prev.b[0], prev.ctx[0]):
                raise TableError(f"{where}[{i}]: (b, ctx) buckets of one selector must ascend (b {list(r.b)}, ctx "
                                 f"{list(r.ctx)} after b {list(prev.b)}, ctx {list(prev.ctx)})")
            for _, q in members[:j]:
                if _overlap(r.b, q.b) and _overlap(r.ctx, q.ctx):
                    raise TableError(f"{where}[{i}]: bucket b {list(r.b)}, ctx {list(r.ctx)} overlaps b {list(q.b)}, "
                                     f"ctx {list(q.ctx)}")


def evaluate_latent(rules: list, **shape):
    """(index, rule) of the first matching latent rule, or (-1, None): the
    launchers' own matching (csrc/tuning_records.h)."""
    return _first_match("latent_attention", rules, shape)


# -- hadamard -----------------------------------------------------------------
#
# A rule: ``k`` (a K bucket, required), optional ``dtype`` (f16 | bf16 | f32),
# then ``elems_per_thread`` (0 = the built-in variant, or 1, 2, 4, 8, 32: the
# compiled variant with at least that many elements per thread that serves K,
# else the built-in one). Within one dtype the K buckets ascend without
# overlap; the last rule is a catch-all (k [1, null], no dtype), outside that
# check.

HADAMARD_DTYPES = ("f16", "bf16", "f32")
HADAMARD_EPT = (0, 1, 2, 4, 8, 32)
_HADAMARD_KEYS = {"k", "dtype", "elems_per_thread", "note"}


@dataclasses.dataclass(frozen=True)
class HadamardRule:
    k: tuple = FULL
    dtype: str | None = None
    elems_per_thread: int = 0

    @property
    def is_catch_all(self) -> bool:
        return self.k == FULL and self.dtype is None

    def as_json(self) -> dict:
        out = {"k": [self.k[0], None if self.k[1] == INT_MAX else self.k[1]]}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        out["elems_per_thread"] = self.elems_per_thread
        return out


def hadamard_rule(where, d) -> HadamardRule:
    _check_object(where, d, _HADAMARD_KEYS)
    if "k" not in d or "elems_per_thread" not in d:
        raise TableError(f"{where}: a rule needs 'k' (a K bucket) and 'elems_per_thread'")
    k = _range(f"{where}.k", d["k"])
    dtype = d.get("dtype")
    if dtype is not None and dtype not in HADAMARD_DTYPES:
        raise TableError(f"{where}.dtype: one of {sorted(HADAMARD_DTYPES)}, got {dtype!r}")
    ept = d["elems_per_thread"]
    if ept not in HADAMARD_EPT or isinstance(ept, bool):
        raise TableError(f"{where}.elems_per_thread: one of {list(HADAMARD_EPT)}, got {ept!r}")
    return HadamardRule(k, dtype, ept)


def check_hadamard_rules(where: str, rules: list) -> None:
    """Per dtype, ascending disjoint K buckets; a final catch-all."""
    if not rules:
        raise TableError(f"{where}: no rules")
    if not rules[-1].is_catch_all:
        raise TableError(f"{where}: the last rule must be a catch-all (k [1, null], no dtype)")
    prev: dict = {}
    for i, r in enumerate(rules[:-1]):  # the catch-all stands apart
        p = prev.get(r.dtype)
        if p is not None:
            if r.k[0] <= p.k[0]:
                raise TableError(f"{where}[{i}]: K buckets of one dtype must ascend (k {list(r.k)} after {list(p.k)})")
            if r.k[0] <= p.k[1]:
                raise TableError(f"{where}[{i}]: K bucket {list(r.k)} overlaps {list(p.k)}")
        prev[r.dtype] = r


def evaluate_hadamard(rules: list, K: int, dtype: str):
    """(index, rule) of the first matching hadamard rule, or (-1, None)."""
    return _first_match("hadamard", rules, {"K": K, "dtype": dtype})


def parse_table(path: str, data=None, menu_names=None) -> Table:
    """Validates one table; raises TableError (never anything else) when unusable."""
    if menu_names is None:
        menu_names = {e.name for e in gemm_menu.MENU}
    name = os.path.basename(path)
    if data is None:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise TableError(f"{name}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise TableError(f"{name}: a table is a JSON object")
    if data.get("schema") != SCHEMA:
        raise TableError(f"{name}: schema must be {SCHEMA}, got {data.get('schema')!r}")
    match = data.get("match")
    if not isinstance(match, dict):
        raise TableError(f"{name}: 'match' is an object")
    if "gpu_name" in match or "sm_count" in match:
        if not (isinstance(match.get("gpu_name"), str) and isinstance(match.get("sm_count"), int)
                and set(match) == {"gpu_name", "sm_count"}):
            raise TableError(f"{name}: match by device is {{'gpu_name': str, 'sm_count': int}}")
    elif "cc" in match:
        cc = match["cc"]
        if set(match) != {"cc"} or not (isinstance(cc, list) and cc and all(isinstance(c, str) for c in cc)):
            raise TableError(f"{name}: match by compute capability is {{'cc': ['8.9', ...]}}")
    else:
        raise TableError(f"{name}: match needs gpu_name + sm_count, or cc")
    recorded = data.get("recorded")
    need = ("library_commit", "cutlass_version", "archs", "menu")
    if not isinstance(recorded, dict) or any(k not in recorded for k in need):
        raise TableError(f"{name}: 'recorded' must give {list(need)}")
    ops = data.get("ops")
    if not isinstance(ops, dict) or not ops:
        raise TableError(f"{name}: 'ops' maps an op to its rules")
    unknown = set(ops) - set(OPS)
    if unknown:
        raise TableError(f"{name}: no tuning rules for ops {sorted(unknown)} (known: {list(OPS)})")
    rules = {}
    for op, lst in ops.items():
        if not isinstance(lst, list):
            raise TableError(f"{name}: ops.{op} is a list of rules")
        if op == "quant_gemm":
            parsed = [_rule(f"{name}: ops.{op}[{i}]", d, menu_names) for i, d in enumerate(lst)]
            check_rules(f"{name}: ops.{op}", parsed)
        elif op == "latent_attention":
            parsed = [latent_rule(f"{name}: ops.{op}[{i}]", d) for i, d in enumerate(lst)]
            check_latent_rules(f"{name}: ops.{op}", parsed)
        else:
            parsed = [hadamard_rule(f"{name}: ops.{op}[{i}]", d) for i, d in enumerate(lst)]
            check_hadamard_rules(f"{name}: ops.{op}", parsed)
        rules[op] = parsed
    return Table(path=path, match=match, recorded=recorded, rules=rules)


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def search_dirs() -> list:
    dirs = []
    env = os.environ.get("QSVD_TUNING_DIR")
    if env:
        dirs.append(env)
    dirs.append(TABLES_DIR)
    return dirs


def load_tables(dirs=None, warn=True) -> tuple:
    """(valid tables in search order, [(path, TableError)]) of every *.json."""
    tables, problems = [], []
    for d in search_dirs() if dirs is None else dirs:
        if not os.path.isdir(d):
            continue
        for fname in sorted(os.listdir(d)):
            if not fname.endswith(".json"):
                continue
            path = os.path.join(d, fname)
            try:
                tables.append(parse_table(path))
            except TableError as e:
                problems.append((path, e))
                if warn:
                    warnings.warn(f"qsvd tuning: skipping table {path}: {e}", RuntimeWarning, stacklevel=2)
    return tables, problems


def match_table(tables: list, gpu_name: str, sm_count: int, cc: str):
    """The table for a device (most specific level first, then search order), or None."""
    for t in tables:
        if "gpu_name" in t.match and _norm(t.match["gpu_name"]) == _norm(gpu_name) and t.match["sm_count"] == sm_count:
            return t
    for t in tables:
        if "cc" in t.match and cc in t.match["cc"]:
            return t
    return None


def compiled_rules(table: Table, op: str, compiled: set, warn=True) -> list:
    """The table's rules for op minus those naming a config not compiled in
    (one warning per table). The catch-all may go too: then the built-in choice
    serves what no remaining rule matches."""
    rules = table.rules.get(op, [])
    kept = [r for r in rules if r.config in compiled]
    dropped = sorted({r.config for r in rules if r.config not in compiled})
    if dropped and warn:
        warnings.warn(
            f"qsvd tuning: {table.path}: dropping {op} rules naming configs not compiled into this build "
            f"{dropped} (build with QSVD_GEMM_MENU=tune or QSVD_GEMM_MENU={','.join(dropped)})",
            RuntimeWarning,
            stacklevel=2,
        )
    return kept


def builtin_choice(cc: int, M: int, a_bits: int, b_bits: int) -> str:
    """quant_gemm's built-in config for a call (select_config, quant_gemm_menu.h)."""
    return _C().quant_gemm_default_config(cc, M, a_bits, b_bits)


def evaluate(rules: list, M: int, N: int, K: int, a_bits: int, b_bits: int):
    """(index, rule) of the first matching quant_gemm rule, or (-1, None)."""
    return _first_match("quant_gemm", rules, {"M": M, "N": N, "K": K, "a_bits": a_bits, "b_bits": b_bits})


def _C():
    from .. import _C as ext

    return ext


def _first_match(op: str, rules: list, shape: dict):
    """The launchers' rule matching, in C++ (one implementation; ctest covers
    it): the rules cross as their JSON records."""
    i = _C().match_rule(op, [r.as_json() for r in rules], shape)
    return (i, rules[i]) if i >= 0 else (-1, None)
