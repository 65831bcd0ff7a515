// torch's int8 batch-reduce GEMM (at::native::cpublas::brgemm, int8 x int8
// -> int32) as the CPU kernels use it: the shapes it takes. Whether it
// serves now (with exact sums) is cpu_paths.h's int8_brgemm_ready().
// quant_gemm (small M) and latent_attention (the absorbed path's digit
// scores) both rely on its sums being exact.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <cstdint>

#include "cpu_paths.h"

namespace qsvd_torch {
namespace cpu {

// Shapes oneDNN's int8 brgemm takes in torch 2.13/2.14 (others end in
// SIGILL or a packing error): K a multiple of 4 (callers pad with zero
// codes, which add nothing) and N a multiple of 16 up to 64. A packed B
// operand gets room for K rounded up to 64 (the packing's K blocking).
constexpr int64_t kInt8BrgemmMaxN = 64;
inline int64_t int8_brgemm_k(int64_t K) { return (K + 3) / 4 * 4; }
inline int64_t int8_brgemm_n(int64_t N) { return (N + 15) / 16 * 16; }
inline int64_t int8_brgemm_packed_k(int64_t K) { return (K + 63) / 64 * 64; }

}  // namespace cpu
}  // namespace qsvd_torch
