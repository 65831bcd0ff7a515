// Instantiations of the paged latent cache kernels (cache append per input
// element type, the reconstruct gather and epilogue, the cached rotary keys'
// append and copy). Torch-free.
#include "qsvd/kernels/latent_cache_kernel.cuh"

namespace qsvd {
namespace latent_cache {

cudaError_t launch_cache_append_f32(const CacheAppendParams& p, cudaStream_t stream) {
  return detail::launch_cache_append_impl<float>(p, stream);
}

cudaError_t launch_cache_append_f16(const CacheAppendParams& p, cudaStream_t stream) {
  return detail::launch_cache_append_impl<__half>(p, stream);
}

cudaError_t launch_cache_append_bf16(const CacheAppendParams& p, cudaStream_t stream) {
  return detail::launch_cache_append_impl<__nv_bfloat16>(p, stream);
}

cudaError_t launch_gather_codes(const GatherCodesParams& p, cudaStream_t stream) {
  return detail::launch_gather_codes_impl(p, stream);
}

cudaError_t launch_kv_epilogue(const KvEpilogueParams& p, cudaStream_t stream) {
  return detail::launch_kv_epilogue_impl(p, stream);
}

cudaError_t launch_copy_rope_keys(const CopyRopeKeysParams& p, cudaStream_t stream) {
  return detail::launch_copy_rope_keys_impl(p, stream);
}

cudaError_t launch_rope_keys_append(const RopeKeysAppendParams& p, cudaStream_t stream) {
  return detail::launch_rope_keys_append_impl(p, stream);
}

}  // namespace latent_cache
}  // namespace qsvd
