"""The quant_gemm menu: every CUDA kernel configuration, in one list.

Adding a configuration is one line in MENU. setup.py loads this file by path
(stdlib only, no torch, no qsvd_kernels import) and generates, into
build/generated:

  qsvd_gemm_menu.inc      the GemmConfig enum and the constexpr table of every
                          entry (tile, warp, stages, cluster, schedule, bit
                          pairs, compiled or not); include/qsvd/kernels/
                          quant_gemm_menu.h includes it, and the kernel
                          templates read their shapes from it;
  qsvd_gemm_dispatch.inc  (config, bit pair, output type) -> kernel function,
                          for the compiled entries only;
  quant_gemm/*.cu         the explicit instantiations, one file per (arch, bit
                          pair or output type, chunk of configs): the files
                          compile in parallel.

QSVD_GEMM_MENU picks what is compiled:
  default      the entries with menu="default": today's four kernels, so CI's
               compile time does not grow;
  tune         default + the menu="tune" candidates (build it on the GPU
               machine, for one arch: TORCH_CUDA_ARCH_LIST=8.9 or 9.0a);
  name,name    default + the named entries.
The default entries are always compiled: the built-in choice falls back to them.

Why a Python list and generated C++ rather than X-macros: the build chooses the
entries, and writing one instantiation file per chunk is a build step anyway;
the Python tests and the tuner read the same list without parsing C++; and the
C++ side still sees plain constexpr data (no per-config template
specialisations), so a kernel engineer reads the shapes in one table.

Fields
  name      stable, unique; tuning tables and explain() use it.
  arch      "sm80": CUTLASS 2.x mma.sync (compute capability 8.x; on 9.0 only
            for INT4 operands); "sm90": CUTLASS 3.x wgmma, W8A8, sm_90a.
  pairs     the (a_bits, b_bits) it is instantiated for.
  tile      (M, N, K) of a CTA. sm80: K in INT8 elements (bytes of the INT8
            operand per stage); int4 x int4 doubles it (same bytes).
            sm90: K in int8 elements.
  warp      (M, N) of a warp tile (sm80; its K is the tile's: no sliced-K).
            sm90: None (two consumer warpgroups, cooperative).
  stages    mainloop stages (sm80); 0 = CUTLASS's carve-out rule (sm90).
  cluster   (M, N) thread-block cluster (sm90); (1, 1) on sm80.
  schedule  "streamk" (sm80: ThreadblockSwizzleStreamK) or
            "cooperative_streamk" (sm90: KernelTmaWarpSpecializedCooperative +
            StreamKScheduler). Stream-K is what makes the run-time knobs
            (mode, splits, raster) available to every entry.
  menu      "default" or "tune".
  ident     the C++ enumerator (kSm80Decode...); derived from name if None.
  source    where the candidate comes from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

PAIRS_ALL = ((8, 8), (4, 4), (8, 4), (4, 8))
PAIR_BITS = {(8, 8): 0, (4, 4): 1, (8, 4): 2, (4, 8): 3}  # bit of GemmConfigInfo::pair_mask
OUT_TYPES = ("kF16", "kBF16", "kF32")  # qsvd::DType enumerators the kernels write
ARCHS = ("sm80", "sm90")
SCHEDULES = {"sm80": ("streamk",), "sm90": ("cooperative_streamk",)}
MENUS = ("default", "tune")
# Shared memory a CTA may opt in to: sm_80 / sm_87 (163 KB) and sm_86 / sm_89
# (99 KB); an sm80 entry must fit the smallest of the 8.x family it may run on.
SM80_MIN_OPTIN_SMEM = 99 * 1024
CHUNK = 2  # configs per generated instantiation file


@dataclass(frozen=True)
class GemmEntry:
    name: str
    arch: str
    pairs: tuple
    tile: tuple
    warp: tuple | None
    stages: int
    cluster: tuple = (1, 1)
    schedule: str = "streamk"
    menu: str = "tune"
    ident: str | None = None
    source: str = field(default="", compare=False)

    @property
    def enumerator(self) -> str:
        if self.ident:
            return "k" + self.ident
        return "k" + "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", self.name) if p)

    def tile_k(self, a_bits: int, b_bits: int) -> int:
        return self.tile[2] * (2 if (self.arch == "sm80" and a_bits == 4 and b_bits == 4) else 1)

    def smem_bytes(self, a_bits: int, b_bits: int) -> int:
        """Mainloop shared memory (sm80): stages x (A tile + B tile) bytes."""
        k = self.tile_k(a_bits, b_bits)
        a = self.tile[0] * k * a_bits // 8
        b = self.tile[1] * k * b_bits // 8
        return self.stages * (a + b)


_S = "sm80"
_H = "sm90"
_COOP = "cooperative_streamk"

MENU: tuple = (
    # -- default: today's kernels (select_config picks among them) -------------
    GemmEntry("sm80_decode_32x64_streamk", _S, PAIRS_ALL, (32, 64, 128), (16, 32), 5,
              menu="default", ident="Sm80Decode", source="qsvd (M <= 32: weight-streaming, stream-K)"),
    GemmEntry("sm80_prefill_128x128_streamk", _S, PAIRS_ALL, (128, 128, 64), (64, 64), 4,
              menu="default", ident="Sm80Prefill", source="CUTLASS sm80 int8/int4/mixed-input unit tests"),
    GemmEntry("sm90_decode_128x64_cluster1x1_streamk", _H, ((8, 8),), (128, 64, 128), None, 0, (1, 1), _COOP,
              menu="default", ident="Sm90Decode", source="qsvd (M <= 64)"),
    GemmEntry("sm90_prefill_128x128_cluster2x1_streamk", _H, ((8, 8),), (128, 128, 128), None, 0, (2, 1), _COOP,
              menu="default", ident="Sm90Prefill", source="qsvd (M > 64), TMA multicast of B"),
    # -- tune: candidates, compiled only with QSVD_GEMM_MENU=tune or by name ----
    # sm_8x decode: fewer stages so two CTAs fit an sm_86/sm_89 SM (99 KB).
    GemmEntry("sm80_decode_32x64_s4_streamk", _S, PAIRS_ALL, (32, 64, 128), (16, 32), 4,
              source="qsvd: decode tile with 48 KB, 2 CTAs/SM on sm_89"),
    GemmEntry("sm80_decode_32x64_s3_streamk", _S, PAIRS_ALL, (32, 64, 128), (16, 32), 3,
              source="qsvd: decode tile with 36 KB"),
    GemmEntry("sm80_decode_32x128_s4_streamk", _S, PAIRS_ALL, (32, 128, 128), (32, 32), 4,
              source="vLLM sm89 int8 M32 set (tile 32x128)"),
    GemmEntry("sm80_mid_64x64_s5_streamk", _S, PAIRS_ALL, (64, 64, 128), (32, 32), 5,
              source="vLLM sm80/sm89 int8 M64 set"),
    GemmEntry("sm80_mid_64x128_s4_streamk", _S, PAIRS_ALL, (64, 128, 64), (32, 64), 4,
              source="CUTLASS 16832 int8 list (64x128x64, warp 32x64)"),
    GemmEntry("sm80_mid_64x128_s3_streamk", _S, PAIRS_ALL, (64, 128, 128), (32, 64), 3,
              source="vLLM sm89 int8 M128 set"),
    GemmEntry("sm80_prefill_128x128_s3_streamk", _S, PAIRS_ALL, (128, 128, 64), (64, 64), 3,
              source="CUTLASS 16832 int8 list"),
    GemmEntry("sm80_prefill_128x128_s5_streamk", _S, PAIRS_ALL, (128, 128, 64), (64, 64), 5,
              source="CUTLASS 16832 int8 list (A100: 163 KB)"),
    GemmEntry("sm80_prefill_128x256_s3_streamk", _S, PAIRS_ALL, (128, 256, 64), (64, 64), 3,
              source="CUTLASS 16832 int8 list, vLLM sm80 int8 default"),
    GemmEntry("sm80_prefill_256x128_s3_streamk", _S, PAIRS_ALL, (256, 128, 64), (64, 64), 3,
              source="CUTLASS 16832 int8 list"),
    # sm_90a W8A8 (cooperative kernels: 128-row multiples, stream-K).
    GemmEntry("sm90_128x64_cluster2x1_streamk", _H, ((8, 8),), (128, 64, 128), None, 0, (2, 1), _COOP,
              source="qsvd: decode tile with B multicast"),
    GemmEntry("sm90_128x64_cluster1x2_streamk", _H, ((8, 8),), (128, 64, 128), None, 0, (1, 2), _COOP,
              source="qsvd: decode tile with A multicast"),
    GemmEntry("sm90_128x128_cluster1x1_streamk", _H, ((8, 8),), (128, 128, 128), None, 0, (1, 1), _COOP,
              source="vLLM sm90 int8 default tile without cluster"),
    GemmEntry("sm90_128x256_cluster1x1_streamk", _H, ((8, 8),), (128, 256, 128), None, 0, (1, 1), _COOP,
              source="CUTLASS sm90 int8 profiler list"),
    GemmEntry("sm90_256x128_cluster1x1_streamk", _H, ((8, 8),), (256, 128, 128), None, 0, (1, 1), _COOP,
              source="CUTLASS sm90 int8 profiler list"),
)


class MenuError(ValueError):
    pass


def check_menu(menu=MENU) -> None:
    """Raises MenuError for anything the generator could not compile."""
    names, idents = set(), set()
    for e in menu:
        where = f"gemm menu entry {e.name!r}"
        if not re.fullmatch(r"[a-z0-9_]+", e.name):
            raise MenuError(f"{where}: names are lower-case letters, digits and _")
        if e.name in names:
            raise MenuError(f"{where}: duplicate name")
        if e.enumerator in idents:
            raise MenuError(f"{where}: duplicate C++ enumerator {e.enumerator}")
        names.add(e.name)
        idents.add(e.enumerator)
        if e.arch not in ARCHS:
            raise MenuError(f"{where}: arch must be one of {ARCHS}")
        if e.menu not in MENUS:
            raise MenuError(f"{where}: menu must be one of {MENUS}")
        if e.schedule not in SCHEDULES[e.arch]:
            raise MenuError(f"{where}: schedule must be one of {SCHEDULES[e.arch]}")
        if not e.pairs or any(p not in PAIR_BITS for p in e.pairs) or len(set(e.pairs)) != len(e.pairs):
            raise MenuError(f"{where}: pairs must be distinct (a_bits, b_bits) from {PAIRS_ALL}")
        if len(e.tile) != 3 or any(t <= 0 for t in e.tile):
            raise MenuError(f"{where}: tile must be (M, N, K) > 0")
        if e.arch == "sm80":
            if e.warp is None or len(e.warp) != 2:
                raise MenuError(f"{where}: sm80 entries need a warp tile (M, N)")
            wm, wn = e.warp
            if e.tile[0] % wm or e.tile[1] % wn or wm % 16 or wn % 8:
                raise MenuError(f"{where}: warp {e.warp} must divide the tile and be a multiple of 16 x 8")
            warps = (e.tile[0] // wm) * (e.tile[1] // wn)
            if warps not in (4, 8):
                raise MenuError(f"{where}: {warps} warps; the entries use 4 or 8")
            if e.tile[2] % 32:
                raise MenuError(f"{where}: tile K must be a multiple of 32 (INT8 mma K)")
            if not 2 <= e.stages <= 8:
                raise MenuError(f"{where}: stages in 2..8")
            if e.cluster != (1, 1):
                raise MenuError(f"{where}: sm80 has no clusters")
            for a, b in e.pairs:
                if e.smem_bytes(a, b) > SM80_MIN_OPTIN_SMEM:
                    raise MenuError(
                        f"{where}: {e.smem_bytes(a, b)} bytes of shared memory for a{a}w{b}, over "
                        f"{SM80_MIN_OPTIN_SMEM} (sm_86/sm_89)"
                    )
        else:
            if e.pairs != ((8, 8),):
                raise MenuError(f"{where}: sm90 entries are W8A8 only (no INT4 wgmma)")
            if e.warp is not None or e.stages != 0:
                raise MenuError(f"{where}: sm90 entries take warp=None, stages=0 (carve-out)")
            if e.tile[0] % 128 or e.tile[1] % 16 or e.tile[2] % 64:
                raise MenuError(f"{where}: cooperative tiles are 128*i x 16*j x 64*k")
            if len(e.cluster) != 2 or e.cluster[0] * e.cluster[1] > 4 or min(e.cluster) < 1:
                raise MenuError(f"{where}: cluster (M, N), at most 4 CTAs")
    defaults = [e for e in menu if e.menu == "default"]
    if [e.enumerator for e in defaults] != ["kSm80Decode", "kSm80Prefill", "kSm90Decode", "kSm90Prefill"]:
        raise MenuError("the default menu must be the four built-in kernels, in enum order")


def select(selection: str | None, menu=MENU) -> list:
    """The entries QSVD_GEMM_MENU=selection compiles (menu order)."""
    selection = (selection or "default").strip()
    if selection in ("", "default"):
        chosen = {e.name for e in menu if e.menu == "default"}
    elif selection == "tune":
        chosen = {e.name for e in menu}
    else:
        wanted = [s.strip() for s in selection.split(",") if s.strip()]
        known = {e.name for e in menu}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise MenuError(f"QSVD_GEMM_MENU names unknown configs {unknown}; the menu: {sorted(known)}")
        chosen = {e.name for e in menu if e.menu == "default"} | set(wanted)
    return [e for e in menu if e.name in chosen]


def _pair_tag(a: int, b: int) -> str:
    return f"a{a}w{b}"


def _write(path: str, text: str) -> None:
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != text:  # keep the timestamp: incremental builds stay incremental
        with open(path, "w") as f:
            f.write(text)


_HEADER = "// Generated by qsvd_kernels/tuning/gemm_menu.py (run by setup.py). Do not edit.\n"


def menu_header(compiled: list, selection: str, menu=MENU) -> str:
    names = {e.name for e in compiled}
    lines = [_HEADER, "// Included by include/qsvd/kernels/quant_gemm_menu.h inside namespace qsvd::gemm.", "#pragma once", ""]
    lines.append(f'#define QSVD_GEMM_MENU_SELECTION "{selection}"')
    lines.append("")
    lines.append("enum class GemmConfig : int {")
    for i, e in enumerate(menu):
        lines.append(f"  {e.enumerator} = {i},  // {e.name}")
    lines.append("};")
    lines.append(f"inline constexpr int kNumGemmConfigs = {len(menu)};")
    lines.append("")
    lines.append("inline constexpr GemmConfigInfo kGemmConfigs[kNumGemmConfigs] = {")
    for e in menu:
        mask = sum(1 << PAIR_BITS[p] for p in e.pairs)
        arch = "GemmArch::kSm80" if e.arch == "sm80" else "GemmArch::kSm90"
        sched = "GemmSchedule::kStreamK" if e.schedule == "streamk" else "GemmSchedule::kCooperativeStreamK"
        wm, wn = e.warp if e.warp else (0, 0)
        lines.append(
            f'    {{"{e.name}", {arch}, {mask:#x}, {e.tile[0]}, {e.tile[1]}, {e.tile[2]}, {wm}, {wn}, {e.stages}, '
            f"{e.cluster[0]}, {e.cluster[1]}, {sched}, {str(e.menu == 'default').lower()}, "
            f"{str(e.name in names).lower()}}},"
        )
    lines.append("};")
    return "\n".join(lines) + "\n"


def instantiations(compiled: list) -> list:
    """[(arch, a_bits, b_bits, out or None, [entries])], the kernel functions to
    instantiate: sm80 per bit pair (all output types), sm90 per output type."""
    out = []
    for a, b in PAIRS_ALL:
        entries = [e for e in compiled if e.arch == "sm80" and (a, b) in e.pairs]
        if entries:
            out.append(("sm80", a, b, None, entries))
    for o in OUT_TYPES:
        entries = [e for e in compiled if e.arch == "sm90"]
        if entries:
            out.append(("sm90", 8, 8, o, entries))
    return out


_PAIR_NOTES = {
    (8, 8): "int8 x int8 (mma m16n8k32). On sm_90a these compile to a trap: Hopper runs W8A8 on the CUTLASS 3.x "
    "kernels.",
    (4, 4): "int4 x int4 (mma m16n8k64). Also the Hopper path: there is no INT4 wgmma, and ptxas lowers the s4 "
    "mma.sync on sm_90a to INT4 -> INT8 register unpacking plus IMMA.16832.S8.",
    (8, 4): "activations int8 x weights int4 (W4A8): the INT4 B operand is upcast to INT8 in registers "
    "(OpMultiplyAddMixedInputUpcast), int8 mma. Also the Hopper path.",
    (4, 8): "activations int4 x weights int8: the INT4 A operand is upcast to INT8 in registers "
    "(OpMultiplyAddMixedInputUpcast), int8 mma. Also the Hopper path.",
}


def _unit(arch, a, b, o, entries) -> str:
    lines = [_HEADER.rstrip("\n")]
    if arch == "sm80":
        lines.append(f"// CUTLASS 2.x quant_gemm kernels, {_PAIR_NOTES[(a, b)]}")
    else:
        lines.append(f"// CUTLASS 3.x quant_gemm kernels for Hopper W8A8, output {o}. On sm_80 they compile to empty "
                     "bodies.")
    lines += [
        "//",
        "// NDEBUG: device-side asserts would cost branches in the mainloop (and on sm_90a a call in the",
        "// mainloop makes ptxas serialize the wgmma pipeline, warning C7510).",
        "#ifndef NDEBUG",
        "#define NDEBUG",
        "#endif",
        f'#include "qsvd/kernels/quant_gemm_{arch}.cuh"',
        "",
        "namespace qsvd {",
        "namespace gemm {",
        "",
    ]
    for e in entries:
        if arch == "sm80":
            for out in OUT_TYPES:
                lines.append(
                    f"template cudaError_t run_sm80<GemmConfig::{e.enumerator}, {a}, {b}, DType::{out}>("
                    "const QuantGemmParams&, cudaStream_t, size_t*);"
                )
        else:
            lines.append(
                f"template cudaError_t run_sm90<GemmConfig::{e.enumerator}, DType::{o}>("
                "const QuantGemmParams&, cudaStream_t, size_t*);"
            )
    lines += ["", "}  // namespace gemm", "}  // namespace qsvd", ""]
    return "\n".join(lines)


def dispatch_table(compiled: list) -> str:
    lines = [_HEADER, "// Included by csrc/cuda/quant_gemm_dispatch.cpp: {config, a_bits, b_bits, out, kernel}.", ""]
    for e in compiled:
        for a, b in e.pairs:
            for o in OUT_TYPES:
                fn = (f"&run_sm80<GemmConfig::{e.enumerator}, {a}, {b}, DType::{o}>" if e.arch == "sm80"
                      else f"&run_sm90<GemmConfig::{e.enumerator}, DType::{o}>")
                lines.append(f"{{GemmConfig::{e.enumerator}, {a}, {b}, DType::{o}, {fn}}},")
    return "\n".join(lines) + "\n"


def generate(gen_dir: str, selection: str | None = None, with_cuda: bool = True, menu=MENU) -> list:
    """Writes the generated files; returns the .cu sources to compile (paths
    under gen_dir). A CPU-only build gets the header (compiled: none) only."""
    check_menu(menu)
    selection = (selection or "default").strip() or "default"
    compiled = select(selection, menu) if with_cuda else []
    os.makedirs(gen_dir, exist_ok=True)
    _write(os.path.join(gen_dir, "qsvd_gemm_menu.inc"), menu_header(compiled, selection if with_cuda else "none", menu))
    _write(os.path.join(gen_dir, "qsvd_gemm_dispatch.inc"), dispatch_table(compiled))
    sources = []
    if not compiled:
        return sources
    unit_dir = os.path.join(gen_dir, "quant_gemm")
    os.makedirs(unit_dir, exist_ok=True)
    for arch, a, b, o, entries in instantiations(compiled):
        tag = _pair_tag(a, b) if arch == "sm80" else o[1:].lower()
        for c in range(0, len(entries), CHUNK):
            path = os.path.join(unit_dir, f"quant_gemm_{arch}_{tag}_{c // CHUNK}.cu")
            _write(path, _unit(arch, a, b, o, entries[c : c + CHUNK]))
            sources.append(path)
    return sources


if __name__ == "__main__":
    # python qsvd_kernels/tuning/gemm_menu.py [selection]: list what would compile;
    # ... --header DIR [selection]: write the menu header alone (CMake's ctest of
    # the rules needs it; no kernel is compiled there).
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--header":
        sel = sys.argv[3] if len(sys.argv) > 3 else "default"
        os.makedirs(sys.argv[2], exist_ok=True)
        _write(os.path.join(sys.argv[2], "qsvd_gemm_menu.inc"), menu_header(select(sel), sel))
        sys.exit(0)
    check_menu()
    for e in select(sys.argv[1] if len(sys.argv) > 1 else None):
        print(f"{e.name:45s} {e.arch} {e.menu:8s} tile={e.tile} warp={e.warp} stages={e.stages} cluster={e.cluster}")
