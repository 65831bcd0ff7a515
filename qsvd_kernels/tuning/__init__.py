"""Tuning for a new GPU: the quant_gemm menu, per-GPU tables as data, what a
call would run (``explain``), and the ``tune`` command.

Layering: this package sits at the ops level. It imports qsvd_kernels._C and
nothing from model, compress or integrations.

  gemm_menu.py   the one list of quant_gemm kernel configs (setup.py generates
                 the C++ enum, table, dispatch and instantiations from it)
  tables.py      JSON tables: schema, validation, device matching (rules for
                 quant_gemm, latent_attention and hadamard)
  tables/        tables shipped with the package (none measured yet)
  defaults/      the built-in choice written as tables (golden tests, and the
                 template the tuner starts from); never installed
  tune.py        python -m qsvd_kernels tune (quant_gemm; --op latent_attention
                 | hadamard runs tune_ops.py)
"""

from __future__ import annotations

import os
import threading
import warnings

from . import gemm_menu, tables

__all__ = ["install", "install_table", "install_if_tables", "installed", "force", "clear", "explain", "explain_quant_gemm", "explain_latent_attention", "explain_hadamard", "compiled_configs", "gemm_menu", "tables"]

_lock = threading.Lock()
_installed: dict = {}  # device ordinal -> {"source": "table"|"forced", "path": str, "rules": int}
_done = False


def _C():
    from .. import _C as ext

    return ext


def compiled_configs() -> set:
    """Names of the quant_gemm configs compiled into this build."""
    return {e["name"] for e in _C().gemm_menu() if e["compiled"]}


def _device_key(index: int):
    import torch

    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count, f"{props.major}.{props.minor}"


def install(devices=None, dirs=None) -> dict:
    """Finds the table of every CUDA device (``tables.match_table``) and installs
    its rules; devices with no table keep the built-in choice. Never raises for
    a tuning problem: it warns and carries on. Returns what is installed now."""
    global _done
    import torch

    with _lock:
        _done = True
        if os.environ.get("QSVD_TUNING", "").lower() in ("0", "off", "false", "no"):
            return dict(_installed)
        if not torch.cuda.is_available():
            return dict(_installed)
        found, _ = tables.load_tables(dirs)
        compiled = compiled_configs()
        for index in range(torch.cuda.device_count()) if devices is None else devices:
            name, sms, cc = _device_key(index)
            table = tables.match_table(found, name, sms, cc)
            if table is None:
                continue
            try:
                _installed[index] = install_table(table, index, compiled)
            except RuntimeError as e:  # never let a table break the library
                warnings.warn(f"qsvd tuning: cannot install {table.path}: {e}", RuntimeWarning, stacklevel=2)
                continue
        return dict(_installed)


def install_table(table, device: int, compiled: set | None = None) -> dict:
    """Installs a parsed table's rules (tables.parse_table) on one device index
    (-1: all): quant_gemm's (minus configs not compiled in), latent_attention's
    and hadamard's. Plain C++ storage, so this also works without a GPU (the
    tests plan for fake devices with it). Returns the summary install() keeps."""
    compiled = compiled_configs() if compiled is None else compiled
    gemm = tables.compiled_rules(table, "quant_gemm", compiled)
    latent = table.rules.get("latent_attention", [])
    had = table.rules.get("hadamard", [])
    _C().set_quant_gemm_rules(device, [r.as_json() for r in gemm], "table", table.path)
    _C().set_latent_rules(device, [r.as_json() for r in latent], table.path)
    _C().set_hadamard_rules(device, [r.as_json() for r in had], table.path)
    return {"source": "table", "path": table.path, "rules": len(gemm), "latent_attention_rules": len(latent),
            "hadamard_rules": len(had)}


def install_if_tables() -> None:
    """install(), but only when a table folder holds a *.json (cheap: no CUDA
    call otherwise). Never raises."""
    try:
        if os.environ.get("QSVD_TUNING", "").lower() in ("0", "off", "false", "no"):
            return
        if not any(os.path.isdir(d) and any(f.endswith(".json") for f in os.listdir(d)) for d in tables.search_dirs()):
            return
        import torch

        if torch.cuda.is_available():
            install()
    except Exception as e:  # noqa: BLE001 - a tuning problem never breaks the import
        warnings.warn(f"qsvd tuning: tables not installed: {e}", RuntimeWarning, stacklevel=2)


def installed() -> dict:
    """{device: {"source", "path", "rules"}} of the installed tables and forced rules."""
    with _lock:
        return dict(_installed)



def force(op: str = "quant_gemm", *, config: str | None = None, streamk_mode: str = "heuristic", splits: int | None = None,
          raster: str = "heuristic", kernel: str = "auto", tile_tokens: int = 0, heads_per_cta: int = 0,
          ctas_per_sm: int = 2, elems_per_thread: int = 0, device: int = -1) -> None:
    """Forces what every call on device (-1: all) runs, for experiments and the
    tuner. Raises ValueError for a bad argument (an explicit request, not a table).

    quant_gemm: ``config`` (a compiled menu name), ``streamk_mode``, ``splits``
    (split_k: 2..64), ``raster``. latent_attention: ``kernel`` (auto | simt |
    tc), ``splits``, ``tile_tokens``, ``heads_per_cta``, ``ctas_per_sm`` (0 /
    2 = choose); a knob that a shape cannot honour makes that call raise with
    the reason (check with ``explain``). hadamard: ``elems_per_thread`` (1, 2,
    4, 8, 32: the compiled variant with at least that many elements per thread
    that serves K, else the built-in one; 0 = built-in)."""
    if op == "hadamard":
        try:
            _C().set_hadamard_variant(device, elems_per_thread)
        except RuntimeError as e:
            raise ValueError(f"force: {e}") from None
        return
    if op == "latent_attention":
        if kernel not in ("auto", "simt", "tc"):
            raise ValueError(f"force: kernel is auto, simt or tc, got {kernel!r}")
        knobs = dict(kernel=kernel, splits=splits or 0, tile_tokens=tile_tokens, heads_per_cta=heads_per_cta,
                     ctas_per_sm=ctas_per_sm)
        try:
            _C().set_latent_plan(device, True, **knobs)
        except RuntimeError as e:
            raise ValueError(f"force: {e}") from None
        return
    if op != "quant_gemm":
        raise ValueError(f"force: quant_gemm, latent_attention or hadamard, got {op!r}")
    if config is None:
        raise ValueError("force('quant_gemm', ...) needs config=")
    splits = 1 if splits is None else splits
    if config not in compiled_configs():
        raise ValueError(f"force: {config!r} is not compiled into this build; compiled: {sorted(compiled_configs())}")
    rule = tables._rule("force", {"m": [1, None], "config": config, "streamk_mode": streamk_mode, "splits": splits,
                                  "raster": raster}, {config})
    _C().set_quant_gemm_rules(device, [rule.as_json()], "forced", "forced")
    with _lock:
        targets = [device] if device >= 0 else ["all"]
        for d in targets:
            _installed[d] = {"source": "forced", "path": "forced", "rules": 1, "config": config}


def clear(device: int = -1) -> None:
    """Removes installed tables and forced rules and plans: the built-in choice again."""
    _C().set_quant_gemm_rules(device, [], "table", "")
    _C().set_latent_rules(device, [], "")
    _C().set_hadamard_rules(device, [], "")
    _C().set_latent_plan(device, False)
    _C().set_hadamard_variant(device, 0)
    with _lock:
        if device < 0:
            _installed.clear()
        else:
            _installed.pop(device, None)


def _device_cc(device):
    import torch

    index = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return index, 10 * major + minor


def explain(op: str, **kwargs) -> dict:
    """What a call of op would run on a CUDA device, and where the choice came
    from: ``explain("quant_gemm", M=, N=, K=, a_bits=, b_bits=)`` (config and
    stream-K knobs; see explain_quant_gemm) or ``explain("latent_attention",
    B=, H=, H_kv=, r=, d=, token_capacity=, ...)`` (the plan; see
    explain_latent_attention) or ``explain("hadamard", K=, dtype=)`` (the
    variant knob; see explain_hadamard)."""
    if op == "quant_gemm":
        return explain_quant_gemm(**kwargs)
    if op == "latent_attention":
        return explain_latent_attention(**kwargs)
    if op == "hadamard":
        return explain_hadamard(**kwargs)
    raise ValueError(f"explain: quant_gemm, latent_attention or hadamard, got {op!r}")


def explain_quant_gemm(*, M: int | None = None, N: int | None = None, K: int | None = None, a_bits: int = 8,
                       b_bits: int = 8, device="cuda", cc: int | None = None) -> dict:
    """What quant_gemm would run on a CUDA device, and where the choice came from.

    ``explain("quant_gemm", M=, N=, K=, a_bits=, b_bits=)`` returns
    {op, config, streamk_mode, splits, raster, source ("table" | "forced" |
    "default" | "fallback"), table (its path or None), rule (index or -1),
    compiled (the config is in this build), device, cc}. ``cc`` (10 * major +
    minor) with ``device=None`` asks about a device that is not here (no table
    is installed for it: the built-in choice).
    """
    if M is None or N is None or K is None:
        raise ValueError("explain('quant_gemm', ...) needs M, N and K")
    if device is None:
        if cc is None:
            raise ValueError("explain: give a device, or cc for a device that is not here")
        index = -2  # no rules for an absent device
    else:
        if not _done:
            install()
        index, dev_cc = _device_cc(device)
        cc = dev_cc if cc is None else cc
    d = dict(_C().quant_gemm_decide(index, cc, M, N, K, a_bits, b_bits))
    d["table"] = d.pop("label") or None
    d["compiled"] = d["config"] in compiled_configs()
    d.update(op="quant_gemm", device=None if index < 0 else index, cc=cc)
    return d


def _index_of(device):
    import torch

    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return index


def explain_hadamard(*, K: int | None = None, dtype: str = "f16", device="cuda", rules_device: int | None = None) -> dict:
    """hadamard's variant knob for a call with last dimension K and input dtype
    (f16 | bf16 | f32): {op, min_elems_per_thread (0 = built-in), source
    ("forced" | "table" | "fallback" | "default"), table (path or None), rule,
    device}. A variant that does not serve K runs the built-in one (the
    launcher's fallback). ``device=None, rules_device=i`` asks with the rules
    installed on device index i (install_table), without a GPU."""
    if device is None:
        index = -2 if rules_device is None else rules_device
    else:
        if not _done:
            install()
        index = _index_of(device)
    if K is None:  # the forced knob only (no shape: no table rule applies)
        ept = _C().hadamard_variant(index)
        return {"op": "hadamard", "min_elems_per_thread": ept, "source": "forced" if ept else "default",
                "table": None, "rule": -1, "device": None if index < 0 else index}
    d = dict(_C().hadamard_decide(index, K, dtype))
    d["table"] = d.pop("label") or None
    d.update(op="hadamard", K=K, dtype=dtype, device=None if index < 0 else index)
    return d


def explain_latent_attention(*, B: int, H: int, H_kv: int, r: int, d: int, bits: int = 8, rope: bool = True,
                             weight_dtype: str = "f16", token_capacity: int, device="cuda", sm_count: int | None = None,
                             smem_limit: int | None = None, kernel: str | None = None, splits: int | None = None,
                             tile_tokens: int | None = None, heads_per_cta: int | None = None,
                             ctas_per_sm: int | None = None, rules_device: int | None = None) -> dict:
    """The CUDA latent_attention plan for a shape: split kernel, splits, token
    tile, heads per CTA, shared memory, and its source ("forced" by
    tuning.force, "env" from QSVD_LATENT_KERNEL / QSVD_LATENT_SPLITS,
    "table" (with ``table``: its path, and ``rule``), "fallback" (a table rule
    matched but the plan checker refused its knobs for this call: the default
    plan runs; ``rule_refused`` says why), or "default"). Precedence: forced >
    env > table > default, applied by the launcher's own C++ function
    (csrc/plan.h). ``device=None, rules_device=i`` plans with what is forced
    and installed on device index i (tuning.force, install_table), without a
    GPU. token_capacity = max_blocks * block_size (capped by the RoPE
    table). ``device=None`` with sm_count and smem_limit plans for a device
    that is not here (plain C++, no GPU needed). Knobs given here (kernel,
    splits, tile_tokens, heads_per_cta, ctas_per_sm) ask "what if" (source
    "given"); ok=False and the reason when the plan cannot honour them."""
    index = -1
    if device is not None:
        import torch

        index = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        sm_count = props.multi_processor_count if sm_count is None else sm_count
        if smem_limit is None:
            smem_limit = getattr(props, "shared_memory_per_block_optin", None)
            if smem_limit is None:
                raise ValueError("explain_latent_attention: this torch does not report the opt-in shared memory; "
                                 "pass smem_limit")
    if sm_count is None or smem_limit is None:
        raise ValueError("explain_latent_attention: give a device, or sm_count and smem_limit")
    if device is not None and not _done:
        install()
    if device is None and rules_device is not None:
        index = rules_device
    weight = "i8" if weight_dtype in ("i8", "int8") else weight_dtype
    # The launcher's own function: forced > env > table > default (csrc/plan.h).
    plan = dict(_C().latent_attention_decide(index if index >= 0 else -2, B, H, H_kv, r, d, bits, rope, weight,
                                             token_capacity, sm_count, smem_limit))
    plan["knobs"] = dict(plan["knobs"])
    plan["table"] = plan.pop("label") or None
    plan.update(op="latent_attention", sm_count=sm_count, smem_limit=smem_limit)
    given = {k: v for k, v in dict(kernel=kernel, splits=splits, tile_tokens=tile_tokens, heads_per_cta=heads_per_cta,
                                   ctas_per_sm=ctas_per_sm).items() if v is not None}
    if not given:
        return plan
    # "What if": the given knobs over the forced or environment ones (a table's
    # rule is a suggestion the given knobs replace).
    knobs = dict(plan["knobs"]) if plan["source"] in ("forced", "env") else \
        {"kernel": "auto", "splits": 0, "tile_tokens": 0, "heads_per_cta": 0, "ctas_per_sm": 2}
    knobs.update(given)
    plan = dict(_C().plan_latent_attention_shape(B, H, H_kv, r, d, bits, rope, weight, token_capacity, sm_count,
                                           smem_limit, **knobs))
    plan.update(op="latent_attention", source="given", knobs=knobs, table=None, rule=-1, sm_count=sm_count,
                smem_limit=smem_limit)
    return plan
