// Launch interface of the CUDA quant_gemm kernels: raw pointers, sizes, a
// stream, a cudaError_t. Host code (the torch launcher, a C++ benchmark)
// includes only this; the CUTLASS kernels live in quant_gemm_sm80.cuh
// (CUTLASS 2.x, mma.sync) and quant_gemm_sm90.cuh (CUTLASS 3.x, wgmma), the
// dispatch in csrc/cuda/quant_gemm_dispatch.cpp, the menu of configurations
// (and the built-in choice among them) in quant_gemm_menu.h.
//
//   out[m, n] = ((float)sum_k a[m,k] b[n,k] * a_scale[m]) * b_scale[n] + bias[n]
//
// in fp32, each step rounded to nearest and never fused, then one rounding
// to the output type: the same arithmetic as the CPU kernel, bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "qsvd/formats.h"
#include "qsvd/kernels/quant_gemm_menu.h"

namespace qsvd {
namespace gemm {

// GemmConfig, kGemmConfigs, select_config(), config_name() and the
// run-time knobs (StreamKMode, Raster): quant_gemm_menu.h.

struct QuantGemmParams {
  const void* a = nullptr;        // [M, K] int8, or [M, K/2] packed INT4 (a_bits 4); rows contiguous, row stride K
  const void* b = nullptr;        // [N, K] likewise (b_bits); the F.linear weight layout
  const float* a_scale = nullptr; // [M]
  const float* b_scale = nullptr; // [ldo]: only the first N entries matter
  const void* bias = nullptr;     // [ldo] in the output type, or nullptr (no bias)
  void* out = nullptr;            // [M, ldo], row stride ldo; columns >= N are scratch
  int64_t M = 0, N = 0, K = 0;    // all > 0; K % k_alignment(a_bits, b_bits) == 0
  int64_t ldo = 0;                // >= N, multiple of out_alignment(out_type)
  int a_bits = 8, b_bits = 8;     // 8 or 4
  DType out_type = DType::kF32;   // kF16, kBF16 or kF32
  GemmConfig config = GemmConfig::kSm80Prefill;  // select_config() or a tuning table; must be compiled
  // Run-time knobs (valid_knobs()); the defaults are the built-in behaviour.
  StreamKMode streamk_mode = StreamKMode::kHeuristic;
  int splits = 1;
  Raster raster = Raster::kHeuristic;     // sm90 configs only
  int device = 0;                 // CUDA ordinal of the current device
  int sm_count = 0;               // its multiprocessor count (DeviceInfo)
  void* workspace = nullptr;      // quant_gemm_workspace_size() bytes, 16-byte aligned
  size_t workspace_bytes = 0;
};

// All pointers must be 16-byte aligned (every global access of the kernels
// is at most 16 bytes wide, and TMA needs 16-byte aligned bases).
constexpr size_t kPointerAlignment = 16;

// K granularity: 16 bytes of every row of the narrowest operand, so that the
// 16-byte cp.async / TMA accesses never straddle the end of a row.
constexpr int64_t k_alignment(int a_bits, int b_bits) { return (a_bits == 4 || b_bits == 4) ? 32 : 16; }

// Row stride granularity of out: 16 bytes (TMA store on sm_90; the 2.x
// epilogue stores 4-element vectors, which 16 bytes also covers). The
// broadcast loads of b_scale / bias read whole vectors too, hence [ldo].
constexpr int64_t out_alignment(DType t) { return t == DType::kF32 ? 4 : 8; }

struct DeviceInfo {
  int cc = 0;        // compute capability, 10 * major + minor
  int sm_count = 0;
};

// Cached per device after the first query.
cudaError_t get_device_info(int device, DeviceInfo* info);

// Whether quant_gemm has kernels for compute capability cc: 8.x (sm_80 code,
// binary compatible across 8.x) and 9.0 (sm_90a).
constexpr bool is_supported_cc(int cc) { return (cc >= 80 && cc < 90) || cc == 90; }

// Workspace the call needs (stream-K partial sums and flags); 0 is common.
cudaError_t quant_gemm_workspace_size(const QuantGemmParams& p, size_t* bytes);

// Launches the GEMM of p.config on stream. cudaErrorInvalidValue for
// parameters that break the rules above or a config that does not serve
// (a_bits, b_bits), is not compiled in, or knobs that are not valid_knobs();
// callers validate arguments first and report them by name.
cudaError_t launch_quant_gemm(const QuantGemmParams& p, cudaStream_t stream);

// One entry point per compiled kernel, explicitly instantiated in the files
// setup.py generates from the menu (build/generated/quant_gemm/*.cu: sm80
// entries per bit pair, sm90 entries, W8A8, per output type). With
// workspace_bytes non-null they only report the workspace size; otherwise
// they launch. On failure they clear the runtime's last error.
template <GemmConfig kConfig, int kABits, int kBBits, DType kOut>
cudaError_t run_sm80(const QuantGemmParams& p, cudaStream_t stream, size_t* workspace_bytes);
template <GemmConfig kConfig, DType kOut>
cudaError_t run_sm90(const QuantGemmParams& p, cudaStream_t stream, size_t* workspace_bytes);

}  // namespace gemm
}  // namespace qsvd
