// CUTLASS 2.x quant_gemm kernels, activations int4 x weights int8 (W8A4): the INT4 A operand is
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

template cudaError_t run_sm80<GemmConfig::kSm80Decode, 4, 8, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 4, 8, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Decode, 4, 8, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 4, 8, OutType::kF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 4, 8, OutType::kBF16>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);
template cudaError_t run_sm80<GemmConfig::kSm80Prefill, 4, 8, OutType::kF32>(const QuantGemmParams&,
                                                                              cudaStream_t, size_t*);

}  // namespace gemm
}  // namespace qsvd
