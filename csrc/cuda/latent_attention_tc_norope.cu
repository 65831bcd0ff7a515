// Tensor-core no-RoPE split kernels of latent_attention (INT8 and INT4
// latents). They read no weights (q_lat comes from the prologue), so one
// instantiation per bit width serves every weight type. Torch-free.
#include "qsvd/kernels/latent_attention_tc.cuh"

namespace qsvd {
namespace latent {

cudaError_t launch_latent_split_norope_tc(const LatentAttentionParams& p, cudaStream_t stream) {
  return p.bits == 4 ? detail::launch_split_norope_tc<4>(p, stream) : detail::launch_split_norope_tc<8>(p, stream);
}

}  // namespace latent
}  // namespace qsvd
