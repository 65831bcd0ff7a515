// Launch interface of the CUDA paged-latent-cache kernels: raw pointers,
// sizes, a stream, a cudaError_t. The torch launcher (csrc/cuda/latent_cache.cpp)
// includes only this; the kernels live in latent_cache_kernel.cuh.
//
//   latent_cache_append        quantize rows of c per token into the paged cache;
//   latent_reconstruct_kv      = gather_latent_codes (paged codes -> dense
//                                fp16/bf16 codes, token scales, positions)
//                              + a cuBLAS GEMM with fp32 output (the launcher's)
//                              + kv_epilogue (scales, RoPE over the first
//                                d_rope dims, one rounding)
//                              (+ copy_rope_keys: K's rotary dims from the
//                                cached rotary keys, when given);
//   latent_rope_keys_append    K's rotary part of cached rows, rotated, in fp16.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "qsvd/formats.h"
#include "qsvd/latent_cache_layout.h"

namespace qsvd {
namespace latent_cache {

struct CacheAppendParams {
  const void* c = nullptr;              // [T, r], row stride c_row_stride elements, unit column stride
  int64_t c_row_stride = 0;
  DType c_type = DType::kF32;
  const void* slot_mapping = nullptr;   // [T] int64 (slot_is_int64) or int32
  bool slot_is_int64 = true;
  // The paged cache, either layout (qsvd/latent_cache_layout.h): slot s's
  // codes (r int8 or r/2 packed INT4 bytes) at cache.codes + s *
  // cache.code_stride, its fp32 scale (4-byte aligned) at cache.scales + s * cache.scale_stride.
  LatentCacheLayout cache;
  int64_t T = 0;
  int64_t r = 0;                        // even for bits 4
  int64_t num_slots = 0;                // num_blocks * block_size; slots outside [0, num_slots) are skipped
  int bits = 8;                         // 8 or 4
  float clip_ratio = 1.f;               // (0, 1]
  // 16-byte loads of c and 4-byte-aligned stores of codes: r % 8 == 0 and
  // every row start suitably aligned (the launcher checks: c rows at 16
  // bytes; code rows, base and cache.code_stride, at 4 bytes).
  bool vectorized = false;
  // With vectorized int8 codes: 8-byte stores (code rows at 8 bytes: the
  // separate layout), else two 4-byte stores (packed rows, stride r + 4).
  bool codes_8byte = false;
};

// One definition per input element type (csrc/cuda/latent_cache_kernels.cu).
cudaError_t launch_cache_append_f32(const CacheAppendParams& p, cudaStream_t stream);
cudaError_t launch_cache_append_f16(const CacheAppendParams& p, cudaStream_t stream);
cudaError_t launch_cache_append_bf16(const CacheAppendParams& p, cudaStream_t stream);

inline cudaError_t launch_cache_append(const CacheAppendParams& p, cudaStream_t stream) {
  switch (p.c_type) {
    case DType::kF32: return launch_cache_append_f32(p, stream);
    case DType::kF16: return launch_cache_append_f16(p, stream);
    case DType::kBF16: return launch_cache_append_bf16(p, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

// Packed rows [row_begin, row_begin + rows) of the varlen layout (sequences
// in batch order, cu_seqlens[b] = first row of sequence b): the unpacked
// codes as a dense matrix, the token scales and each row's position t.
struct GatherCodesParams {
  // The paged cache [num_blocks * block_size slots], either layout
  // (qsvd/latent_cache_layout.h), as in CacheAppendParams.
  LatentCacheLayout cache;
  const int32_t* block_table = nullptr; // [B, max_blocks], contiguous
  const int64_t* cu_seqlens = nullptr;  // [B + 1]; seq b's length <= max_blocks * block_size
  int64_t B = 0, max_blocks = 0, num_blocks = 0, block_size = 0, r = 0;
  int bits = 8;
  int64_t row_begin = 0, rows = 0;      // row_begin + rows <= cu_seqlens[B]
  void* codes = nullptr;                // [rows, r] of codes_type (kF16 or kBF16), contiguous
  DType codes_type = DType::kF16;
  float* token_scale = nullptr;         // [rows]
  int32_t* position = nullptr;          // [rows]
  int64_t* slot = nullptr;              // [rows] the row's cache slot (-1: a bad block id), or nullptr: not written
  // 4-byte-aligned loads of codes and 16-byte stores: r % 8 == 0, the code
  // base and cache.code_stride multiples of 4 (the launcher checks).
  bool vectorized = false;
  // With vectorized int8 codes: 8-byte loads (base and stride at 8 bytes),
  // else two 4-byte loads.
  bool codes_8byte = false;
};
cudaError_t launch_gather_codes(const GatherCodesParams& p, cudaStream_t stream);

// out[row, h, j] = round(RoPE_pos(acc[row, h*d + j] * token_scale[row] (* w_scale[h*d + j])))
// (RoPE over dims j < d_rope among themselves: rotate-half of width d_rope;
// dims j >= d_rope unrotated.)
struct KvEpilogueParams {
  const float* acc = nullptr;           // [rows, acc_row_stride] fp32, columns h*d + j
  int64_t acc_row_stride = 0;
  const float* token_scale = nullptr;   // [rows]
  const int32_t* position = nullptr;    // [rows], each < the RoPE table length
  const float* w_scale = nullptr;       // [H_kv * d] (int8 weights) or nullptr
  const float* rope_cos = nullptr;      // [max_position, d_rope] or nullptr (no RoPE); d_rope even
  const float* rope_sin = nullptr;
  int64_t d_rope = 0;                   // rotary dims (the tables' width), <= d
  void* out = nullptr;                  // [rows, H_kv, d] of out_type, contiguous
  DType out_type = DType::kF16;
  int64_t rows = 0, H_kv = 0, d = 0;
  // Four consecutive channels per thread with 16-byte fp32 loads: d % 8 == 0
  // (and d_rope % 8 == 0 with RoPE), acc_row_stride % 4 == 0 and acc / rope
  // / w_scale 16-byte aligned.
  bool vectorized = false;
};
cudaError_t launch_kv_epilogue(const KvEpilogueParams& p, cudaStream_t stream);

// out[row, h, j] = rope_keys[slot[row], h, j] for j < d_rope (0 where slot <
// 0): K's rotary dims read from the cached rotary keys, after kv_epilogue.
struct CopyRopeKeysParams {
  const void* rope_keys = nullptr;      // fp16 [num_slots, H_kv, d_rope]
  const int64_t* slot = nullptr;        // [rows] (gather_codes' slot output), each < num_slots or -1
  void* out = nullptr;                  // [rows, H_kv, d] of out_type, contiguous
  DType out_type = DType::kF16;
  int64_t rows = 0, H_kv = 0, d = 0, d_rope = 0;
};
cudaError_t launch_copy_rope_keys(const CopyRopeKeysParams& p, cudaStream_t stream);

// latent_rope_keys_append: for each row n with a slot in [0, num_slots) and a
// position in [0, rope_len) (others are skipped: the launcher's host check
// raises on them first), keys[slot, h, j] = fp16(RoPE_pos(k)[h, j]) for j <
// d_rope, k[h, j] = ((sum_i code_i W_uk[h, i, j]) * token_scale) (*
// w_uk_scale[h, j]): the CPU kernel's arithmetic (fp32 sums of exact
// products; int32 for int8 weights). A finite key that rounds to an infinite
// fp16 lowers *overflow to its row (atomicMin: the first such row), for the
// launcher to report.
struct RopeKeysAppendParams {
  LatentCacheLayout cache;              // either layout, as in CacheAppendParams
  const void* slot_mapping = nullptr;   // [N] int64 (slot_is_int64) or int32
  bool slot_is_int64 = true;
  const void* positions = nullptr;      // [N] int64 (pos_is_int64) or int32
  bool pos_is_int64 = true;
  const void* w_uk = nullptr;           // [H_kv, r, d] of weight_type, contiguous
  DType weight_type = DType::kF16;      // kF16, kBF16 or kI8
  const float* w_uk_scale = nullptr;    // [H_kv, d] (int8 weights) or nullptr
  const float* rope_cos = nullptr;      // [rope_len, d_rope]
  const float* rope_sin = nullptr;
  void* rope_keys = nullptr;            // fp16 [num_slots, H_kv, d_rope]
  int* overflow = nullptr;              // one int, INT_MAX before the launch
  int64_t N = 0, r = 0, H_kv = 0, d = 0, d_rope = 0, num_slots = 0, rope_len = 0;
  int bits = 8;
};
cudaError_t launch_rope_keys_append(const RopeKeysAppendParams& p, cudaStream_t stream);

}  // namespace latent_cache
}  // namespace qsvd
