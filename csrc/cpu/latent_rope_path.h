// latent_attention's RoPE path (CPU): the rotary part of K rebuilt per
// tile. Scores: K~ = codes x W_uk[:, :, :d_rope] for every kv head at
// once, one GEMM [T, r] x [r, H_kv d_rope] (int8 x int8 -> exact int32 on
// at::_int_mm for int8 weights where it is exact, fp32 at::mm otherwise:
// codes and weights are exact in fp32); then k = RoPE((K~ * w_uk_scale) *
// s_t) and x = q'_rope . k (at::bmm over kv heads). Partial RoPE (d_rope <
// d): the position-free dims are absorbed as in the absorbed fp32 path,
// x += (c_t . q_lat) * s_t with q_lat = W_uk[:, :, d_rope:] q'[d_rope:]
// made once per call. With rope_keys (latent_rope_keys_append's cache),
// the rotary part is read, not rebuilt. V absorbed on fp32 GEMMs
// (Fp32Values).
#pragma once

#include "latent_common.h"

namespace qsvd_torch {
namespace latent_cpu {

struct RopeWorker : Fp32Values {
  const Call& c;
  const Rebuild& rb;
  const int64_t d_rope;
  at::Tensor k_buf;  // fp32 [tile, H_kv d_rope]
  std::vector<float> tmp;
  at::Tensor q_b, q_lat_b;
  int64_t b_ = 0;

  RopeWorker(const Call& call, const Rebuild& rebuild)
      : Fp32Values(call), c(call), rb(rebuild), d_rope(call.s.d_rope),
        k_buf(at::empty({call.tile, call.s.H_kv * call.s.d_rope}, call.q.options())), tmp(call.s.d_rope) {}

  void begin_task(int64_t b) {
    q_b = c.q.narrow(0, b, 1).view({c.s.H_kv, c.G, d_rope});
    if (c.q_lat.defined()) q_lat_b = c.q_lat.narrow(0, b, 1).view({c.H, c.s.r});
    b_ = b;
  }

  at::Tensor scores(const at::Tensor& codes, const float* scales, int64_t t0, int64_t T) {
    const int64_t H_kv = c.s.H_kv, E = H_kv * d_rope;
    const at::Tensor cf = tile_codes(codes, T);
    at::Tensor kt = k_buf.narrow(0, 0, T);
    float* kp = kt.data_ptr<float>();
    if (c.rope_keys.defined()) {  // K's rotary part read from its cache (token scale and RoPE included)
      gather_rope_keys(c.rope_keys, rows_of(c.p, c.s, b_, c.bits), t0, T, E, kp);
    } else {
      rebuild_tile(rb, codes, cf, kt);
      const float* cosp = c.p.cos.data_ptr<float>();
      const float* sinp = c.p.sin.data_ptr<float>();
      for (int64_t i = 0; i < T; ++i)
        scale_and_rope(kp + i * E, H_kv, d_rope, d_rope, scales[i], cosp + (t0 + i) * d_rope,
                       sinp + (t0 + i) * d_rope, tmp.data());
    }
    // [H_kv, G, d_rope] x [H_kv, d_rope, T]
    at::Tensor x = at::bmm(q_b, kt.view({T, H_kv, d_rope}).permute({1, 2, 0})).view({c.H, T}).contiguous();
    if (q_lat_b.defined()) {  // partial RoPE: + the absorbed position-free part
      const at::Tensor xn = at::mm(q_lat_b, cf.t()).contiguous();  // [H, T]
      const float* np = xn.data_ptr<float>();
      float* xp = x.data_ptr<float>();
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t i = 0; i < T; ++i) xp[h * T + i] = xp[h * T + i] + np[h * T + i] * scales[i];
    }
    return x;
  }
};

}  // namespace latent_cpu
}  // namespace qsvd_torch
