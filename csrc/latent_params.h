// The latent ops' parameter lists, as torch_bindings.cpp's schemas fix them.
// Every backend's kernel, the plan op and the shared checks take the same
// arguments in the same order, so the lists are written once, here; the
// names are the schemas' (docs/ops.md).
#pragma once

#include <ATen/ATen.h>

#include <optional>

// The paged latent cache, its block table and lengths, the up-projections
// (int8 with scales, or float with none) and the code width.
#define QSVD_LATENT_CACHE_PARAMS                                                                        \
  const at::Tensor &cache, const std::optional<at::Tensor> &cache_scale, const at::Tensor &block_table, \
      const at::Tensor &seq_lens, const at::Tensor &w_uk, const std::optional<at::Tensor> &w_uk_scale,  \
      const at::Tensor &w_uv, const std::optional<at::Tensor> &w_uv_scale, int64_t bits

// The RoPE tables (both or neither; width d_rope <= d).
#define QSVD_ROPE_PARAMS const std::optional<at::Tensor> &rope_cos, const std::optional<at::Tensor> &rope_sin

// latent_attention(q, <cache>, sm_scale, <rope>, check_indices, plan, rope_keys)
#define QSVD_LATENT_ATTENTION_PARAMS                                                                 \
  const at::Tensor &q, QSVD_LATENT_CACHE_PARAMS, double sm_scale, QSVD_ROPE_PARAMS, bool check_indices, \
      const std::optional<at::Tensor> &plan, const std::optional<at::Tensor> &rope_keys

// latent_rope_keys_append(cache, cache_scale, slot_mapping, positions, w_uk,
// w_uk_scale, bits, rope_cos, rope_sin, rope_keys, check_indices)
#define QSVD_ROPE_KEYS_APPEND_PARAMS                                                                          \
  const at::Tensor &cache, const std::optional<at::Tensor> &cache_scale, const at::Tensor &slot_mapping,      \
      const at::Tensor &positions, const at::Tensor &w_uk, const std::optional<at::Tensor> &w_uk_scale,        \
      int64_t bits, const at::Tensor &rope_cos, const at::Tensor &rope_sin, at::Tensor &rope_keys,            \
      bool check_indices

// latent_reconstruct_kv(<cache>, <rope>, out_dtype, check_indices, rope_keys)
#define QSVD_LATENT_RECONSTRUCT_PARAMS                                                                   \
  QSVD_LATENT_CACHE_PARAMS, QSVD_ROPE_PARAMS, std::optional<at::ScalarType> out_dtype, bool check_indices, \
      const std::optional<at::Tensor> &rope_keys
