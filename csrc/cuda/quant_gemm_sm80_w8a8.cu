// CUTLASS 2.x quant_gemm kernels, int8 x int8 (mma m16n8k32). On sm_90a these compile to a trap:
// Hopper runs W8A8 on the CUTLASS 3.x kernels (quant_gemm_sm90_*.cu).
// Both tile configurations x three output types; one file per bit pair so
// that the instantiations compile in parallel.
//
// NDEBUG: CUTLASS's device-side asserts would cost branches in the mainloop.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "qsvd/kernels/quant_gemm_sm80.cuh"

namespace qsvd {
namespace gemm {

template cudaError_t run_sm80<GemmConfig::kSm80Decode, 8, 8, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 8, 8, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 8, 8, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 8, 8, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 8, 8, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 8, 8, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);

}  // namespace gemm
}  // namespace qsvd
