// The quant_gemm menu as C++ data: plain C++, no CUDA, no torch, so the
// choice logic can be tested on any machine (qsvd_kernels._C exposes it).
//
// The list itself lives in qsvd_kernels/tuning/gemm_menu.py; setup.py
// generates build/generated/qsvd_gemm_menu.inc from it (the GemmConfig enum
// and kGemmConfigs, one row per entry, compiled or not). The kernel templates
// (quant_gemm_sm80.cuh, quant_gemm_sm90.cuh) read their tile shapes from
// that table, so adding a configuration is one line of the Python list.
#pragma once

#include <cstdint>
#include <cstring>

namespace qsvd {
namespace gemm {

enum class GemmArch : int { kSm80 = 0, kSm90 = 1 };
enum class GemmSchedule : int { kStreamK = 0, kCooperativeStreamK = 1 };

struct GemmConfigInfo {
  const char* name;
  GemmArch arch;
  unsigned pair_mask;   // bit pair_bit(a_bits, b_bits) set: instantiated for that pair
  int tile_m, tile_n, tile_k;  // sm80: tile_k in INT8 elements (int4 x int4 doubles it)
  int warp_m, warp_n;          // sm80 only
  int stages;                  // sm80; 0 = CUTLASS's carve-out (sm90)
  int cluster_m, cluster_n;    // sm90
  GemmSchedule schedule;
  bool is_default;             // in the default menu (always compiled in a CUDA build)
  bool compiled;               // instantiated in this build (QSVD_GEMM_MENU)
};

#include "qsvd_gemm_menu.inc"  // generated: enum class GemmConfig, kNumGemmConfigs, kGemmConfigs

// Bit of GemmConfigInfo::pair_mask: (8,8) 0, (4,4) 1, (8,4) 2, (4,8) 3; -1 otherwise.
constexpr int pair_bit(int a_bits, int b_bits) {
  return a_bits == 8 && b_bits == 8   ? 0
         : a_bits == 4 && b_bits == 4 ? 1
         : a_bits == 8 && b_bits == 4 ? 2
         : a_bits == 4 && b_bits == 8 ? 3
                                      : -1;
}

constexpr const GemmConfigInfo& config_info(GemmConfig c) { return kGemmConfigs[static_cast<int>(c)]; }

constexpr bool serves_pair(GemmConfig c, int a_bits, int b_bits) {
  const int bit = pair_bit(a_bits, b_bits);
  return bit >= 0 && ((config_info(c).pair_mask >> bit) & 1u) != 0;
}

// Whether compute capability cc can run an arch family: sm80 code runs on
// every 8.x and (INT4 operands only) on 9.0 from the sm_90a cubin; sm90 on 9.0.
constexpr bool arch_runs_on(GemmArch arch, int cc, int a_bits, int b_bits) {
  if (arch == GemmArch::kSm90) return cc == 90 && a_bits == 8 && b_bits == 8;
  return (cc >= 80 && cc < 90) || (cc == 90 && (a_bits == 4 || b_bits == 4));
}

// Whether config can serve (cc, a_bits, b_bits) in this build: compiled,
// instantiated for the pair, and of an arch family the device runs.
constexpr bool can_serve(GemmConfig c, int cc, int a_bits, int b_bits) {
  return config_info(c).compiled && serves_pair(c, a_bits, b_bits) &&
         arch_runs_on(config_info(c).arch, cc, a_bits, b_bits);
}

constexpr int64_t kSm80DecodeMaxM = 32;
constexpr int64_t kSm90DecodeMaxM = 64;

// The built-in choice (no tuning table): what every release before the menu
// picked, kept bit for bit; the golden test of the default table checks it.
// Hopper: W8A8 on the CUTLASS 3.x wgmma kernels. INT4 operands have no
// wgmma, so they run the CUTLASS 2.x kernels (compiled into the sm_90a cubin
// too) on mma.sync: the mixed pairs upcast INT4 -> INT8 in registers and use
// int8 mma; for int4 x int4, ptxas lowers the s4 mma.sync on sm_90a to
// INT4 -> INT8 register unpacking + IMMA.16832.S8, still exact.
constexpr GemmConfig select_config(int cc, int64_t M, int a_bits, int b_bits) {
  if (cc == 90 && a_bits == 8 && b_bits == 8)
    return M <= kSm90DecodeMaxM ? GemmConfig::kSm90Decode : GemmConfig::kSm90Prefill;
  return M <= kSm80DecodeMaxM ? GemmConfig::kSm80Decode : GemmConfig::kSm80Prefill;
}

// A stable name of the configuration (the menu's), for tables, tests and benchmarks.
constexpr const char* config_name(GemmConfig config) {
  const int i = static_cast<int>(config);
  return i >= 0 && i < kNumGemmConfigs ? kGemmConfigs[i].name : "unknown";
}

// The config of a menu name; false when the menu has none.
inline bool find_config(const char* name, GemmConfig* out) {
  for (int i = 0; i < kNumGemmConfigs; ++i)
    if (std::strcmp(kGemmConfigs[i].name, name) == 0) {
      *out = static_cast<GemmConfig>(i);
      return true;
    }
  return false;
}

// Run-time knobs of the stream-K kernels (no recompile). Integer sums are
// exact, so every knob leaves the output bit-identical.
enum class StreamKMode : int {
  kHeuristic = 0,     // CUTLASS decides per call between data-parallel tiles and stream-K (today's)
  kDataParallel = 1,  // one CTA per output tile, no K split
  kSplitK = 2,        // every tile's K loop split `splits` ways (partials summed in the workspace)
};
enum class Raster : int {
  kHeuristic = 0,
  kAlongM = 1,
  kAlongN = 2,
};  // sm90 only: CUTLASS 2.x's stream-K swizzle has no raster option (ignored on sm80)
constexpr int kMaxSplits = 64;

struct GemmChoice {
  GemmConfig config = GemmConfig::kSm80Prefill;
  StreamKMode mode = StreamKMode::kHeuristic;
  int splits = 1;     // kSplitK: 2..kMaxSplits; otherwise 1
  Raster raster = Raster::kHeuristic;
};

// Whether the knobs are well formed (a config-independent check).
constexpr bool valid_knobs(StreamKMode mode, int splits, Raster raster) {
  const bool mode_ok = mode == StreamKMode::kHeuristic || mode == StreamKMode::kDataParallel ||
                       mode == StreamKMode::kSplitK;
  const bool raster_ok = raster == Raster::kHeuristic || raster == Raster::kAlongM || raster == Raster::kAlongN;
  const bool splits_ok = mode == StreamKMode::kSplitK ? (splits >= 2 && splits <= kMaxSplits) : splits == 1;
  return mode_ok && raster_ok && splits_ok;
}

}  // namespace gemm
}  // namespace qsvd
