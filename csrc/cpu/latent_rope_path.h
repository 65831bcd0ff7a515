// latent_attention's RoPE path (CPU): K rebuilt per tile. Scores: K~ =
// codes x W_uk for every kv head at once, one GEMM [T, r] x [r, H_kv d]
// (int8 x int8 -> exact int32 on at::_int_mm for int8 weights where it is
// exact, fp32 at::mm otherwise: codes and weights are exact in fp32); then
// k = RoPE((K~ * w_uk_scale) * s_t) and x = q' . k (at::bmm over kv
// heads). V absorbed on fp32 GEMMs (Fp32Values).
#pragma once

#include "latent_common.h"

namespace qsvd_torch {
namespace latent_cpu {

struct RopeWorker : Fp32Values {
  const Call& c;
  const Rebuild& rb;
  at::Tensor k_buf;  // fp32 [tile, H_kv d]
  std::vector<float> tmp;
  at::Tensor q_b;

  RopeWorker(const Call& call, const Rebuild& rebuild)
      : Fp32Values(call), c(call), rb(rebuild), k_buf(at::empty({call.tile, call.E}, call.q.options())),
        tmp(call.s.d) {}

  void begin_task(int64_t b) { q_b = c.q.narrow(0, b, 1).view({c.s.H_kv, c.G, c.s.d}); }

  at::Tensor scores(const at::Tensor& codes, const float* scales, int64_t t0, int64_t T) {
    const int64_t H_kv = c.s.H_kv, d = c.s.d, E = c.E;
    const at::Tensor cf = tile_codes(codes, T);
    at::Tensor kt = k_buf.narrow(0, 0, T);
    rebuild_tile(rb, codes, cf, kt);
    float* kp = kt.data_ptr<float>();
    const float* cosp = c.p.cos.data_ptr<float>();
    const float* sinp = c.p.sin.data_ptr<float>();
    for (int64_t i = 0; i < T; ++i)
      scale_and_rope(kp + i * E, H_kv, d, scales[i], cosp + (t0 + i) * d, sinp + (t0 + i) * d, tmp.data());
    // [H_kv, G, d] x [H_kv, d, T]
    return at::bmm(q_b, kt.view({T, H_kv, d}).permute({1, 2, 0})).view({c.H, T}).contiguous();
  }
};

}  // namespace latent_cpu
}  // namespace qsvd_torch
