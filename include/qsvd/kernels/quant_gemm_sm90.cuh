// quant_gemm W8A8 on Hopper (compute capability 9.0, target sm_90a):
// CUTLASS 3.x warp-specialized wgmma GEMM (TMA loads, int8 x int8 -> int32)
// with an Sm90 epilogue visitor tree: a_scale broadcast along columns (one
// per row m), b_scale and bias broadcast along rows (one per column n), the
// shared DequantScaleBias node, and a TMA store of the output.
//
// Both configurations use the cooperative kernel (two consumer warpgroups
// on 128-row tiles) because it is the one that supports the stream-K tile
// scheduler: with few output tiles (decode, or a small N) the K loop is
// split across SMs and the int32 partial sums are added in the workspace,
// exactly; with many tiles the heuristic falls back to data-parallel tiles.
//   decode  (M <= 64): 128 x 64 x 128 tiles, cluster 1x1x1 (more, narrower
//                      N tiles: more CTAs streaming the weights).
//   prefill (M > 64) : 128 x 128 x 128 tiles, cluster 2x1x1 (the two CTAs of
//                      a cluster share each B tile through TMA multicast).
// The INT4 operands have no wgmma; Hopper runs them on the CUTLASS 2.x
// kernels (quant_gemm_sm80.cuh), see select_config().
//
// Compiled for sm_80 too (one source, both targets), where CUTLASS's sm90
// kernels compile to an empty body; the dispatch never launches them there.
#pragma once

// A plain sm_90 target (TORCH_CUDA_ARCH_LIST "9.0" instead of "9.0a")
// would compile CUTLASS's wgmma kernels to a body that only printf()s an
// error and returns, leaving the output unwritten while the launch
// "succeeds": refuse to build that instead.
//
// This guard needs the explicit form -gencode=arch=compute_90a,code=sm_90a
// (what torch's "9.0a" produces). nvcc 13's shorthand -arch=sm_90a also runs
// a generic compute_90 pass, where __CUDA_ARCH_FEAT_SM90_ALL is not defined,
// and this #error fires there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "quant_gemm's Hopper kernels need the arch-specific target sm_90a: use TORCH_CUDA_ARCH_LIST=9.0a, not 9.0"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "qsvd/kernels/quant_gemm_epilogue.cuh"
#include "qsvd/kernels/quant_gemm_params.h"

namespace qsvd {
namespace gemm {
namespace sm90 {

// Tile and cluster of a menu entry (quant_gemm_menu.h, generated from
// qsvd_kernels/tuning/gemm_menu.py).
template <GemmConfig kConfig>
struct Tiles {
  static constexpr GemmConfigInfo kInfo = kGemmConfigs[static_cast<int>(kConfig)];
  static_assert(kInfo.arch == GemmArch::kSm90, "not a CUTLASS 3.x menu entry");
  static_assert(kInfo.schedule == GemmSchedule::kCooperativeStreamK, "sm90 entries are cooperative + stream-K");
  using Tile = cute::Shape<cute::Int<kInfo.tile_m>, cute::Int<kInfo.tile_n>, cute::Int<kInfo.tile_k>>;
  using Cluster = cute::Shape<cute::Int<kInfo.cluster_m>, cute::Int<kInfo.cluster_n>, cute::_1>;
};

template <GemmConfig kConfig, DType kOut>
struct Kernel {
  using Tile = typename Tiles<kConfig>::Tile;
  using Cluster = typename Tiles<kConfig>::Cluster;
  using ElementOut = typename OutElementOf<kOut>::type;
  static constexpr int kAlignAB = 16;                                    // int8 elements: 16 bytes
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;  // 16-byte TMA rows

  using RoundStyle = std::integral_constant<cutlass::FloatRoundStyle, cutlass::FloatRoundStyle::round_to_nearest>;
  // a_scale: one value per row, read element by element (alignment 1), so
  // no vector ever reaches past M.
  using ScaleA = cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float, float,
                                                             cute::Stride<cute::_1, cute::_0, cute::_0>, 1>;
  // b_scale and bias: one value per column; the row broadcast copies them
  // element by element into shared memory, predicated on n < N.
  using ScaleB = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float,
                                                             cute::Stride<cute::_0, cute::_1, cute::_0>, 1>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, ElementOut, float,
                                                           cute::Stride<cute::_0, cute::_1, cute::_0>, 1>;
  using Compute = cutlass::epilogue::fusion::Sm90Compute<DequantScaleBias, ElementOut, float,
                                                         cutlass::FloatRoundStyle::round_to_nearest>;
  using EVT = cutlass::epilogue::fusion::Sm90EVT<Compute, cutlass::epilogue::fusion::Sm90AccFetch, ScaleA, ScaleB,
                                                 Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, kAlignOut,        // no C operand
      ElementOut, cutlass::layout::RowMajor, kAlignOut,  // D
      cutlass::epilogue::TmaWarpSpecializedCooperative, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      int8_t, cutlass::layout::RowMajor, kAlignAB,
      int8_t, cutlass::layout::ColumnMajor, kAlignAB,
      int32_t, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

}  // namespace sm90

// Definition of the entry point declared in quant_gemm_params.h; explicitly
// instantiated in the files setup.py generates from the menu
// (build/generated/quant_gemm/quant_gemm_sm90_*.cu).
template <GemmConfig kConfig, DType kOut>
cudaError_t run_sm90(const QuantGemmParams& p, cudaStream_t stream, size_t* workspace_bytes) {
  using Kern = sm90::Kernel<kConfig, kOut>;
  using Gemm = typename Kern::Gemm;
  using GemmKernel = typename Kern::GemmKernel;
  using ElementOut = typename Kern::ElementOut;
  if (p.a_bits != 8 || p.b_bits != 8 || p.M <= 0 || p.N <= 0 || p.K <= 0 || p.ldo < p.N ||
      p.K % k_alignment(8, 8) != 0 || p.ldo % out_alignment(kOut) != 0 || p.sm_count <= 0 || p.M > INT32_MAX ||
      p.ldo > INT32_MAX || p.K > INT32_MAX)
    return cudaErrorInvalidValue;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);

  using StrideA = typename GemmKernel::StrideA;
  using StrideB = typename GemmKernel::StrideB;
  using StrideD = typename GemmKernel::StrideD;
  const StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
  const StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
  StrideD stride_d{};
  cute::get<0>(stride_d) = p.ldo;  // row stride of out; the column stride is 1
  cute::get<2>(stride_d) = p.ldo * p.M;

  // Without a bias the broadcast feeds -0.0f (x + -0 == x, see DequantScaleBias).
  const ElementOut no_bias = ElementOut(-0.0f);
  typename Kern::EVT::Arguments fusion{
      {},                                                           // Sm90AccFetch
      {p.a_scale, 1.0f, {}},                                        // ScaleA
      {p.b_scale, 1.0f, {}},                                        // ScaleB
      {static_cast<const ElementOut*>(p.bias), no_bias, {}},        // Bias
      {}                                                            // Compute
  };
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = cute::make_shape(M, N, K, 1);
  args.mainloop = {static_cast<const int8_t*>(p.a), stride_a, static_cast<const int8_t*>(p.b), stride_b};
  args.epilogue = {fusion, nullptr, {}, static_cast<ElementOut*>(p.out), stride_d};
  args.hw_info.device_id = p.device;
  args.hw_info.sm_count = p.sm_count;
  if (!valid_knobs(p.streamk_mode, p.splits, p.raster)) return cudaErrorInvalidValue;
  using Decomposition = cutlass::gemm::kernel::detail::DecompositionMode;
  using RasterOrder = cutlass::gemm::kernel::detail::RasterOrderOptions;
  args.scheduler.decomposition_mode = p.streamk_mode == StreamKMode::kDataParallel ? Decomposition::DataParallel
                                      : p.streamk_mode == StreamKMode::kSplitK     ? Decomposition::SplitK
                                                                                   : Decomposition::Heuristic;
  args.scheduler.splits = p.streamk_mode == StreamKMode::kSplitK ? p.splits : 1;
  args.scheduler.raster_order = p.raster == Raster::kAlongM   ? RasterOrder::AlongM
                                : p.raster == Raster::kAlongN ? RasterOrder::AlongN
                                                              : RasterOrder::Heuristic;

  // No Gemm::can_implement(): it demands N % kAlignOut == 0 for D, which
  // TMA does not need (the tensor map has extent N and row stride ldo, a
  // multiple of 16 bytes; the store clips at N). What TMA does need is
  // checked above and in the dispatch: K % 16, ldo % kAlignOut, and 16-byte
  // aligned base pointers.
  const size_t needed = Gemm::get_workspace_size(args);
  if (workspace_bytes != nullptr) {
    *workspace_bytes = needed;
    return cudaSuccess;
  }
  if (needed > p.workspace_bytes) return cudaErrorInvalidValue;
  // A build without sm_90a code (e.g. "8.0+PTX" run on an H100) would
  // JIT-compile this kernel from compute_80 PTX, where CUTLASS's wgmma
  // kernel is an empty body: refuse instead of returning garbage.
  static const cudaError_t image = [] {
    cudaFuncAttributes attr{};
    const cudaError_t e = cudaFuncGetAttributes(&attr, cutlass::device_kernel<GemmKernel>);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return e;
    }
    return attr.ptxVersion >= 90 ? cudaSuccess : cudaErrorNoKernelImageForDevice;
  }();
  if (image != cudaSuccess) return image;
  Gemm gemm;
  // initialize() also sets the kernel's shared-memory attribute (a
  // compile-time constant of the kernel, so concurrent callers agree); a
  // failure there leaves the runtime's last error set: clear it.
  if (gemm.initialize(args, p.workspace, stream) != cutlass::Status::kSuccess) {
    (void)cudaGetLastError();
    return cudaErrorInvalidValue;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace gemm
}  // namespace qsvd
