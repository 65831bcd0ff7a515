// latent_attention split kernels without RoPE (K absorbed into q_lat by the
// prologue): INT8 and INT4 latents. They read no weights, so one
// instantiation per bit width serves every weight type. Torch-free.
#include "qsvd/kernels/latent_attention_kernel.cuh"

namespace qsvd {
namespace latent {

cudaError_t launch_latent_split_norope(const LatentAttentionParams& p, cudaStream_t stream) {
  // The weight type is not read without RoPE; int8_t is a placeholder.
  return detail::launch_split_bits<false, int8_t>(p, stream);
}

}  // namespace latent
}  // namespace qsvd
