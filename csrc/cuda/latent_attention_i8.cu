// latent_attention kernels that read weights of one type (int8_t): the RoPE
// split kernels (INT8 and INT4 latents), the q_lat prologue and the combine.
// One file per weight type so the builds run in parallel. Torch-free.
#include "qsvd/kernels/latent_attention_kernel.cuh"

namespace qsvd {
namespace latent {

cudaError_t launch_latent_split_rope_i8(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_split_bits<true, int8_t>(p, stream);
}

cudaError_t launch_latent_prologue_i8(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_prologue<int8_t>(p, stream);
}

cudaError_t launch_latent_combine_i8(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_combine<int8_t>(p, stream);
}

}  // namespace latent
}  // namespace qsvd
