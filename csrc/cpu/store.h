// Rounding an fp32 row to a kernel's output dtype, vectorised: the same
// round-to-nearest-even as static_cast<c10::Half / c10::BFloat16>(float)
// (qsvd/cpu/simd.h), so outputs keep their bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "qsvd/cpu/simd.h"

namespace qsvd_torch {
namespace cpu {

template <typename scalar_t>
inline void store_row(const float* in, int64_t n, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(out, in, n * sizeof(float));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    qsvd::cpu::float_to_bf16_row(in, n, reinterpret_cast<uint16_t*>(out));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (!qsvd::cpu::float_to_half_row(in, n, reinterpret_cast<uint16_t*>(out)))
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(in[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(in[i]);
  }
}

}  // namespace cpu
}  // namespace qsvd_torch
