// latent_attention kernels that read weights of one type (__nv_bfloat16): the RoPE
// split kernels (INT8 and INT4 latents), the q_lat prologue and the combine.
// One file per weight type so the builds run in parallel. Torch-free.
#include "qsvd/kernels/latent_attention_kernel.cuh"

namespace qsvd {
namespace latent {

cudaError_t launch_latent_split_rope_bf16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_split_bits<true, __nv_bfloat16>(p, stream);
}

cudaError_t launch_latent_prologue_bf16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_prologue<__nv_bfloat16>(p, stream);
}

cudaError_t launch_latent_combine_bf16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_combine<__nv_bfloat16>(p, stream);
}

}  // namespace latent
}  // namespace qsvd
