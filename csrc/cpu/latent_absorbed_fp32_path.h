// latent_attention's absorbed path on fp32 GEMMs (CPU; no RoPE): x =
// (c_t . q_lat) * s_t with q_lat = W_uk q' made once per call (all heads
// sharing the latent), one at::mm per tile; V absorbed on fp32 GEMMs
// (Fp32Values). The path where torch lacks the split GEMMs, or
// QSVD_CPU_LATENT_GEMM=fp32 asks for it.
#pragma once

#include "latent_common.h"

namespace qsvd_torch {
namespace latent_cpu {

struct AbsorbedFp32Worker : Fp32Values {
  const Call& c;
  at::Tensor q_b;

  explicit AbsorbedFp32Worker(const Call& call) : Fp32Values(call), c(call) {}

  void begin_task(int64_t b) { q_b = c.q_lat.narrow(0, b, 1).view({c.H, c.s.r}); }

  at::Tensor scores(const at::Tensor& codes, const float* scales, int64_t, int64_t T) {
    const at::Tensor cf = tile_codes(codes, T);
    at::Tensor x = at::mm(q_b, cf.t()).contiguous();  // [H, T]
    float* xp = x.data_ptr<float>();
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < T; ++i) xp[h * T + i] = xp[h * T + i] * scales[i];
    return x;
  }
};

}  // namespace latent_cpu
}  // namespace qsvd_torch
