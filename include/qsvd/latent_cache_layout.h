// Where the codes and the scale of each slot of the paged latent cache are:
// the one description every latent kernel (CPU and CUDA) reads and writes
// through, so the two cache layouts are one concept in one place.
//
//   separate (two tensors): cache codes [num_blocks, block_size, row_bytes]
//     and cache_scale fp32 [num_blocks, block_size]. Codes of slot s at
//     cache + s * row_bytes, its scale at cache_scale + s * 4.
//   packed rows (one tensor, cache_scale None): uint8
//     [num_blocks, block_size, row_bytes + 4]; a slot's row is its codes
//     (the bytes of the separate layout) followed by its fp32 scale (native
//     byte order) at byte offset row_bytes. Codes of slot s at
//     cache + s * (row_bytes + 4), its scale at cache + row_bytes + s *
//     (row_bytes + 4). row_bytes % 4 == 0 keeps every scale 4-byte aligned.
//
// row_bytes = code_row_bytes(bits, r): r for INT8, r / 2 for INT4.
#pragma once

#include <cstdint>

#include "qsvd/config.h"
#include "qsvd/formats.h"

namespace qsvd {

// Bytes of a slot's fp32 scale.
inline constexpr int64_t kLatentScaleBytes = 4;

// Bytes of one packed row: the codes, then the fp32 scale.
constexpr QSVD_HOST_DEVICE int64_t packed_row_bytes(int bits, int64_t r) {
  return code_row_bytes(bits, r) + kLatentScaleBytes;
}

// Slot s (flat: block * block_size + offset): codes at codes + s *
// code_stride (code_row_bytes(bits, r) bytes), fp32 scale at scales + s *
// scale_stride. Strides in bytes. Read-only users keep the pointers as they
// are (nothing here writes).
struct LatentCacheLayout {
  uint8_t* codes = nullptr;
  int64_t code_stride = 0;
  uint8_t* scales = nullptr;
  int64_t scale_stride = 0;

  QSVD_HOST_DEVICE uint8_t* codes_of(int64_t slot) const { return codes + slot * code_stride; }
  QSVD_HOST_DEVICE float* scale_of(int64_t slot) const {
    return reinterpret_cast<float*>(scales + slot * scale_stride);
  }
};

// Two tensors: contiguous codes [num_slots, row_bytes], contiguous fp32 scales [num_slots].
inline QSVD_HOST_DEVICE LatentCacheLayout separate_latent_layout(const void* codes, const void* scales, int bits, int64_t r) {
  return {const_cast<uint8_t*>(static_cast<const uint8_t*>(codes)), code_row_bytes(bits, r),
          const_cast<uint8_t*>(static_cast<const uint8_t*>(scales)), kLatentScaleBytes};
}

// One tensor of packed rows [num_slots, row_bytes + 4], contiguous.
inline QSVD_HOST_DEVICE LatentCacheLayout packed_latent_layout(const void* cache, int bits, int64_t r) {
  uint8_t* base = const_cast<uint8_t*>(static_cast<const uint8_t*>(cache));
  return {base, packed_row_bytes(bits, r), base + code_row_bytes(bits, r), packed_row_bytes(bits, r)};
}

}  // namespace qsvd
