// torch's int8 batch-reduce GEMM (at::native::cpublas::brgemm, int8 x int8
// -> int32) as the CPU kernels use it: when it serves, and the shapes it
// takes. quant_gemm (small M) and latent_attention (the absorbed path's
// digit scores) both rely on its sums being exact.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <vector>

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

// Whether brgemm serves this call with exact int32 sums. could_pack is
// asked on every call: torch answers false on CPUs without AMX and while
// oneDNN is switched off (torch.backends.mkldnn.flags(enabled=False)),
// which can change at any time. The arithmetic is probed once, on
// full-range codes (-128 and 127 on both sides) against an int64 product.
inline bool int8_brgemm_ready() {
#if defined(CPUBLAS_BRGEMM_I8I8I32)
  if (!at::native::cpublas::could_pack(at::kChar)) return false;
  static const bool exact = [] {
    const int64_t R = 20, N = 16, K = 256;
    std::vector<int8_t> rows(R * K, 127), plain(K * N, 127), packed(int8_brgemm_packed_k(K) * N, 0);
    for (int64_t k = 0; k < K; ++k) rows[1 * K + k] = -128, rows[3 * K + k] = k % 2 ? 127 : -128;
    for (int64_t k = 0; k < K; ++k) plain[k * N + 2] = -127, plain[k * N + 5] = -128;
    at::native::cpublas::pack(K, N, N, N, at::kChar, at::kChar, plain.data(), packed.data());
    std::vector<int32_t> got(R * N);
    at::native::cpublas::brgemm(R, N, K, K, N, N, false, reinterpret_cast<const signed char*>(rows.data()),
                                reinterpret_cast<const signed char*>(packed.data()), got.data());
    at::native::cpublas::brgemm_release();
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < N; ++j) {
        int64_t want = 0;
        for (int64_t k = 0; k < K; ++k) want += int64_t{rows[i * K + k]} * plain[k * N + j];
        if (want != got[i * N + j]) return false;
      }
    return true;
  }();
  return exact;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace qsvd_torch
