"""Tuning for a new GPU (issue 14): the quant_gemm menu, the per-GPU tables,
the C++ choice with installed rules, explain(), and `tune --dry-run`.

CPU tests run everywhere; the CUDA ones need a GPU and skip with the reason.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import re

import pytest
import torch

import qsvd_kernels as qk
from qsvd_kernels import tuning
from qsvd_kernels.tuning import gemm_menu, tables, tune

MENU = gemm_menu.MENU
BITS = list(gemm_menu.PAIRS_ALL)
DEFAULTS = sorted(
    os.path.join(tables.DEFAULTS_DIR, f) for f in os.listdir(tables.DEFAULTS_DIR) if f.endswith(".json")
)
FAKE_DEVICE = 60  # a registry slot no real device uses in these tests


@pytest.fixture(autouse=True)
def _clean_rules():
    qk._C.set_quant_gemm_rules(FAKE_DEVICE, [], "table", "")
    yield
    qk._C.set_quant_gemm_rules(FAKE_DEVICE, [], "table", "")


# ---------------------------------------------------------------- the menu


def test_menu_is_consistent():
    gemm_menu.check_menu()
    names = [e.name for e in MENU]
    assert len(names) == len(set(names))
    assert len({e.enumerator for e in MENU}) == len(MENU)


def test_default_menu_is_todays_four_kernels():
    assert [e.name for e in gemm_menu.select("default")] == [
        "sm80_decode_32x64_streamk",
        "sm80_prefill_128x128_streamk",
        "sm90_decode_128x64_cluster1x1_streamk",
        "sm90_prefill_128x128_cluster2x1_streamk",
    ]


@pytest.mark.parametrize("selection", ["default", "tune", "sm80_decode_32x64_s4_streamk,sm90_128x64_cluster2x1_streamk"])
def test_every_entry_is_instantiated_for_its_bit_pairs(tmp_path, selection):
    sources = gemm_menu.generate(str(tmp_path), selection)
    text = "\n".join(open(s).read() for s in sources)
    compiled = gemm_menu.select(selection)
    for e in MENU:
        for a, b in e.pairs:
            for out in gemm_menu.OUT_TYPES:
                if e.arch == "sm80":
                    inst = f"run_sm80<GemmConfig::{e.enumerator}, {a}, {b}, DType::{out}>"
                else:
                    inst = f"run_sm90<GemmConfig::{e.enumerator}, DType::{out}>"
                assert text.count(inst) == (1 if e in compiled else 0), (selection, inst)
    dispatch = open(tmp_path / "qsvd_gemm_dispatch.inc").read()
    rows = [line for line in dispatch.splitlines() if line.startswith("{GemmConfig::")]
    assert len(rows) == sum(len(e.pairs) * len(gemm_menu.OUT_TYPES) for e in compiled)
    header = open(tmp_path / "qsvd_gemm_menu.inc").read()
    for i, e in enumerate(MENU):
        assert f"{e.enumerator} = {i}," in header
        assert f'"{e.name}"' in header


def test_default_menu_keeps_todays_file_split(tmp_path):
    """Four sm80 files (one per bit pair) and three sm90 files (one per output
    type), as before the menu: CI's parallel compile does not change."""
    names = sorted(os.path.basename(s) for s in gemm_menu.generate(str(tmp_path), "default"))
    assert names == sorted(
        [f"quant_gemm_sm80_a{a}w{b}_0.cu" for a, b in BITS] + [f"quant_gemm_sm90_{o}_0.cu" for o in ("f16", "bf16", "f32")]
    )


def test_cpu_only_generation_compiles_nothing(tmp_path):
    assert gemm_menu.generate(str(tmp_path), "tune", with_cuda=False) == []
    assert "true}," not in open(tmp_path / "qsvd_gemm_menu.inc").read().replace("false, true},", "")


def test_menu_selection_errors():
    with pytest.raises(gemm_menu.MenuError, match="unknown configs"):
        gemm_menu.select("no_such_config")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(name="sm80_prefill_128x128_streamk"), "duplicate name"),
        (dict(pairs=((8, 2),)), "pairs"),
        (dict(warp=(48, 32)), "warp"),
        (dict(tile=(128, 256, 128), warp=(64, 64), stages=5), "shared memory"),
        (dict(arch="sm70"), "arch"),
        (dict(cluster=(2, 1)), "clusters"),
    ],
)
def test_malformed_menu_entries_are_refused(change, message):
    import dataclasses

    bad = dataclasses.replace(MENU[4], **{"name": "test_bad_entry", **change})
    with pytest.raises(gemm_menu.MenuError, match=message):
        gemm_menu.check_menu(MENU + (bad,))


def test_extension_menu_matches_the_python_list():
    """One source of truth: the compiled table is generated from MENU."""
    built = qk._C.gemm_menu()
    assert [d["name"] for d in built] == [e.name for e in MENU]
    for d, e in zip(built, MENU):
        assert d["arch"] == e.arch and tuple(d["tile"]) == e.tile and d["stages"] == e.stages
        assert [tuple(p) for p in d["pairs"]] == list(e.pairs)
        assert tuple(d["cluster"]) == e.cluster and d["default"] == (e.menu == "default")
    info = qk.build_info()
    compiled = {d["name"] for d in built if d["compiled"]}
    if not info["cuda"]:
        assert compiled == set() and info["gemm_menu"] == "none"
    else:
        assert {e.name for e in MENU if e.menu == "default"} <= compiled


# ---------------------------------------------------------------- golden: defaults


GRID_M = [1, 2, 16, 31, 32, 33, 63, 64, 65, 127, 128, 1024, 4096]
GRID_NK = [(64, 64), (4096, 4096), (11008, 4096), (4096, 11008)]


def _builtin_spec(cc, M, a, b):
    """The built-in choice as quant_gemm_menu.h documents it, written out
    here (a golden, independent of the C++ and of tables.builtin_choice):
    Hopper W8A8 on the sm90 kernels (decode tile up to M = 64), everything
    else on the sm80 kernels (decode tile up to M = 32)."""
    if cc == 90 and (a, b) == (8, 8):
        return "sm90_decode_128x64_cluster1x1_streamk" if M <= 64 else "sm90_prefill_128x128_cluster2x1_streamk"
    return "sm80_decode_32x64_streamk" if M <= 32 else "sm80_prefill_128x128_streamk"


@pytest.mark.parametrize("path", DEFAULTS, ids=os.path.basename)
def test_default_tables_reproduce_the_builtin_choice(path):
    table = tables.parse_table(path)
    rules = table.rules["quant_gemm"]
    for cc_text in table.match["cc"]:
        major, minor = (int(x) for x in cc_text.split("."))
        cc = 10 * major + minor
        for M in GRID_M:
            for N, K in GRID_NK:
                for a, b in BITS:
                    _, rule = tables.evaluate(rules, M, N, K, a, b)
                    want = _builtin_spec(cc, M, a, b)
                    assert rule.config == want == tables.builtin_choice(cc, M, a, b), (cc, M, N, K, a, b)
                    assert (rule.streamk_mode, rule.splits, rule.raster) == ("heuristic", 1, "heuristic")


def test_builtin_choice_without_rules_is_default_source():
    for cc in (80, 86, 89, 90):
        for M in GRID_M:
            for a, b in BITS:
                d = qk._C.quant_gemm_decide(FAKE_DEVICE, cc, M, 4096, 4096, a, b)
                assert d["source"] == "default" and d["rule"] == -1 and d["label"] == ""
                assert d["config"] == _builtin_spec(cc, M, a, b) == tables.builtin_choice(cc, M, a, b)
                assert (d["streamk_mode"], d["splits"], d["raster"]) == ("heuristic", 1, "heuristic")


# ---------------------------------------------------------------- the loader


def _table(**over):
    t = {
        "schema": 1,
        "match": {"cc": ["8.9"]},
        "recorded": {"library_commit": "x", "cutlass_version": "4.2.0", "archs": "8.9", "menu": "tune"},
        "ops": {
            "quant_gemm": [
                {"m": [1, 16], "bits": [8, 8], "config": "sm80_decode_32x64_s4_streamk", "streamk_mode": "split_k",
                 "splits": 4},
                {"m": [17, 256], "bits": [8, 8], "config": "sm80_mid_64x128_s4_streamk",
                 "streamk_mode": "data_parallel"},
                {"m": [1, None], "config": "sm80_prefill_128x128_streamk"},
            ]
        },
    }
    t.update(over)
    return t


def _rules_edit(fn):
    t = _table()
    fn(t["ops"]["quant_gemm"])
    return t


MALFORMED = {
    "schema version": _table(schema=2),
    "no schema": {k: v for k, v in _table().items() if k != "schema"},
    "not an object": [],
    "no match": _table(match={}),
    "gpu name without sm count": _table(match={"gpu_name": "NVIDIA L40S"}),
    "cc not a list": _table(match={"cc": "8.9"}),
    "recorded incomplete": _table(recorded={"library_commit": "x"}),
    "unknown op": _table(ops={"flash": []}),
    "no rules": _table(ops={"quant_gemm": []}),
    "bad config name": _rules_edit(lambda r: r[0].update(config="sm80_nope")),
    "missing catch-all": _rules_edit(lambda r: r.pop()),
    "catch-all with bits": _rules_edit(lambda r: r[-1].update(bits=[8, 8])),
    "unsorted buckets": _rules_edit(lambda r: r.insert(0, r.pop(1))),
    "overlapping buckets": _rules_edit(lambda r: r[1].update(m=[16, 256])),
    "empty range": _rules_edit(lambda r: r[0].update(m=[8, 4])),
    "zero in range": _rules_edit(lambda r: r[0].update(m=[0, 4])),
    "bad bits": _rules_edit(lambda r: r[0].update(bits=[8, 2])),
    "bad mode": _rules_edit(lambda r: r[0].update(streamk_mode="stream_k_please")),
    "split_k with 1 split": _rules_edit(lambda r: r[0].update(splits=1)),
    "splits without split_k": _rules_edit(lambda r: r[1].update(splits=3)),
    "too many splits": _rules_edit(lambda r: r[0].update(splits=65)),
    "bad raster": _rules_edit(lambda r: r[0].update(raster="diagonal")),
    "unknown rule key": _rules_edit(lambda r: r[0].update(tile=[1, 2, 3])),
    "rule without m": _rules_edit(lambda r: r[0].pop("m")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tables_are_refused(case):
    with pytest.raises(tables.TableError):
        tables.parse_table(f"{case}.json", data=copy.deepcopy(MALFORMED[case]))


def test_malformed_table_is_skipped_with_one_warning(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps(MALFORMED["missing catch-all"]))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "good.json").write_text(json.dumps(_table()))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        found, problems = tables.load_tables([str(tmp_path)])
    assert [os.path.basename(t.path) for t in found] == ["good.json"]
    assert sorted(os.path.basename(p) for p, _ in problems) == ["bad.json", "broken.json"]
    assert len(w) == 2 and all("skipping table" in str(x.message) for x in w)


def test_valid_table_parses():
    t = tables.parse_table("ok.json", data=_table())
    r = t.rules["quant_gemm"]
    assert r[0].splits == 4 and r[1].streamk_mode == "data_parallel" and r[-1].is_catch_all


# ---------------------------------------------------------------- matching


def _write(d, name, table):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        json.dump(table, f)


def test_matching_order(tmp_path):
    d = str(tmp_path)
    _write(d, "a-cc.json", _table(match={"cc": ["8.9"]}))
    _write(d, "b-name.json", _table(match={"gpu_name": "NVIDIA  L40S", "sm_count": 142}))
    found, _ = tables.load_tables([d])
    # name + SM count first (whitespace and case do not matter) ...
    assert os.path.basename(tables.match_table(found, "nvidia l40s", 142, "8.9").path) == "b-name.json"
    # ... a variant with another SM count falls to the compute capability ...
    assert os.path.basename(tables.match_table(found, "NVIDIA L40S", 100, "8.9").path) == "a-cc.json"
    assert os.path.basename(tables.match_table(found, "NVIDIA RTX 4090", 128, "8.9").path) == "a-cc.json"
    # ... and else no table: the built-in choice.
    assert tables.match_table(found, "NVIDIA A100", 108, "8.0") is None


def test_tuning_dir_is_searched_first(tmp_path, monkeypatch):
    user, shipped = str(tmp_path / "user"), str(tmp_path / "shipped")
    _write(user, "z.json", _table())
    _write(shipped, "a.json", _table())
    monkeypatch.setenv("QSVD_TUNING_DIR", user)
    monkeypatch.setattr(tables, "TABLES_DIR", shipped)
    assert tables.search_dirs() == [user, shipped]
    found, _ = tables.load_tables()
    assert tables.match_table(found, "x", 1, "8.9").path == os.path.join(user, "z.json")
    monkeypatch.delenv("QSVD_TUNING_DIR")
    found, _ = tables.load_tables()
    assert tables.match_table(found, "x", 1, "8.9").path == os.path.join(shipped, "a.json")


def test_rules_naming_configs_not_compiled_are_dropped_with_one_warning():
    t = tables.parse_table("t.json", data=_table())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        kept = tables.compiled_rules(t, "quant_gemm", {"sm80_prefill_128x128_streamk"})
    assert [r.config for r in kept] == ["sm80_prefill_128x128_streamk"]
    assert len(w) == 1 and "sm80_decode_32x64_s4_streamk" in str(w[0].message)


# ---------------------------------------------------------------- the C++ choice with rules


def test_installed_rules_decide_or_fall_back():
    """The C++ registry applies the first matching rule; a config this build
    cannot run there gives the built-in choice (source 'fallback'), never an error."""
    t = tables.parse_table("t.json", data=_table())
    rules = t.rules["quant_gemm"]
    qk._C.set_quant_gemm_rules(FAKE_DEVICE, [r.as_json() for r in rules], "table", "/x/t.json")
    compiled = tuning.compiled_configs()
    for cc in (80, 89, 90):
        for M in GRID_M:
            for a, b in BITS:
                d = qk._C.quant_gemm_decide(FAKE_DEVICE, cc, M, 4096, 4096, a, b)
                i, rule = tables.evaluate(rules, M, 4096, 4096, a, b)
                assert d["rule"] == i and d["label"] == "/x/t.json"
                runs = rule.config in compiled and tune._runs_on(
                    next(e for e in MENU if e.name == rule.config), cc, a, b
                )
                if runs:
                    assert d["source"] == "table" and d["config"] == rule.config
                    assert (d["streamk_mode"], d["splits"]) == (rule.streamk_mode, rule.splits)
                else:
                    assert d["source"] == "fallback" and d["config"] == tables.builtin_choice(cc, M, a, b)
                    assert (d["streamk_mode"], d["splits"], d["raster"]) == ("heuristic", 1, "heuristic")
    qk._C.set_quant_gemm_rules(FAKE_DEVICE, [], "table", "")
    assert qk._C.quant_gemm_decide(FAKE_DEVICE, 89, 1, 64, 64, 8, 8)["source"] == "default"


def test_bad_rules_are_refused_by_the_extension():
    """Rules cross as named records; the extension converts and checks them
    once, naming what is wrong."""
    bad = [
        ("set_quant_gemm_rules", {"m": [1, 2], "config": "nope"}, "no config named 'nope'"),
        ("set_quant_gemm_rules", {"m": [1, 2], "config": "sm80_decode_32x64_streamk", "streamk_mode": "split_k",
                                  "splits": 1}, "knobs"),
        ("set_quant_gemm_rules", {"m": [1, 2], "config": "sm80_decode_32x64_streamk", "mm": 3}, "unknown key 'mm'"),
        ("set_quant_gemm_rules", {"m": [5, 2], "config": "sm80_decode_32x64_streamk"}, "'m' must be 1 <= lo <= hi"),
        ("set_latent_rules", {"b": [1, None], "weight_dtype": "f32"}, "'weight_dtype' 'f32'"),
        ("set_latent_rules", {"b": [1, None], "kernel": "wgmma"}, "bad 'kernel'"),
        ("set_latent_rules", {"b": [1, None], "ctas_per_sm": 0}, "plan knobs out of range"),
        ("set_hadamard_rules", {"k": [1, None], "elems_per_thread": 3}, "elems_per_thread"),
        ("set_hadamard_rules", {"k": [1, None], "dtype": "int8"}, "'dtype' 'int8'"),
        ("set_hadamard_rules", {"k": [1, 2, 3]}, "'k' is [lo, hi]"),
    ]
    for setter, record, message in bad:
        args = (FAKE_DEVICE, [record], "table", "") if setter == "set_quant_gemm_rules" else (FAKE_DEVICE, [record], "")
        with pytest.raises(RuntimeError, match=re.escape(message)):
            getattr(qk._C, setter)(*args)


def test_rule_matching_is_the_extensions_own():
    """tables.evaluate* ask the C++ matcher (first match wins, open upper
    bounds, 'any' selectors), the one the launchers use."""
    menu = {"sm80_decode_32x64_streamk", "sm80_prefill_128x128_streamk"}
    rules = [tables._rule("t", {"m": [1, 16], "bits": [8, 8], "config": "sm80_decode_32x64_streamk"}, menu),
             tables._rule("t", {"m": [1, None], "config": "sm80_prefill_128x128_streamk"}, menu)]
    assert tables.evaluate(rules, 16, 64, 64, 8, 8)[0] == 0
    assert tables.evaluate(rules, 17, 64, 64, 8, 8)[0] == 1
    assert tables.evaluate(rules, 1, 64, 64, 4, 4)[0] == 1
    assert tables.evaluate(rules[:1], 17, 64, 64, 8, 8) == (-1, None)
    lat = [tables.latent_rule("t", {"rope": False, "weight_dtype": "int8", "b": [1, 4]}),
           tables.latent_rule("t", {"b": [1, None]})]
    shape = dict(B=2, H=8, H_kv=2, r=64, d=32, bits=8, token_capacity=100)
    assert tables.evaluate_latent(lat, rope=False, weight_dtype="int8", **shape)[0] == 0
    assert tables.evaluate_latent(lat, rope=True, weight_dtype="int8", **shape)[0] == 1
    assert tables.evaluate_latent(lat, rope=False, weight_dtype="f16", **shape)[0] == 1
    had = [tables.hadamard_rule("t", {"k": [1, 512], "dtype": "bf16", "elems_per_thread": 4}),
           tables.hadamard_rule("t", {"k": [1, None], "elems_per_thread": 0})]
    assert tables.evaluate_hadamard(had, 512, "bf16")[0] == 0
    assert tables.evaluate_hadamard(had, 513, "bf16")[0] == 1
    assert tables.evaluate_hadamard(had, 8, "f16")[0] == 1


def test_explain_for_an_absent_device():
    d = qk.explain("quant_gemm", M=1, N=4096, K=4096, device=None, cc=89)
    assert d["config"] == "sm80_decode_32x64_streamk" and d["source"] == "default" and d["table"] is None
    d = qk.explain("quant_gemm", M=4096, N=4096, K=4096, device=None, cc=90)
    assert d["config"] == "sm90_prefill_128x128_cluster2x1_streamk"
    with pytest.raises(ValueError):
        qk.explain("flash_attention", M=1, N=1, K=1, device=None, cc=90)


# ---------------------------------------------------------------- latent_attention plans (fake devices)

H100 = dict(sm_count=132, smem_limit=227 * 1024)
A100 = dict(sm_count=108, smem_limit=163 * 1024)
L4 = dict(sm_count=58, smem_limit=99 * 1024)
SHAPE = dict(B=4, H=32, H_kv=8, r=1024, d=128, bits=8, weight_dtype="f16", token_capacity=8192)


def _plan(device_kw, **kw):
    args = {**SHAPE, **kw}
    return qk.explain("latent_attention", device=None, **device_kw, **args)


@pytest.mark.parametrize("dev", [H100, A100, L4], ids=["h100", "a100", "l4"])
@pytest.mark.parametrize("rope", [True, False])
def test_latent_plan_defaults(dev, rope):
    p = _plan(dev, rope=rope)
    tc = _plan(dev, rope=rope, kernel="tc")
    # auto takes the tensor-core kernel wherever it fits (not: no RoPE, r = 1024, in an L4's 99 KB)
    assert p["ok"] and p["source"] == "default" and p["split_kernel"] == ("tc" if tc["ok"] else "simt")
    assert tc["ok"] or "shared memory" in tc["reason"]
    assert p["split_smem"] <= dev["smem_limit"]
    assert 16 <= p["tile_tokens"] <= 64 and p["tile_tokens"] % 16 == 0
    assert p["splits"] * p["split_tokens"] >= SHAPE["token_capacity"]


def test_latent_plan_simt_split_count_follows_the_sm_count():
    """The automatic split count aims at about two CTAs per SM (at least 256
    tokens per split): more SMs, more splits; ctas_per_sm scales it."""
    ctas = SHAPE["B"] * SHAPE["H_kv"] * 1  # one head tile per kv group (G = 4 heads fit one CTA)
    for sms in (16, 58, 132):
        p = _plan(dict(sm_count=sms, smem_limit=227 * 1024), kernel="simt")
        assert p["ok"] and p["split_kernel"] == "simt" and p["heads_per_cta"] == 4
        want = min(-(-2 * sms // ctas), SHAPE["token_capacity"] // 256)
        assert p["splits"] == want, (sms, p)
    more = qk._C.plan_latent_attention_shape(**{k: v for k, v in SHAPE.items() if k != "weight_dtype"}, rope=True,
                                       weight="f16", sm_count=58, smem_limit=227 * 1024, kernel="simt",
                                       ctas_per_sm=8)
    assert more["splits"] > _plan(dict(sm_count=58, smem_limit=227 * 1024), kernel="simt")["splits"]


@pytest.mark.parametrize(
    "knobs, reason",
    [
        (dict(kernel="simt", tile_tokens=12), "multiple of 8"),
        (dict(kernel="tc", tile_tokens=40), "16, 32, 48 or 64"),
        (dict(kernel="simt", heads_per_cta=5), "heads_per_cta"),
        (dict(kernel="tc", rope=False, heads_per_cta=2), "16-head tiles"),
        (dict(kernel="simt", ctas_per_sm=0), "ctas_per_sm"),
    ],
)
def test_latent_plan_knobs_that_cannot_be_honoured_say_why(knobs, reason):
    p = _plan(H100, **{"rope": True, **knobs})
    assert not p["ok"] and reason in p["reason"]


def test_latent_plan_knobs_are_honoured_and_checked_against_shared_memory():
    p = _plan(H100, rope=True, kernel="simt", tile_tokens=16, heads_per_cta=2, splits=7)
    assert p["ok"] and (p["tile_tokens"], p["heads_per_cta"], p["splits"]) == (16, 2, 7)
    p = _plan(H100, rope=True, kernel="tc", tile_tokens=32)
    assert p["ok"] and p["split_kernel"] == "tc" and p["tile_tokens"] == 32
    # Where the tensor-core tile does not fit (no RoPE, r = 2048 needs more than an H100's 227 KB), auto
    # falls back to simt ...
    small = H100
    p = _plan(small, rope=False, r=2048)
    assert p["ok"] and p["split_kernel"] == "simt" and p["split_smem"] <= small["smem_limit"]
    # ... forcing the tensor-core kernel there says why, and so does a tile that needs too much.
    p = _plan(small, rope=False, r=2048, kernel="tc")
    assert not p["ok"] and "shared memory" in p["reason"]
    p = _plan(dict(sm_count=20, smem_limit=40 * 1024), rope=True, kernel="simt", tile_tokens=32)
    assert not p["ok"] and "shared memory" in p["reason"]


def test_latent_plan_env_source(monkeypatch):
    monkeypatch.setenv("QSVD_LATENT_KERNEL", "simt")
    monkeypatch.setenv("QSVD_LATENT_SPLITS", "3")
    p = _plan(H100, rope=True)
    assert p["source"] == "env" and p["split_kernel"] == "simt" and p["splits"] == 3


def test_hadamard_variant_knob_registry():
    assert qk._C.hadamard_variant(FAKE_DEVICE) == 0
    qk._C.set_hadamard_variant(FAKE_DEVICE, 4)
    try:
        assert qk._C.hadamard_variant(FAKE_DEVICE) == 4
        with pytest.raises(RuntimeError, match="min_elems_per_thread"):
            qk._C.set_hadamard_variant(FAKE_DEVICE, 3)
    finally:
        qk._C.set_hadamard_variant(FAKE_DEVICE, 0)
    with pytest.raises(ValueError):
        tuning.force("hadamard", elems_per_thread=5, device=FAKE_DEVICE)


def test_latent_plan_knob_registry_checks_ranges():
    qk._C.set_latent_plan(FAKE_DEVICE, True, "simt", 4, 16, 2, 2)
    qk._C.set_latent_plan(FAKE_DEVICE, False)
    with pytest.raises(ValueError):
        tuning.force("latent_attention", kernel="fast", device=FAKE_DEVICE)
    with pytest.raises(ValueError):
        tuning.force("latent_attention", ctas_per_sm=0, device=FAKE_DEVICE)
    with pytest.raises(ValueError):
        tuning.force("flash", device=FAKE_DEVICE)
    tuning.clear(FAKE_DEVICE)


# ---------------------------------------------------------------- tune --dry-run


def _fake_timings(shapes, bits_list, cc):
    """A fake GPU: the s4 decode tile is best for M <= 16, the 64x128 tile for
    larger M; split-K helps the decode tile a little; one candidate 'fails'."""
    times, fail = [], []
    entries = [e for e in MENU if e.arch == "sm80"]
    for bits in bits_list:
        for M, N, K in shapes:
            for c in tune.candidates(entries, cc, *bits, tune.DEFAULT_MODES, tune.DEFAULT_SPLITS, ("heuristic",)):
                if c["config"] == "sm80_prefill_256x128_s3_streamk":
                    continue  # no timing: recorded as skipped
                base = 10.0 + (len(c["config"]) % 7)
                if c["config"] == "sm80_decode_32x64_s4_streamk":
                    base = 1.0 if M <= 16 else 20.0
                if c["config"] == "sm80_mid_64x128_s4_streamk":
                    base = 1.0 if M > 16 else 30.0
                if c["streamk_mode"] == "split_k":
                    base *= 0.99 if c["splits"] == 4 else 1.05
                rec = {**c, "M": M, "N": N, "K": K, "bits": list(bits)}
                if c["config"] == "sm80_mid_64x64_s5_streamk" and c["streamk_mode"] == "heuristic":
                    fail.append(rec)
                else:
                    times.append({**rec, "time_s": base * 1e-5})
    return {"times": times, "fail": fail}


def test_tune_dry_run_end_to_end(tmp_path, capsys):
    shapes = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (512, 11008, 4096)]
    bits = [(8, 8), (8, 4)]
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps(_fake_timings(shapes, bits, 89)))
    results, out = tmp_path / "results.jsonl", tmp_path / "table.json"
    argv = ["tune", "--dry-run", "--cc", "89", "--gpu-name", "NVIDIA L40S", "--sm-count", "142",
            "--shapes", ",".join(f"{M}x{N}x{K}" for M, N, K in shapes), "--bits", "8,8", "--bits", "8,4",
            "--rasters", "heuristic", "--fake-timings", str(fake), "--results", str(results), "--out", str(out)]
    from qsvd_kernels import cli

    assert cli.main(argv) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert any(r["status"] == "failed" for r in lines)
    assert any(r["status"] == "skipped" for r in lines)  # the config with no fake timing
    table = tables.parse_table(str(out))
    assert table.match == {"gpu_name": "NVIDIA L40S", "sm_count": 142}
    assert table.recorded["measured"] is False
    rules = table.rules["quant_gemm"]
    # Two configs cover everything within 2 %: split-K decode for small M, the 64x128 tile above.
    used = {r.config for r in rules[:-1]}
    assert used == {"sm80_decode_32x64_s4_streamk", "sm80_mid_64x128_s4_streamk"}
    _, r = tables.evaluate(rules, 1, 4096, 4096, 8, 8)
    assert (r.config, r.streamk_mode, r.splits) == ("sm80_decode_32x64_s4_streamk", "split_k", 4)
    _, r = tables.evaluate(rules, 512, 11008, 4096, 8, 4)
    assert r.config == "sm80_mid_64x128_s4_streamk"
    # A rerun reuses every recorded result (a crash loses nothing).
    n = len(lines)
    assert cli.main(argv) == 0
    assert len(results.read_text().splitlines()) == n
    assert "reused" in capsys.readouterr().out


def test_tune_dry_run_survives_a_truncated_results_file(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text('{"key": "cut in the midd')
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps(_fake_timings([(1, 64, 64)], [(8, 8)], 86)))
    assert tune.main(["--dry-run", "--cc", "86", "--shapes", "1x64x64", "--fake-timings", str(fake),
                      "--results", str(results), "--out", str(tmp_path / "t.json")]) == 0
    tables.parse_table(str(tmp_path / "t.json"))


# ---------------------------------------------------------------- CUDA


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def _cuda_build():
    if not qk.build_info()["cuda"]:
        pytest.skip("the extension was built without CUDA")


@needs_gpu
def test_cuda_explain_reports_an_installed_table(tmp_path, monkeypatch):
    _cuda_build()
    props = torch.cuda.get_device_properties(0)
    cc = f"{props.major}.{props.minor}"
    _write(str(tmp_path), "mine.json", _table(match={"gpu_name": props.name, "sm_count": props.multi_processor_count},
                                             ops={"quant_gemm": [{"m": [1, None], "config": qk._C.quant_gemm_default_config(
                                                 10 * props.major + props.minor, 1, 8, 8)}]}))
    monkeypatch.setenv("QSVD_TUNING_DIR", str(tmp_path))
    try:
        tuning.install(devices=[0])
        d = qk.explain("quant_gemm", M=1, N=256, K=256, device="cuda:0")
        assert d["source"] == "table" and d["table"] == str(tmp_path / "mine.json"), (cc, d)
    finally:
        tuning.clear()


@needs_gpu
def test_cuda_explain_reports_latent_and_hadamard_table_rules(tmp_path, monkeypatch):
    """A table's latent_attention and hadamard rules reach the launchers:
    explain says source=table with the path, and the calls still agree with
    the CPU kernels (hadamard bit for bit, latent_attention within the bound)."""
    _cuda_build()
    props = torch.cuda.get_device_properties(0)
    t = _op_table(latent=[{"rope": False, "b": [1, None], "kernel": "simt", "splits": 3},
                          {"b": [1, None], "kernel": "auto"}],
                  had=[{"k": [1, None], "dtype": "f16", "elems_per_thread": 8}, {"k": [1, None], "elems_per_thread": 0}],
                  match={"gpu_name": props.name, "sm_count": props.multi_processor_count})
    del t["ops"]["quant_gemm"]
    _write(str(tmp_path), "mine.json", t)
    monkeypatch.setenv("QSVD_TUNING_DIR", str(tmp_path))
    path = str(tmp_path / "mine.json")
    try:
        tuning.install(devices=[0])
        d = qk.explain("hadamard", K=4096, dtype="f16", device="cuda:0")
        assert (d["source"], d["table"], d["min_elems_per_thread"]) == ("table", path, 8)
        x = torch.randn(64, 4096).half()
        assert torch.equal(torch.ops.qsvd.hadamard_transform(x.cuda(), None).cpu(),
                           torch.ops.qsvd.hadamard_transform(x, None))
        p = qk.explain("latent_attention", B=2, H=8, H_kv=2, r=64, d=64, rope=False, token_capacity=256,
                       device="cuda:0")
        assert (p["source"], p["table"], p["split_kernel"], p["splits"]) == ("table", path, "simt", 3), p
        from qsvd_kernels.tuning import tune_ops

        runner = tune_ops.LatentRunner(0, 0, 1)
        q, dargs, cpu_out, cpu_bound, bounds = runner._inputs((2, 8, 2, 64, 64, 256), (False, "f16", 8))
        got = torch.ops.qsvd.latent_attention(q, *dargs)[0].cpu().double()
        allowed = bounds["cuda"].double() + cpu_bound.double() + 2 * 2.0**-11 * cpu_out.double().abs() + 2 * 2.0**-24
        assert ((got - cpu_out.double()).abs() <= allowed).all()
    finally:
        tuning.clear()


@needs_gpu
def test_cuda_every_compiled_entry_and_knob_is_bit_exact():
    """Every compiled config x bit pair x output type x stream-K mode against
    the CPU kernel, bit for bit."""
    _cuda_build()
    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    compiled = [e for e in MENU if e.name in tuning.compiled_configs()]
    g = torch.Generator().manual_seed(0)
    M, N, K = 37, 200, 256
    try:
        for e in compiled:
            for a_bits, b_bits in e.pairs:
                if not tune._runs_on(e, cc, a_bits, b_bits):
                    continue
                a = torch.randint(-7, 8, (M, K), generator=g, dtype=torch.int8)
                b = torch.randint(-7, 8, (N, K), generator=g, dtype=torch.int8)

                def pack(q, bits):
                    if bits == 8:
                        return q
                    u = (q & 0xF).to(torch.uint8)
                    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()

                A, B = pack(a, a_bits), pack(b, b_bits)
                sa, sb = torch.rand(M, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5
                for out in (torch.float16, torch.bfloat16, torch.float32):
                    want = torch.ops.qsvd.quant_gemm(A, sa, B, sb, a_bits, b_bits, out, None)
                    for mode, splits in (("heuristic", 1), ("data_parallel", 1), ("split_k", 2), ("split_k", 4)):
                        tuning.force("quant_gemm", config=e.name, streamk_mode=mode, splits=splits, device=0)
                        d = qk.explain("quant_gemm", M=M, N=N, K=K, a_bits=a_bits, b_bits=b_bits, device="cuda:0")
                        assert d["source"] == "forced" and d["config"] == e.name
                        got = torch.ops.qsvd.quant_gemm(A.cuda(), sa.cuda(), B.cuda(), sb.cuda(), a_bits, b_bits,
                                                        out, None)
                        assert torch.equal(got.cpu(), want), (e.name, a_bits, b_bits, out, mode, splits)
    finally:
        tuning.clear()


def test_tune_reads_a_compressed_models_shapes(tmp_path):
    """`tune --artefact DIR`: every layer's down-projection (N = r, K = E) and
    query up-projection (N = E_q, K = r) at each token count, with the
    layer's bit pairs."""
    pytest.importorskip("transformers")
    from qsvd_kernels import cli
    from qsvd_kernels import compress as qc
    from qsvd_kernels.integrations import models as M

    model, _, _ = M.tiny_llama(seed=0)
    comp = qc.Compressor(model, M.random_token_batches(256, 8, 16, seed=0), progress=False)
    cm = comp.compress(qc.CompressionConfig(qc.Budget("mean_rank", 32), qc.QuantConfig.parse("W8A4"),
                                            allocation="uniform"))
    cm.save(str(tmp_path / "a"))
    argv = cli.artefact_gemm_args(["--dry-run", "--artefact", str(tmp_path / "a"), "--tokens", "1,64"])
    assert "--artefact" not in argv and "--tokens" not in argv
    shapes = argv[argv.index("--shapes") + 1].split(",")
    assert shapes == ["1x32x64", "1x64x32", "64x32x64", "64x64x32"]  # r = 32, E = E_q = 64, deduplicated
    bits = [argv[i + 1] for i, a in enumerate(argv) if a == "--bits"]
    assert bits == ["4,8"]  # W8A4: activations and latent at 4 bits, weights at 8 (one pair, deduplicated)
    assert cli.main(["tune", "--artefact", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------- latent_attention / hadamard tables


@pytest.fixture()
def _clean_op_rules():
    warnings.filterwarnings("ignore", message=".*dropping quant_gemm rules.*", category=RuntimeWarning)
    qk._C.set_latent_rules(FAKE_DEVICE, [], "")
    qk._C.set_hadamard_rules(FAKE_DEVICE, [], "")
    yield
    qk._C.set_latent_rules(FAKE_DEVICE, [], "")
    qk._C.set_hadamard_rules(FAKE_DEVICE, [], "")
    qk._C.set_hadamard_variant(FAKE_DEVICE, 0)


LATENT_RULES = [
    {"rope": True, "weight_dtype": "f16", "r": [512, 1024], "b": [1, 8], "kernel": "simt", "splits": 3},
    {"rope": True, "weight_dtype": "f16", "r": [512, 1024], "b": [9, None], "ctx": [1, 4096], "kernel": "tc",
     "tile_tokens": 32},
    {"rope": False, "b": [1, None], "ctx": [1, 1024], "kernel": "simt", "tile_tokens": 16, "ctas_per_sm": 4},
    {"b": [1, None], "kernel": "auto"},
]
HADAMARD_RULES = [
    {"k": [1, 1024], "dtype": "f16", "elems_per_thread": 4},
    {"k": [1025, None], "dtype": "f16", "elems_per_thread": 8},
    {"k": [1, 4096], "dtype": "bf16", "elems_per_thread": 2},
    {"k": [1, None], "elems_per_thread": 0},
]


def _op_table(latent=None, had=None, **over):
    t = _table(**over)
    t["ops"]["latent_attention"] = copy.deepcopy(LATENT_RULES if latent is None else latent)
    t["ops"]["hadamard"] = copy.deepcopy(HADAMARD_RULES if had is None else had)
    return t


def _latent_edit(fn):
    t = _op_table()
    fn(t["ops"]["latent_attention"])
    return t


def _hadamard_edit(fn):
    t = _op_table()
    fn(t["ops"]["hadamard"])
    return t


OP_MALFORMED = {
    "latent: no rules": _op_table(latent=[]),
    "latent: missing catch-all": _latent_edit(lambda r: r.pop()),
    "latent: catch-all with a key": _latent_edit(lambda r: r[-1].update(rope=True)),
    "latent: unsorted b buckets": _latent_edit(lambda r: r.insert(0, r.pop(1))),
    "latent: overlapping b buckets": _latent_edit(lambda r: r[1].update(b=[8, None])),
    "latent: overlapping ctx buckets": _latent_edit(
        lambda r: r.insert(3, {"rope": False, "b": [1, None], "ctx": [512, 2048], "kernel": "tc"})),
    "latent: empty range": _latent_edit(lambda r: r[0].update(r=[1024, 512])),
    "latent: bad kernel": _latent_edit(lambda r: r[0].update(kernel="fast")),
    "latent: bad weight dtype": _latent_edit(lambda r: r[0].update(weight_dtype="fp8")),
    "latent: bad bits": _latent_edit(lambda r: r[0].update(bits=2)),
    "latent: rope not a bool": _latent_edit(lambda r: r[0].update(rope=1)),
    "latent: negative splits": _latent_edit(lambda r: r[0].update(splits=-1)),
    "latent: too many splits": _latent_edit(lambda r: r[0].update(splits=1025)),
    "latent: simt tile not a multiple of 8": _latent_edit(lambda r: r[0].update(tile_tokens=12)),
    "latent: tc tile not a multiple of 16": _latent_edit(lambda r: r[1].update(tile_tokens=24)),
    "latent: heads per cta over 16": _latent_edit(lambda r: r[0].update(heads_per_cta=17)),
    "latent: ctas per sm 0": _latent_edit(lambda r: r[0].update(ctas_per_sm=0)),
    "latent: unknown key": _latent_edit(lambda r: r[0].update(M=[1, 2])),
    "hadamard: no rules": _op_table(had=[]),
    "hadamard: missing catch-all": _hadamard_edit(lambda r: r.pop()),
    "hadamard: catch-all with a dtype": _hadamard_edit(lambda r: r[-1].update(dtype="f16")),
    "hadamard: unsorted buckets": _hadamard_edit(lambda r: r.insert(0, r.pop(1))),
    "hadamard: overlapping buckets": _hadamard_edit(lambda r: r[1].update(k=[1000, None])),
    "hadamard: bad elems per thread": _hadamard_edit(lambda r: r[0].update(elems_per_thread=3)),
    "hadamard: bad dtype": _hadamard_edit(lambda r: r[0].update(dtype="f64")),
    "hadamard: rule without k": _hadamard_edit(lambda r: r[0].pop("k")),
    "hadamard: rule without elems": _hadamard_edit(lambda r: r[0].pop("elems_per_thread")),
}


@pytest.mark.parametrize("case", sorted(OP_MALFORMED))
def test_malformed_latent_and_hadamard_rules_are_refused(case):
    with pytest.raises(tables.TableError):
        tables.parse_table(f"{case}.json", data=copy.deepcopy(OP_MALFORMED[case]))


def test_malformed_op_rules_skip_the_table_with_one_warning(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps(OP_MALFORMED["latent: overlapping b buckets"]))
    (tmp_path / "good.json").write_text(json.dumps(_op_table()))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        found, problems = tables.load_tables([str(tmp_path)])
    assert [os.path.basename(t.path) for t in found] == ["good.json"]
    assert len(w) == 1 and "overlaps" in str(w[0].message)


def test_latent_and_hadamard_rules_parse_and_round_trip():
    t = tables.parse_table("ok.json", data=_op_table())
    lat, had = t.rules["latent_attention"], t.rules["hadamard"]
    assert lat[0].kernel == "simt" and lat[0].splits == 3 and lat[0].r == (512, 1024) and lat[-1].is_catch_all
    assert had[1].elems_per_thread == 8 and had[-1].is_catch_all
    for rules, parse in ((lat, tables.latent_rule), (had, tables.hadamard_rule)):
        assert [parse("x", r.as_json()) for r in rules] == rules
    # A table may hold any subset of the ops.
    only = _op_table()
    del only["ops"]["quant_gemm"]
    assert set(tables.parse_table("only.json", data=only).rules) == {"latent_attention", "hadamard"}


def _decide_latent(device, dev_kw, **kw):
    args = {**SHAPE, **kw}
    return qk.explain("latent_attention", device=None, rules_device=device, **dev_kw, **args)


def test_installed_latent_rules_decide_fall_back_or_default(_clean_op_rules):
    t = tables.parse_table("/tables/l40s.json", data=_op_table())
    tuning.install_table(t, FAKE_DEVICE)
    try:
        # rule 0: RoPE, f16, r in [512, 1024], B <= 8 -> simt with 3 splits
        p = _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)
        assert p["ok"] and p["source"] == "table" and p["table"] == "/tables/l40s.json" and p["rule"] == 0
        assert (p["split_kernel"], p["splits"]) == ("simt", 3) and p["knobs"]["kernel"] == "simt"
        # rule 1: B > 8 and ctx <= 4096 -> tc, tile 32
        p = _decide_latent(FAKE_DEVICE, H100, rope=True, B=16, token_capacity=4096)
        assert p["source"] == "table" and p["rule"] == 1 and (p["split_kernel"], p["tile_tokens"]) == ("tc", 32)
        # ctx above rule 1's bucket: the catch-all (auto = the default plan, but from the table)
        p = _decide_latent(FAKE_DEVICE, H100, rope=True, B=16, token_capacity=8192)
        d = _decide_latent(-2, H100, rope=True, B=16, token_capacity=8192)
        assert p["rule"] == 3 and p["source"] == "table" and d["source"] == "default" and d["table"] is None
        assert {k: p[k] for k in PLAN_KEYS} == {k: d[k] for k in PLAN_KEYS}
        # int8 weights do not match rule 0's weight_dtype
        assert _decide_latent(FAKE_DEVICE, H100, rope=True, B=4, weight_dtype="i8")["rule"] == 3
        # rule 2 (no RoPE, ctx <= 1024: simt, tile 16, 4 CTAs per SM) on an L4-sized device
        p = _decide_latent(FAKE_DEVICE, L4, rope=False, token_capacity=1024)
        assert p["rule"] == 2 and (p["split_kernel"], p["tile_tokens"]) == ("simt", 16)
        # A rule the plan checker refuses for this call falls back to the default plan: no error.
        # rule 1's tc tile of 32 with RoPE, r = 1024 does not fit a 40 KB device.
        small = dict(sm_count=20, smem_limit=60 * 1024)
        p = _decide_latent(FAKE_DEVICE, small, rope=True, B=16, token_capacity=4096)
        d = _decide_latent(-2, small, rope=True, B=16, token_capacity=4096)
        assert p["rule"] == 1 and p["source"] == "fallback" and p["rule_refused"], p
        assert {k: p.get(k) for k in PLAN_KEYS} == {k: d.get(k) for k in PLAN_KEYS}
        # rule 0 asks for heads_per_cta the group cannot give -> fallback, not an error
        qk._C.set_latent_rules(FAKE_DEVICE, [tables.latent_rule("x", {"b": [1, None], "heads_per_cta": 16})
                                             .as_json()], "x.json")
        p = _decide_latent(FAKE_DEVICE, H100, rope=True)  # group 4 < 16
        assert p["source"] == "fallback" and "heads_per_cta" in p["rule_refused"] and p["ok"]
    finally:
        tuning.clear(FAKE_DEVICE)
    assert _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)["source"] == "default"


def test_explain_and_the_launcher_share_one_plan_function(_clean_op_rules, monkeypatch):
    """explain() asks csrc/plan.h's latent_attention, the launcher's own
    function: a forced plan, the environment (parsed there, a bad value
    naming its variable) and a table each move it, in that precedence."""
    t = tables.parse_table("/tables/t.json", data=_op_table())
    assert _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)["source"] == "default"
    tuning.install_table(t, FAKE_DEVICE)
    try:
        assert _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)["source"] == "table"
        monkeypatch.setenv("QSVD_LATENT_SPLITS", "5")
        p = _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)
        assert p["source"] == "env" and p["splits"] == 5
        for bad in ("3x", "-1", "100000"):
            monkeypatch.setenv("QSVD_LATENT_SPLITS", bad)
            with pytest.raises(RuntimeError, match="QSVD_LATENT_SPLITS must be an integer"):
                _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)
        monkeypatch.setenv("QSVD_LATENT_SPLITS", "5")
        tuning.force("latent_attention", kernel="simt", splits=2, device=FAKE_DEVICE)
        p = _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)
        assert p["source"] == "forced" and p["splits"] == 2 and p["split_kernel"] == "simt"
    finally:
        tuning.clear(FAKE_DEVICE)


def test_latent_precedence_forced_over_env_over_table(_clean_op_rules, monkeypatch):
    t = tables.parse_table("/tables/t.json", data=_op_table())
    tuning.install_table(t, FAKE_DEVICE)
    try:
        monkeypatch.setenv("QSVD_LATENT_KERNEL", "tc")
        p = _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)
        assert p["source"] == "env" and p["split_kernel"] == "tc"
        monkeypatch.delenv("QSVD_LATENT_KERNEL")
        assert _decide_latent(FAKE_DEVICE, H100, rope=True, B=4)["source"] == "table"
    finally:
        tuning.clear(FAKE_DEVICE)


PLAN_KEYS = ("ok", "split_kernel", "splits", "split_tokens", "tile_tokens", "heads_per_cta", "r_slices",
             "slice_cols", "split_smem", "combine_heads", "combine_smem")
GOLDEN_DEVICES = [H100, A100, L4, dict(sm_count=16, smem_limit=48 * 1024)]


@pytest.mark.parametrize("path", DEFAULTS, ids=os.path.basename)
def test_default_tables_reproduce_the_default_latent_plan(path, _clean_op_rules):
    t = tables.parse_table(path)
    assert t.rules["latent_attention"][-1].is_catch_all
    tuning.install_table(t, FAKE_DEVICE)
    n = 0
    try:
        for dev in GOLDEN_DEVICES:
            for rope in (True, False):
                for wd in ("f16", "bf16", "i8"):
                    for r, d in ((64, 64), (130, 128), (512, 128), (1024, 128), (2048, 64), (4096, 128)):
                        for B, H, H_kv in ((1, 32, 8), (7, 32, 32), (64, 16, 1)):
                            for ctx in (16, 4096, 131072):
                                kw = dict(B=B, H=H, H_kv=H_kv, r=r, d=d, rope=rope, weight_dtype=wd,
                                          token_capacity=ctx)
                                got = _decide_latent(FAKE_DEVICE, dev, **kw)
                                want = _decide_latent(-2, dev, **kw)
                                assert want["source"] == "default"
                                # where even the default plan cannot be made, the catch-all's is refused too
                                assert got["source"] == ("table" if want["ok"] else "fallback"), (kw, got)
                                assert {k: got.get(k) for k in PLAN_KEYS} == {k: want.get(k) for k in PLAN_KEYS}, kw
                                n += 1
    finally:
        tuning.clear(FAKE_DEVICE)
    assert n == len(GOLDEN_DEVICES) * 2 * 3 * 6 * 3 * 3


def _decide_hadamard(device, K, dtype):
    return qk.explain("hadamard", device=None, rules_device=device, K=K, dtype=dtype)


@pytest.mark.parametrize("path", DEFAULTS, ids=os.path.basename)
def test_default_tables_reproduce_the_builtin_hadamard_variant(path, _clean_op_rules):
    t = tables.parse_table(path)
    tuning.install_table(t, FAKE_DEVICE)
    try:
        for K in (1, 2, 64, 96, 128, 1024, 1536, 4096, 5120, 11008, 14336, 32768):
            for dtype in ("f16", "bf16", "f32"):
                got = _decide_hadamard(FAKE_DEVICE, K, dtype)
                assert got["min_elems_per_thread"] == 0 and got["source"] == "table" and got["table"] == path
                assert _decide_hadamard(-2, K, dtype)["source"] == "default"
    finally:
        tuning.clear(FAKE_DEVICE)


def test_installed_hadamard_rules_and_precedence(_clean_op_rules):
    tuning.install_table(tables.parse_table("/t/h.json", data=_op_table()), FAKE_DEVICE)
    try:
        assert _decide_hadamard(FAKE_DEVICE, 512, "f16")["min_elems_per_thread"] == 4
        d = _decide_hadamard(FAKE_DEVICE, 4096, "f16")
        assert (d["min_elems_per_thread"], d["rule"], d["source"], d["table"]) == (8, 1, "table", "/t/h.json")
        assert _decide_hadamard(FAKE_DEVICE, 4096, "bf16")["min_elems_per_thread"] == 2
        d = _decide_hadamard(FAKE_DEVICE, 8192, "bf16")
        assert (d["min_elems_per_thread"], d["rule"]) == (0, 3)
        assert _decide_hadamard(FAKE_DEVICE, 512, "f32")["rule"] == 3
        # forced > table
        qk._C.set_hadamard_variant(FAKE_DEVICE, 32)
        d = _decide_hadamard(FAKE_DEVICE, 512, "f16")
        assert (d["min_elems_per_thread"], d["source"], d["table"]) == (32, "forced", None)
    finally:
        tuning.clear(FAKE_DEVICE)
    assert _decide_hadamard(FAKE_DEVICE, 512, "f16")["source"] == "default"


# ---------------------------------------------------------------- tune --dry-run: latent_attention, hadamard

LATENT_TUNE_SHAPES = [(1, 32, 8, 512, 128, 4096), (32, 32, 8, 512, 128, 4096), (32, 32, 8, 512, 128, 32768)]


def _fake_latent(shapes):
    """A fake GPU: simt with one split and 16-token tiles is best for B = 1,
    tc with its own split count at 4 CTAs per SM for B = 32; one candidate
    'fails'. (Candidates whose plan repeats an earlier one's are not timed.)"""
    times, fail = [], []
    C = qk._C
    from qsvd_kernels.tuning import tune_ops

    cands = tune_ops.latent_candidates(["simt", "tc"], [0, 1, 4, 16], [0, 16, 32], [2, 4])
    for shape in shapes:
        for c in cands:
            B = shape[0]
            t = 10.0
            if c["kernel"] == "simt" and c["splits"] == 1 and c["tile_tokens"] == 16 and c["ctas_per_sm"] == 2:
                t = 1.0 if B == 1 else 20.0
            if c["kernel"] == "tc" and c["splits"] == 0 and c["tile_tokens"] == 0 and c["ctas_per_sm"] == 4:
                t = 1.0 if B > 1 else 20.0
            rec = {**c, **dict(zip(("B", "H", "H_kv", "r", "d", "ctx"), shape))}
            if c["kernel"] == "simt" and c["splits"] == 4 and c["tile_tokens"] == 0 and c["ctas_per_sm"] == 2:
                fail.append(rec)
            else:
                times.append({**rec, "time_s": t * 1e-5})
    assert C is not None
    return {"latent_attention": {"times": times, "fail": fail}}


def _fake_hadamard(shapes, dtypes):
    times, fail = [], []
    for dtype in dtypes:
        for rows, K in shapes:
            for ept in (0, 1, 2, 4, 8, 32):
                t = 10.0 - (5.0 if (ept == 8 and K >= 4096) or (ept == 2 and K < 4096) else 0.0)
                rec = {"rows": rows, "K": K, "dtype": dtype, "elems_per_thread": ept}
                if ept == 32:
                    continue  # no timing: recorded as skipped
                if ept == 1:
                    fail.append(rec)
                else:
                    times.append({**rec, "time_s": t * 1e-5})
    return {"hadamard": {"times": times, "fail": fail}}


def test_tune_dry_run_latent_attention_and_hadamard_end_to_end(tmp_path, capsys, _clean_op_rules):
    from qsvd_kernels import cli

    fake = tmp_path / "fake.json"
    had_shapes = [(1, 1024), (512, 1024), (1, 4096), (512, 14336)]
    fake.write_text(json.dumps({**_fake_latent(LATENT_TUNE_SHAPES),
                                **_fake_hadamard(had_shapes, ["f16", "bf16"])}))
    results, out = tmp_path / "results.jsonl", tmp_path / "table.json"
    common = ["tune", "--dry-run", "--cc", "90", "--gpu-name", "NVIDIA H200", "--sm-count", "132",
              "--fake-timings", str(fake), "--results", str(results), "--out", str(out)]
    lat_argv = common + ["--op", "latent_attention", "--weight-dtype", "f16", "--latent-bits", "8"] + \
        [x for s in LATENT_TUNE_SHAPES for x in ("--latent-shapes", ",".join(map(str, s)))]
    assert cli.main(lat_argv) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert all(r["op"] == "latent_attention" for r in lines)
    assert any(r["status"] == "failed" for r in lines)
    assert any(r["status"] == "skipped" and r["note"].startswith("same plan as") for r in lines)
    table = tables.parse_table(str(out))
    rules = table.rules["latent_attention"]
    assert rules[-1].is_catch_all and table.recorded["measured"] is False
    shape = dict(H=32, H_kv=8, r=512, d=128, bits=8, rope=True, weight_dtype="f16")
    _, r = tables.evaluate_latent(rules, B=1, token_capacity=4096, **shape)
    assert (r.kernel, r.splits, r.tile_tokens, r.ctas_per_sm) == ("simt", 1, 16, 2)
    _, r = tables.evaluate_latent(rules, B=32, token_capacity=32768, **shape)
    assert (r.kernel, r.splits, r.ctas_per_sm) == ("tc", 0, 4)
    _, r = tables.evaluate_latent(rules, B=1, token_capacity=4096, **{**shape, "r": 256})
    assert r.is_catch_all  # another r: the default plan
    gain = table.recorded["latent_attention_gain_over_default"]
    assert gain["shapes"] == 3 and gain["tuned_s"] < gain["default_s"]
    n_lat = len(lines)

    # hadamard into the same table (its latent rules are kept)
    had_argv = common + ["--op", "hadamard", "--hadamard-shapes", ",".join(f"{a}x{b}" for a, b in had_shapes),
                         "--hadamard-dtypes", "f16,bf16"]
    assert cli.main(had_argv) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    had_lines = lines[n_lat:]
    assert all(r["op"] == "hadamard" for r in had_lines) and len(had_lines) == 4 * 2 * 6
    assert {r["status"] for r in had_lines} == {"ok", "failed", "skipped"}
    table = tables.parse_table(str(out))
    assert set(table.rules) == {"latent_attention", "hadamard"}
    had = table.rules["hadamard"]
    assert had[-1].is_catch_all
    assert tables.evaluate_hadamard(had, 1024, "f16")[1].elems_per_thread == 2
    assert tables.evaluate_hadamard(had, 14336, "bf16")[1].elems_per_thread == 8
    assert len(had) <= 5  # two variants per dtype at most, plus the catch-all

    # The loader installs what tune wrote, and explain reports it as the table's choice.
    tuning.install_table(table, FAKE_DEVICE)
    try:
        d = _decide_hadamard(FAKE_DEVICE, 4096, "f16")
        assert (d["source"], d["table"], d["min_elems_per_thread"]) == ("table", str(out), 8)
        p = _decide_latent(FAKE_DEVICE, dict(sm_count=132, smem_limit=227 * 1024), B=1, H=32, H_kv=8, r=512, d=128,
                           rope=True, token_capacity=4096)
        assert p["source"] == "table" and p["table"] == str(out)
        assert (p["split_kernel"], p["splits"], p["tile_tokens"]) == ("simt", 1, 16)
    finally:
        tuning.clear(FAKE_DEVICE)

    # Reruns reuse every recorded result.
    assert cli.main(lat_argv) == 0 and cli.main(had_argv) == 0
    assert len(results.read_text().splitlines()) == len(lines)
    assert "reused" in capsys.readouterr().out


def test_tune_latent_records_plans_the_checker_refuses(tmp_path):
    out = tmp_path / "t.json"
    results = tmp_path / "r.jsonl"
    shape = (1, 16, 1, 2048, 128, 4096)
    fake = {"latent_attention": {"times": [{**tune_ops_default(), **dict(zip(("B", "H", "H_kv", "r", "d", "ctx"),
                                                                             shape)), "time_s": 1e-5}]}}
    (tmp_path / "f.json").write_text(json.dumps(fake))
    assert tune.main(["--dry-run", "--cc", "80", "--smem-limit", str(99 * 1024), "--op", "latent_attention",
                      "--no-rope", "--latent-shapes", ",".join(map(str, shape)), "--fake-timings",
                      str(tmp_path / "f.json"), "--results", str(results), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    refused = [r for r in lines if r["note"].startswith("plan refused")]
    assert refused and all(r["kernel"] == "tc" for r in refused)  # no RoPE, r = 2048: tc needs > 99 KB
    tables.parse_table(str(out))


def tune_ops_default():
    from qsvd_kernels.tuning import tune_ops

    return dict(tune_ops.LATENT_DEFAULT)
