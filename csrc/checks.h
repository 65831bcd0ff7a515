// Argument validation shared by the CPU and CUDA implementations of every op:
// the same input gets the same error, naming the argument, on either device.
//
// Checks of tensor metadata (dtype, shape, device, contiguity, scalar ranges)
// live here. Checks of index *values* (slots, seq_lens, block_table) need
// the data: check_paged_indices_host() reads it on the CPU; the CUDA
// launchers copy the few indices they need or validate on the device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "latent_params.h"
#include "qsvd/formats.h"
#include "qsvd/hadamard.h"
#include "qsvd/latent_cache_layout.h"

namespace qsvd_torch {

// Error raised for a bad argument: RuntimeError for tensor metadata,
// ValueError for out-of-range values. Every message starts with the op
// name and names the argument in backticks.
#define QSVD_CHECK(cond, op, ...) TORCH_CHECK(cond, "qsvd.", op, ": ", __VA_ARGS__)
#define QSVD_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "qsvd.", op, ": ", __VA_ARGS__)

std::string shape_str(const at::Tensor& t);

void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                    std::initializer_list<at::ScalarType> allowed);
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim);
void check_same_device(const char* op, const char* ref_name, const at::Tensor& ref,
                       const char* name, const at::Tensor& t);
void check_contiguous(const char* op, const char* name, const at::Tensor& t);
void check_bits(const char* op, const char* name, int64_t bits);
// The torch dtype codes of a bit width are stored in (qsvd::code_format).
at::ScalarType code_dtype(int64_t bits);
void check_clip_ratio(const char* op, double clip_ratio);

// hadamard_transform / hadamard_quant
struct HadamardShape {
  int64_t K;
  int64_t rows;
  qsvd::hadamard::Factorization f;
};
HadamardShape check_hadamard(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& signs);
HadamardShape check_hadamard_quant(const at::Tensor& x, int64_t bits, double clip_ratio,
                                   const std::optional<at::Tensor>& signs);

// quant_gemm
struct GemmShape {
  int64_t M, N, K;
};
// Largest K whose int32 sums cannot overflow: 127 * 127 * K < 2^31.
inline constexpr int64_t kMaxGemmK = 131072;
GemmShape check_quant_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits,
                           at::ScalarType out_dtype, const std::optional<at::Tensor>& bias);

// The paged latent cache comes in two layouts (docs/ops.md, "The latent
// cache layouts"): separate (`cache` codes + `cache_scale` fp32) or packed
// rows (`cache_scale` None; `cache` uint8 [num_blocks, block_size,
// row_bytes + 4], each row its codes then its fp32 scale). The checks below
// validate either; latent_cache_layout() then says where a slot's codes and
// scale are (qsvd/latent_cache_layout.h), for the CPU and CUDA kernels.
//
// `cache` (and `cache_scale` when given) must already be contiguous.
qsvd::LatentCacheLayout latent_cache_layout(const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                                            int64_t bits, int64_t r);

// latent_cache_append
struct CacheAppendShape {
  int64_t T, r, num_blocks, block_size;
  bool packed;  // cache_scale is None: packed rows
};
CacheAppendShape check_latent_cache_append(const at::Tensor& c, const at::Tensor& slot_mapping,
                                           const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                                           int64_t bits, double clip_ratio);
// Value check of a CPU int64 copy of slot_mapping: every slot is below
// num_blocks * block_size (negative slots are padding).
void check_slot_mapping_host(const at::Tensor& slots_cpu, const CacheAppendShape& s);

// latent_attention / latent_reconstruct_kv
struct LatentShape {
  int64_t B, H_kv, r, d, num_blocks, block_size, max_blocks;
  bool rope;
  bool int8_weights;
  bool packed;  // cache_scale is None: packed rows (cache contiguous)
  int64_t d_rope;  // rotary dims per head (the RoPE tables' width; d: full RoPE, 0: none)
};
LatentShape check_latent_cache_and_weights(const char* op, QSVD_LATENT_CACHE_PARAMS, QSVD_ROPE_PARAMS);
// Adds the q checks; returns H through *num_heads.
// rope_keys (latent_attention, latent_reconstruct_kv,
// latent_rope_keys_append): the cache of K's rotary part, fp16
// [num_blocks, block_size, H_kv, d_rope] (d_rope: the RoPE tables' width,
// which must be given), contiguous, on `cache`'s device.
void check_rope_keys(const char* op, const at::Tensor& rope_keys, const LatentShape& s, const at::Tensor& cache);

// latent_rope_keys_append's arguments; returns the shape of the cache and
// weights (block_table and seq_lens absent: B = 0).
LatentShape check_latent_rope_keys_append(const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                                          const at::Tensor& slot_mapping, const at::Tensor& positions,
                                          const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
                                          int64_t bits, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                                          const at::Tensor& rope_keys);

// latent_rope_keys_append's index values on the host (int64 CPU tensors):
// each slot_mapping value < num_slots (negative: padding, skipped) and each
// real row's position in [0, rope_len). Raises naming the first bad one.
void check_rope_keys_rows_host(const char* op, const at::Tensor& slots, const at::Tensor& positions, int64_t num_slots,
                               int64_t rope_len);

// latent_rope_keys_append: a finite rotary key that fp16 cannot hold
// (overflow_row >= 0: that row) raises, naming the rebuilt form.
void check_rope_keys_in_range(const char* op, int64_t overflow_row);

// latent_attention's CUDA kernels serve full RoPE with K rebuilt, and
// partial RoPE (d_rope < d) only with K's rotary part cached (rope_keys,
// read by the absorbed kernels): the rebuilt partial form raises, naming
// rope_keys.
void check_cuda_rope_form(const char* op, const LatentShape& s, bool rope_keys);

LatentShape check_latent_attention(const at::Tensor& q, QSVD_LATENT_CACHE_PARAMS, double sm_scale, QSVD_ROPE_PARAMS,
                                   int64_t* num_heads);

// Value checks of the paging indices, on CPU copies of seq_lens and
// block_table: 0 <= seq_lens[b] <= max_blocks * block_size (and <= the RoPE
// table length), and every block a sequence uses is in [0, num_blocks).
// Returns sum(seq_lens).
int64_t check_paged_indices_host(const char* op, const at::Tensor& seq_lens_cpu,
                                 const at::Tensor& block_table_cpu, const LatentShape& s,
                                 int64_t rope_positions);


// Default output dtype of latent_reconstruct_kv: the weights' dtype when
// they are fp16/bf16, fp16 for int8 weights.
at::ScalarType reconstruct_out_dtype(const char* op, const at::Tensor& w_uk,
                                     std::optional<at::ScalarType> out_dtype);

// The kernels' element enum (qsvd::DType, include/qsvd/formats.h: the one
// numbering) of a torch dtype, CPU and CUDA alike. Callers have checked the
// dtype against the op's allowed set, so anything else is an internal error.
inline qsvd::DType to_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return qsvd::DType::kF32;
    case at::kHalf: return qsvd::DType::kF16;
    case at::kBFloat16: return qsvd::DType::kBF16;
    case at::kChar: return qsvd::DType::kI8;
    case at::kByte: return qsvd::DType::kU8;
    default: break;
  }
  QSVD_CHECK(false, op, "internal error: no kernel element type for dtype ", t);
  return qsvd::DType::kF32;
}

}  // namespace qsvd_torch
