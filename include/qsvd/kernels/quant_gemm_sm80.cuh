// quant_gemm on compute capability 8.x (and the INT4 operands on 9.0):
// CUTLASS 2.x tensor-core GEMM (mma.sync, cp.async multistage mainloop),
// stream-K decomposition, and an epilogue visitor tree (EVT) that applies
// a_scale (per row), b_scale and bias (per column) to the int32 sums.
//
// Operands: A = activations [M, K] row-major (a_bits), B = weights [N, K],
// i.e. a column-major K x N matrix (b_bits): the TN GEMM. int8 x int8 uses
// mma m16n8k32, int4 x int4 mma m16n8k64; the mixed pairs use
// OpMultiplyAddMixedInputUpcast: the INT4 operand (B for W4A8 = a_bits 8,
// b_bits 4; A for W8A4 = a_bits 4, b_bits 8) is sign-extended to INT8 in
// registers after the shared-memory load, then m16n8k32 runs on int8.
//
// Stream-K (ThreadblockSwizzleStreamK, avail_sms = -1) lets CUTLASS choose
// per call between data-parallel tiles and splitting the K loop across
// CTAs, which keeps every SM busy when the tile grid is small (decode: M
// tiny, N a few thousand). Partial sums go through the workspace as int32
// and are added exactly, so the decomposition never changes the result.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

// Include order matters: the visitor headers expect the GEMM headers first.
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle_streamk.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "qsvd/kernels/quant_gemm_epilogue.cuh"
#include "qsvd/kernels/quant_gemm_params.h"

namespace qsvd {
namespace gemm {
namespace sm80 {

template <int kBits>
struct OperandOf {
  using type = int8_t;
};
template <>
struct OperandOf<4> {
  using type = cutlass::int4b_t;
};

using cutlass::gemm::GemmShape;

// Tile shapes (M x N x K in elements) of a menu entry (quant_gemm_menu.h,
// generated from qsvd_kernels/tuning/gemm_menu.py). The menu's tile K counts
// INT8 elements, i.e. bytes of the INT8 operand per stage; int4 x int4 doubles
// it (m16n8k64), so every stage loads the same bytes. Warp tiles cover the
// whole K of the tile (no sliced-K). The default entries:
//   decode : 32 x 64 threadblock, 4 warps of 16 x 32, 5 stages. M <= 32
//            calls are bound by reading B; small N tiles and stream-K give
//            enough CTAs to stream B from every SM.
//   prefill: 128 x 128 threadblock, 4 warps of 64 x 64, 4 stages (the
//            shapes of CUTLASS's own sm80 int8/int4/mixed-input tests).
// Mixed int4 / int8 pairs upcast the INT4 operand in registers and run int8 mma.
template <GemmConfig kConfig, int kABits, int kBBits>
struct Tiles {
  static constexpr GemmConfigInfo kInfo = kGemmConfigs[static_cast<int>(kConfig)];
  static_assert(kInfo.arch == GemmArch::kSm80, "not a CUTLASS 2.x menu entry");
  static constexpr bool kInt4 = kABits == 4 && kBBits == 4;
  static constexpr bool kMixed = kABits != kBBits;
  static constexpr int kK = kInfo.tile_k * (kInt4 ? 2 : 1);
  using Threadblock = GemmShape<kInfo.tile_m, kInfo.tile_n, kK>;
  using Warp = GemmShape<kInfo.warp_m, kInfo.warp_n, kK>;
  using Instruction = GemmShape<16, 8, kInt4 ? 64 : 32>;
  static constexpr int kStages = kInfo.stages;
  using Operator = std::conditional_t<kMixed, cutlass::arch::OpMultiplyAddMixedInputUpcast,
                                      cutlass::arch::OpMultiplyAddSaturate>;
};

template <GemmConfig kConfig, int kABits, int kBBits, DType kOut>
struct Kernel {
  using T = Tiles<kConfig, kABits, kBBits>;
  using ElementA = typename OperandOf<kABits>::type;
  using ElementB = typename OperandOf<kBBits>::type;
  using ElementOut = typename OutElementOf<kOut>::type;
  // 16-byte global accesses of the mainloop.
  static constexpr int kAlignA = 128 / cutlass::sizeof_bits<ElementA>::value;
  static constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
  // The epilogue works on fp32 fragments of 4 elements per access; the
  // output store writes 4 elements (8 or 16 bytes) per access.
  static constexpr int kAlignC = 4;
  static constexpr int kEpilogueStages = 1;

  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<typename T::Threadblock, typename T::Warp,
                                                                          float, kAlignC, kEpilogueStages>;
  using Accum = cutlass::epilogue::threadblock::VisitorAccFetch;
  using ScaleA = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float,
                                                                     cute::Stride<cute::_1, cute::_0, int32_t>>;
  using ScaleB = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, float,
                                                                     cute::Stride<cute::_0, cute::_1, int32_t>>;
  using Bias = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, ElementOut,
                                                                   cute::Stride<cute::_0, cute::_1, int32_t>>;
  using Compute = cutlass::epilogue::threadblock::VisitorCompute<DequantScaleBias, ElementOut, float,
                                                                 cutlass::FloatRoundStyle::round_to_nearest>;
  using EVTCompute = cutlass::epilogue::threadblock::Sm80EVT<Compute, Accum, ScaleA, ScaleB, Bias>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, ElementOut,
                                                                cutlass::FloatRoundStyle::round_to_nearest,
                                                                cute::Stride<int64_t, cute::_1, int64_t>>;
  using EVT = cutlass::epilogue::threadblock::Sm80EVT<Store, EVTCompute>;

  using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementA, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignA,
      ElementB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignB,
      float, cutlass::layout::RowMajor, kAlignC,
      int32_t, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename T::Threadblock, typename T::Warp, typename T::Instruction,
      EVT, cutlass::gemm::threadblock::ThreadblockSwizzleStreamK, T::kStages, typename T::Operator,
      kEpilogueStages>::GemmKernel;

  // On sm_90a only the INT4 kernels are used (Hopper runs W8A8 on the
  // CUTLASS 3.x wgmma kernels), so the others compile to a trap there:
  // less compile time, and a misdispatch fails loudly instead of silently.
  static constexpr bool kUsedOnSm90 = kABits == 4 || kBBits == 4;
};

template <class GemmKernel, bool kUsedOnSm90>
__global__ void __launch_bounds__(GemmKernel::kThreadCount) quant_gemm_sm80_kernel(typename GemmKernel::Params params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kCompiled = kUsedOnSm90;
#else
  constexpr bool kCompiled = true;
#endif
  if constexpr (kCompiled) {
    extern __shared__ int shared_storage_base[];
    GemmKernel::invoke(params, *reinterpret_cast<typename GemmKernel::SharedStorage*>(shared_storage_base));
  } else {
    __trap();
  }
}

// Opts the kernel in to its shared memory (>= 48 KB needs it). Called before
// every occupancy query and launch: function attributes belong to the
// context, so a value set once per device would be lost by a context reset
// (cudaDeviceReset) and the >= 48 KB tiles would then fail to launch. The
// value is a compile-time constant of the kernel, so concurrent callers never
// race different values into it.
template <class GemmKernel, bool kUsedOnSm90>
cudaError_t opt_in_smem() {
  constexpr int kSmem = static_cast<int>(sizeof(typename GemmKernel::SharedStorage));
  if constexpr (kSmem >= (48 << 10)) {
    void (*fn)(typename GemmKernel::Params) = quant_gemm_sm80_kernel<GemmKernel, kUsedOnSm90>;
    return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }
  return cudaSuccess;
}

// CTAs per SM of a kernel (stream-K sizes its grid with it), cached per
// device (a property of the device and the kernel, not of the context).
template <class GemmKernel, bool kUsedOnSm90>
cudaError_t kernel_occupancy(int device, int* occupancy) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int> cache[kMaxCachedDevices];
  if (device >= 0 && device < kMaxCachedDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *occupancy = cached;
      return cudaSuccess;
    }
  }
  void (*fn)(typename GemmKernel::Params) = quant_gemm_sm80_kernel<GemmKernel, kUsedOnSm90>;
  constexpr int kSmem = static_cast<int>(sizeof(typename GemmKernel::SharedStorage));
  int occ = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
      &occ, fn, GemmKernel::kThreadCount, kSmem, cudaOccupancyDisableCachingOverride);
  if (err != cudaSuccess) return err;
  if (occ < 1) return cudaErrorInvalidConfiguration;
  if (device >= 0 && device < kMaxCachedDevices) cache[device].store(occ, std::memory_order_relaxed);
  *occupancy = occ;
  return cudaSuccess;
}

// Returns err after clearing the runtime's last error, which a failed
// attribute call, occupancy query or launch leaves set (the next unrelated
// CUDA call would otherwise report it).
inline cudaError_t failed(cudaError_t err) {
  (void)cudaGetLastError();
  return err;
}

}  // namespace sm80

// Definition of the entry point declared in quant_gemm_params.h; explicitly
// instantiated in the files setup.py generates from the menu
// (build/generated/quant_gemm/quant_gemm_sm80_*.cu).
template <GemmConfig kConfig, int kABits, int kBBits, DType kOut>
cudaError_t run_sm80(const QuantGemmParams& p, cudaStream_t stream, size_t* workspace_bytes) {
  using Kern = sm80::Kernel<kConfig, kABits, kBBits, kOut>;
  using GemmKernel = typename Kern::GemmKernel;
  using ElementOut = typename Kern::ElementOut;
  if (p.M <= 0 || p.N <= 0 || p.K <= 0 || p.ldo < p.N || p.K % k_alignment(kABits, kBBits) != 0 ||
      p.ldo % out_alignment(kOut) != 0 || p.sm_count <= 0 || p.M > INT32_MAX || p.ldo > INT32_MAX ||
      p.K > INT32_MAX)
    return cudaErrorInvalidValue;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  // Row-broadcast nodes read b_scale and bias as whole vectors (guarded by
  // the first column of each, < N), so up to the next multiple of 4
  // columns: inside [ldo]. So does the store, inside the [M, ldo] buffer.
  const ElementOut no_bias = ElementOut(-0.0f);
  typename Kern::EVT::Arguments callbacks{
      {
          {},                                                                        // Accum
          {p.a_scale, 1.0f, {cute::_1{}, cute::_0{}, M}},                            // ScaleA
          {p.b_scale, 1.0f, {cute::_0{}, cute::_1{}, N}},                            // ScaleB
          {static_cast<const ElementOut*>(p.bias), no_bias, {cute::_0{}, cute::_1{}, N}},  // Bias
          {}                                                                         // Compute
      },
      {static_cast<ElementOut*>(p.out), {p.ldo, cute::_1{}, p.ldo * p.M}}  // Store
  };
  // Stream-K knobs: avail_sms -1 lets CUTLASS choose per call (heuristic),
  // 1 means classic data-parallel tiles; split > 1 in kGemm mode emulates
  // split-K through the stream-K fixup (int32 partials, exact). There is no
  // raster knob in CUTLASS 2.x's stream-K swizzle: p.raster is ignored here.
  const int split = p.streamk_mode == StreamKMode::kSplitK ? p.splits : 1;
  const int avail_sms = p.streamk_mode == StreamKMode::kDataParallel ? 1 : -1;
  typename GemmKernel::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, split, callbacks,
                                      p.a, p.b, /*ptr_C=*/nullptr, /*ptr_D=*/nullptr,
                                      /*batch strides*/ 0, 0, 0, 0,
                                      /*lda=*/p.K, /*ldb=*/p.K, /*ldc=*/0, /*ldd=*/0, avail_sms);
  // No GemmKernel::can_implement(): besides the K alignment checked above it
  // demands N % 4 == 0 for the base epilogue's C/D iterators, which the EVT
  // epilogue does not use; its stores and broadcasts stay inside [M, ldo]
  // and [ldo] as explained above.
  if (!valid_knobs(p.streamk_mode, p.splits, p.raster)) return cudaErrorInvalidValue;
  cudaError_t err = sm80::opt_in_smem<GemmKernel, Kern::kUsedOnSm90>();
  if (err != cudaSuccess) return sm80::failed(err);
  int occupancy = 0;
  err = sm80::kernel_occupancy<GemmKernel, Kern::kUsedOnSm90>(p.device, &occupancy);
  if (err != cudaSuccess) return sm80::failed(err);
  typename GemmKernel::Params params(args, p.sm_count, occupancy);
  const size_t needed = params.get_workspace_size();
  if (workspace_bytes != nullptr) {
    *workspace_bytes = needed;
    return cudaSuccess;
  }
  if (needed > p.workspace_bytes) return cudaErrorInvalidValue;
  if (params.init_workspace(p.workspace, stream) != cutlass::Status::kSuccess)
    return sm80::failed(cudaErrorInvalidValue);
  const dim3 grid = params.get_grid_dims();
  const dim3 block(GemmKernel::kThreadCount, 1, 1);
  constexpr int kSmem = static_cast<int>(sizeof(typename GemmKernel::SharedStorage));
  sm80::quant_gemm_sm80_kernel<GemmKernel, Kern::kUsedOnSm90><<<grid, block, kSmem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace gemm
}  // namespace qsvd
