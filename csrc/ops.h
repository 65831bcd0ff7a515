// Entry points of every op, one per backend. Schemas and registration:
// torch_bindings.cpp. Argument semantics: docs/ops.md.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "latent_params.h"

namespace qsvd_torch {

// ---- CPU (csrc/cpu/) ----
at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& signs);
std::tuple<at::Tensor, at::Tensor> hadamard_quant_cpu(const at::Tensor& x, int64_t bits, double clip_ratio,
                                                      const std::optional<at::Tensor>& signs);
at::Tensor quant_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits, at::ScalarType out_dtype,
                          const std::optional<at::Tensor>& bias);
// Which path quant_gemm_cpu takes for M rows and K (reads
// QSVD_CPU_QUANT_GEMM; csrc/cpu/quant_gemm.cpp says why).
enum class CpuGemmPath { kEmpty, kScalar, kBrgemm, kOneDnn };
CpuGemmPath quant_gemm_cpu_path(int64_t M, int64_t K);
void latent_cache_append_cpu(const at::Tensor& c, const at::Tensor& slot_mapping, at::Tensor& cache,
                             const std::optional<at::Tensor>& cache_scale, int64_t bits, double clip_ratio,
                             bool check_indices);
std::tuple<at::Tensor, at::Tensor> latent_attention_cpu(QSVD_LATENT_ATTENTION_PARAMS);
void latent_rope_keys_append_cpu(QSVD_ROPE_KEYS_APPEND_PARAMS);
std::tuple<at::Tensor, at::Tensor> latent_reconstruct_kv_cpu(QSVD_LATENT_RECONSTRUCT_PARAMS);

// ---- CUDA (csrc/cuda/), built when QSVD_WITH_CUDA is defined ----
#ifdef QSVD_WITH_CUDA
at::Tensor hadamard_transform_cuda(const at::Tensor& x, const std::optional<at::Tensor>& signs);
std::tuple<at::Tensor, at::Tensor> hadamard_quant_cuda(const at::Tensor& x, int64_t bits, double clip_ratio,
                                                       const std::optional<at::Tensor>& signs);
// csrc/cuda/quant_gemm.cpp
at::Tensor quant_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits, at::ScalarType out_dtype,
                           const std::optional<at::Tensor>& bias);
// csrc/cuda/latent_cache.cpp
void latent_cache_append_cuda(const at::Tensor& c, const at::Tensor& slot_mapping, at::Tensor& cache,
                              const std::optional<at::Tensor>& cache_scale, int64_t bits, double clip_ratio,
                              bool check_indices);
std::tuple<at::Tensor, at::Tensor> latent_reconstruct_kv_cuda(QSVD_LATENT_RECONSTRUCT_PARAMS);
// csrc/cuda/latent_attention.cpp
std::tuple<at::Tensor, at::Tensor> latent_attention_cuda(QSVD_LATENT_ATTENTION_PARAMS);
// Refuses (no CUDA kernel yet), with the op's checks first.
void latent_rope_keys_append_cuda(QSVD_ROPE_KEYS_APPEND_PARAMS);
#endif

// latent_attention_plan, every device (csrc/plan.cpp)
at::Tensor latent_attention_plan(const at::Tensor& q, QSVD_LATENT_CACHE_PARAMS, QSVD_ROPE_PARAMS,
                                 const std::optional<at::Tensor>& rope_keys);

}  // namespace qsvd_torch
