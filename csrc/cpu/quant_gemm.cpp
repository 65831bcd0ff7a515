// CPU quant_gemm: exact int32 sums of INT8/INT4 products, dequantized in
// fp32 as out = acc * a_scale[m] * b_scale[n] (+ bias[n]).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

// Unpacks [rows, K] codes (INT8, or INT4 packed [rows, K/2]) to int8.
at::Tensor unpack_to_int8(const at::Tensor& codes, int64_t bits, int64_t K) {
  if (bits == 8) return codes.contiguous();
  const at::Tensor packed = codes.contiguous();
  const int64_t rows = packed.size(0);
  at::Tensor out = at::empty({rows, K}, packed.options().dtype(at::kChar));
  const uint8_t* in = packed.data_ptr<uint8_t>();
  int8_t* op = out.data_ptr<int8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) qsvd::unpack_codes_host(in + r * (K / 2), K, 4, op + r * K);
  });
  return out;
}

// Written so that GCC vectorizes it (-O3: widening multiply-add).
inline int32_t dot_int8(const int8_t* __restrict a, const int8_t* __restrict b, int64_t K) {
  int32_t acc = 0;
  for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
  return acc;
}

}  // namespace

at::Tensor quant_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits, at::ScalarType out_dtype,
                          const std::optional<at::Tensor>& bias_in) {
  const GemmShape s = check_quant_gemm(a, a_scale, b, b_scale, a_bits, b_bits, out_dtype, bias_in);
  at::Tensor out = at::empty({s.M, s.N}, a.options().dtype(out_dtype));
  if (s.M == 0 || s.N == 0) return out;
  const at::Tensor A = unpack_to_int8(a, a_bits, s.K);
  const at::Tensor B = unpack_to_int8(b, b_bits, s.K);
  const at::Tensor sa = a_scale.contiguous(), sb = b_scale.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  // Tiles of 8 rows x 64 columns keep a tile of B hot in cache.
  constexpr int64_t kTileM = 8, kTileN = 64;
  const int64_t tiles_m = (s.M + kTileM - 1) / kTileM, tiles_n = (s.N + kTileN - 1) / kTileN;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "quant_gemm_cpu", [&] {
    const int8_t* ap = A.data_ptr<int8_t>();
    const int8_t* bp = B.data_ptr<int8_t>();
    const float* sap = sa.data_ptr<float>();
    const float* sbp = sb.data_ptr<float>();
    const scalar_t* biasp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(kTileM * kTileN * s.K, 1));
    at::parallel_for(0, tiles_m * tiles_n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t m0 = (tile / tiles_n) * kTileM, n0 = (tile % tiles_n) * kTileN;
        const int64_t m1 = std::min(m0 + kTileM, s.M), n1 = std::min(n0 + kTileN, s.N);
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            const int32_t acc = dot_int8(ap + m * s.K, bp + n * s.K, s.K);
            float v = qsvd::mul_rn(qsvd::mul_rn(static_cast<float>(acc), sap[m]), sbp[n]);
            if (biasp != nullptr) v = v + static_cast<float>(biasp[n]);
            op[m * s.N + n] = static_cast<scalar_t>(v);
          }
      }
    });
  });
  return out;
}

}  // namespace qsvd_torch
