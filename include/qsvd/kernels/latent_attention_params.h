// Launch interface of the CUDA latent_attention (decode) kernels: raw
// pointers, sizes, a stream, a cudaError_t. The torch launcher
// (csrc/cuda/latent_attention.cpp) includes only this; the kernels live in
// latent_attention_kernel.cuh.
//
// Three kernels run in order on one stream:
//   1. prologue (no RoPE only): q_lat[b, h] = W_uk[kv] (q[b, h] * w_uk_scale * score_scale), fp32 [B, H, r];
//   2. split: grid (split, kv head x head tile, b); each CTA streams its token
//      range of one sequence once for all the query heads of its tile and
//      writes an unnormalised partial (acc [r], running max m, sum l) per head;
//   3. combine: per (b, head tile) merges the splits, up-projects with W_uv,
//      divides by the sum and writes out (q's dtype) and lse.
// Softmax runs in base 2 with an integer running max (see the kernel header),
// so every rescale is an exact power of two.
//
// The parameter struct and the plan are in latent_attention_plan.h (plain
// C++, testable without a GPU).
#pragma once

#include <cuda_runtime_api.h>

#include "qsvd/kernels/latent_attention_plan.h"

namespace qsvd {
namespace latent {

// One definition per weight type (csrc/cuda/latent_attention_{f16,bf16,i8}.cu):
// the RoPE split kernels, the q_lat prologue and the combine kernels of that
// weight type. The no-RoPE split kernels do not read weights
// (csrc/cuda/latent_attention_norope.cu).
cudaError_t launch_latent_prologue_f16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_prologue_bf16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_prologue_i8(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_split_rope_f16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_split_rope_bf16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_split_rope_i8(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_combine_f16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_combine_bf16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_combine_i8(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_split_norope(const LatentAttentionParams& p, cudaStream_t stream);
// Tensor-core RoPE split kernels (csrc/cuda/latent_attention_tc_{f16,bf16,i8}.cu).
cudaError_t launch_latent_split_rope_tc_f16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_split_rope_tc_bf16(const LatentAttentionParams& p, cudaStream_t stream);
cudaError_t launch_latent_split_rope_tc_i8(const LatentAttentionParams& p, cudaStream_t stream);
// Tensor-core no-RoPE split kernels (csrc/cuda/latent_attention_tc_norope.cu).
cudaError_t launch_latent_split_norope_tc(const LatentAttentionParams& p, cudaStream_t stream);

// Runs the three kernels. p must be planned (plan_latent_attention).
inline cudaError_t launch_latent_attention(const LatentAttentionParams& p, cudaStream_t stream) {
  const bool rope = p.rope_cos != nullptr;
  const bool tc = p.split_kernel == SplitKernel::kTensorCore;
  // Cached rotary keys: only the CUDA-core absorbed kernel reads them.
  if (p.rope_keys != nullptr && (rope || tc || p.d_rope < 1 || p.d_rope > p.d)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  switch (p.weight_type) {
    case DType::kF16:
      err = !rope ? launch_latent_prologue_f16(p, stream)
                  : (tc ? launch_latent_split_rope_tc_f16(p, stream) : launch_latent_split_rope_f16(p, stream));
      break;
    case DType::kBF16:
      err = !rope ? launch_latent_prologue_bf16(p, stream)
                  : (tc ? launch_latent_split_rope_tc_bf16(p, stream) : launch_latent_split_rope_bf16(p, stream));
      break;
    case DType::kI8:
      err = !rope ? launch_latent_prologue_i8(p, stream)
                  : (tc ? launch_latent_split_rope_tc_i8(p, stream) : launch_latent_split_rope_i8(p, stream));
      break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  if (!rope) {
    err = tc ? launch_latent_split_norope_tc(p, stream) : launch_latent_split_norope(p, stream);
    if (err != cudaSuccess) return err;
  }
  switch (p.weight_type) {
    case DType::kF16: return launch_latent_combine_f16(p, stream);
    case DType::kBF16: return launch_latent_combine_bf16(p, stream);
    case DType::kI8: return launch_latent_combine_i8(p, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace latent
}  // namespace qsvd
