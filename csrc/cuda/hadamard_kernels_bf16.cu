// Instantiation of the Hadamard kernels for one element type (__nv_bfloat16);
// split per type so the builds run in parallel. Torch-free.
#include "qsvd/kernels/hadamard_kernel.cuh"

namespace qsvd {
namespace hadamard {

cudaError_t launch_hadamard_bf16(const HadamardParams& p, cudaStream_t stream) {
  return detail::launch_hadamard_impl<__nv_bfloat16>(p, stream);
}

}  // namespace hadamard
}  // namespace qsvd
