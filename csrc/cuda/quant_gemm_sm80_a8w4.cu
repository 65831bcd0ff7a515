// CUTLASS 2.x quant_gemm kernels, activations int8 x weights int4 (W4A8): the INT4 B operand is
// upcast to INT8 in registers (OpMultiplyAddMixedInputUpcast), int8 mma.
// Also the Hopper path (no INT4 wgmma).
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

template cudaError_t run_sm80<GemmConfig::kSm80Decode, 8, 4, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 8, 4, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 8, 4, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 8, 4, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 8, 4, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 8, 4, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);

}  // namespace gemm
}  // namespace qsvd
