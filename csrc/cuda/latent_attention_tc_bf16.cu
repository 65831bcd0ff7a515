// Tensor-core RoPE split kernels of latent_attention for __nv_bfloat16 weights (INT8
// and INT4 latents). One file per weight type so the builds run in parallel.
// Torch-free.
#include "qsvd/kernels/latent_attention_tc.cuh"

namespace qsvd {
namespace latent {

cudaError_t launch_latent_split_rope_tc_bf16(const LatentAttentionParams& p, cudaStream_t stream) {
  return detail::launch_split_rope_tc_bits<__nv_bfloat16>(p, stream);
}

}  // namespace latent
}  // namespace qsvd
