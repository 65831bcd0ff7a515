// latent_attention kernels that read weights of one type (__half): the RoPE
// split kernels (INT8 and INT4 latents), the q_lat prologue and the combine.
// One file per weight type so the builds run in parallel. Torch-free.
#include "qsvd/kernels/latent_attention_kernel.cuh"

namespace qsvd {
namespace latent {

cudaError_t launch_latent_split_rope_f16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_split_bits<true, __half>(p, stream);
}

cudaError_t launch_latent_prologue_f16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_prologue<__half>(p, stream);
}

cudaError_t launch_latent_combine_f16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_combine<__half>(p, stream);
}

}  // namespace latent
}  // namespace qsvd
