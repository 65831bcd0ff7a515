// CUTLASS 3.x quant_gemm kernels for Hopper W8A8 (bf16 output): both tile
// configurations of quant_gemm_sm90.cuh. One file per output type so the
// instantiations compile in parallel. On sm_80 they compile to empty bodies.
//
// NDEBUG: a device-side assert is a function call, and a call inside the
// mainloop makes ptxas serialize the wgmma pipeline (warning C7510).
#ifndef NDEBUG
#define NDEBUG
#endif
#include "qsvd/kernels/quant_gemm_sm90.cuh"

namespace qsvd {
namespace gemm {

template cudaError_t run_sm90<GemmConfig::kSm90Decode, OutType::kBF16>(const QuantGemmParams&, cudaStream_t,
                                                                     size_t*);
template cudaError_t run_sm90<GemmConfig::kSm90Prefill, OutType::kBF16>(const QuantGemmParams&, cudaStream_t,
                                                                     size_t*);

}  // namespace gemm
}  // namespace qsvd
