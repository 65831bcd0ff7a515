// Code formats and element types: the one place that says what a bit width
// means in memory, and the one dtype enum every kernel takes.
//
// Adding a bit width is an entry here (and in qsvd_kernels/formats.py) plus
// the kernel instantiations; nothing else should spell out "4 bits: two codes
// per byte".
#pragma once

#include <cstdint>

#include "qsvd/config.h"

namespace qsvd {

// Element and output types of every kernel (activations, weights, outputs,
// codes). One enum for all kernels, so a value means the same everywhere.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI8 = 3, kU8 = 4 };

// How codes of a bit width are stored: symmetric range [-qmax, qmax]
// (-2^(bits-1) is never produced); INT8 one signed byte per code; INT4 two's
// complement nibbles, element 2i in the low nibble of byte i (uint8 storage).
struct CodeFormat {
  int bits;
  int qmax;
  int codes_per_byte;
  DType storage;
};

constexpr QSVD_HOST_DEVICE bool is_code_bits(int64_t bits) { return bits == 4 || bits == 8; }

constexpr QSVD_HOST_DEVICE CodeFormat code_format(int bits) {
  return bits == 4 ? CodeFormat{4, 7, 2, DType::kU8} : CodeFormat{8, 127, 1, DType::kI8};
}

// Symmetric code range [-qmax, qmax].
constexpr QSVD_HOST_DEVICE int qmax_for_bits(int bits) { return code_format(bits).qmax; }

// Bytes (= storage elements) that n codes occupy; n must be a multiple of
// codes_per_byte (callers check).
constexpr QSVD_HOST_DEVICE int64_t code_row_bytes(int bits, int64_t n) {
  return n / code_format(bits).codes_per_byte;
}

}  // namespace qsvd
