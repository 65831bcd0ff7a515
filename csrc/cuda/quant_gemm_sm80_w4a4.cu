// CUTLASS 2.x quant_gemm kernels, int4 x int4 (mma m16n8k64). Also the Hopper path: there is no INT4
// wgmma, and ptxas lowers the s4 mma.sync on sm_90a to INT4 -> INT8 register
// unpacking plus IMMA.16832.S8 (about 170 ALU ops and 2 IMMA per m16n8k64).
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

template cudaError_t run_sm80<GemmConfig::kSm80Decode, 4, 4, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 4, 4, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 4, 4, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 4, 4, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 4, 4, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 4, 4, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);

}  // namespace gemm
}  // namespace qsvd
