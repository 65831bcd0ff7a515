// Instantiation of the Hadamard kernels for one element type (float);
// split per type so the builds run in parallel. Torch-free.
#include "qsvd/kernels/hadamard_kernel.cuh"

namespace qsvd {
namespace hadamard {

cudaError_t launch_hadamard_f32(const HadamardParams& p, cudaStream_t stream) {
  return detail::launch_hadamard_impl<float>(p, stream);
}

}  // namespace hadamard
}  // namespace qsvd
