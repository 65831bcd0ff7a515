// Host/device numeric helpers: the quantization rules of docs/ops.md.
//
// The CPU kernels, the CUDA kernels and the ctest unit tests all call these
// functions, so "the CPU tests check the same arithmetic" is true by
// construction. Every rounding step is spelled out (no FMA contraction, no
// reciprocal instead of division): integer outputs are then bit-exact
// between CPU and GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "qsvd/config.h"
#include "qsvd/formats.h"

// Fast math flushes denormals and fuses operations even inside __fmul_rn /
// __fdiv_rn; the bit-exact CPU/GPU contract would silently break.
#if defined(__USE_FAST_MATH__)
#error "qsvd-kernels must not be compiled with --use_fast_math (or -ftz=true)"
#endif

namespace qsvd {

// Multiply and divide rounded to nearest even, never fused. nvcc contracts
// a*b+c into an FMA by default; the host build uses -ffp-contract=off.
QSVD_INLINE float mul_rn(float a, float b) {
#if QSVD_ON_DEVICE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QSVD_INLINE float div_rn(float a, float b) {
#if QSVD_ON_DEVICE
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Round half to even. rintf and nearbyint both honour the current rounding
// mode, which is round-to-nearest-even unless a caller changed it.
QSVD_INLINE float round_half_even(float v) {
#if QSVD_ON_DEVICE
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

// max(|a|, |b|)-style reduction step that propagates NaN (fmaxf would drop
// it). A NaN anywhere in a row then gives a NaN scale, so the dequantized
// row is NaN: bad input stays loud instead of being quantized to zeros.
QSVD_INLINE float nan_propagating_max(float a, float b) {
  return (a != a || a > b) ? a : b;
}

// scale = clip_ratio * max|row| / qmax, in this order, in fp32.
QSVD_INLINE float quant_scale(float amax, float clip_ratio, int qmax) {
  return div_rn(mul_rn(clip_ratio, amax), static_cast<float>(qmax));
}

// code = clamp(round_half_even(v / scale), -qmax, qmax).
// A zero scale (all-zero row) gives code 0; so does a NaN or infinite scale
// or quotient (the scale itself then carries the NaN/Inf).
QSVD_INLINE int quantize_value(float v, float scale, int qmax) {
  if (!(scale > 0.f) || scale == INFINITY) return 0;
  float q = round_half_even(div_rn(v, scale));
  if (q != q) return 0;
  const float hi = static_cast<float>(qmax);
  q = q < -hi ? -hi : q;
  q = q > hi ? hi : q;
  return static_cast<int>(q);
}

// INT4: two's-complement nibbles, element 2i in the low nibble of byte i.
QSVD_INLINE uint8_t pack_int4(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
QSVD_INLINE int unpack_int4_lo(uint8_t byte) {
  return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(byte << 4))) >> 4;
}
QSVD_INLINE int unpack_int4_hi(uint8_t byte) {
  return static_cast<int>(static_cast<int8_t>(byte)) >> 4;
}

// Quantize one row of n fp32 values. Host-side helper shared by the CPU
// kernels (the CUDA kernels spread the same steps over threads).
// codes: n int8 (bits 8) or n/2 packed bytes (bits 4). Returns the scale.
inline float quantize_row_host(const float* v, int64_t n, int bits, float clip_ratio,
                               void* codes) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = nan_propagating_max(std::fabs(v[i]), amax);
  const int qmax = qmax_for_bits(bits);
  const float scale = quant_scale(amax, clip_ratio, qmax);
  if (bits == 8) {
    int8_t* out = static_cast<int8_t*>(codes);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(quantize_value(v[i], scale, qmax));
  } else {
    uint8_t* out = static_cast<uint8_t*>(codes);
    for (int64_t i = 0; i < n / 2; ++i)
      out[i] = pack_int4(quantize_value(v[2 * i], scale, qmax),
                         quantize_value(v[2 * i + 1], scale, qmax));
  }
  return scale;
}

// A row of n fp32 values as two or three int8 digits (the CPU
// latent_attention's split path writes q_lat so, and with three digits its
// V step's softmax weights, for exact int8 GEMMs against the codes):
// sigma = max|v| / 127, t = v / sigma, a = rint(clamp(t, +-127)),
// e = fl((t - a) 254), b = rint(clamp(e, +-127)), so |v - sigma (a + b /
// 254)| <= sigma (1/508 + u/2) + u |v|; with c (not null), c =
// rint(clamp(fl((e - b) 254), +-127)), so |v - sigma (a + b / 254 + c /
// 254^2)| <= sigma (1/129032 + u/2 + u/254) + u |v| (t = fl(v / sigma): u
// |v|; e's rounding: u |t - a| <= u/2, in t's units; c's product: u/254;
// t - a and e - b are exact; 1/129032 + u/2 + u/254 <= 1.028 u 127). For a
// normal sigma; a subnormal one loses relative precision,
// below the bounds' absolute floors. A NaN or infinity in the row gives
// sigma NaN and zero digits; a row whose sigma is 0 (all zeros, or max|v|
// < 63.5 2^-149) zero digits. Returns sigma. rint rounds to nearest, ties
// to even (the default rounding mode).
inline float digit_row_host(const float* v, int64_t n, int8_t* a, int8_t* b, int8_t* c = nullptr) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float x = std::fabs(v[i]);
    nan |= x != x;
    amax = x > amax ? x : amax;
  }
  const bool finite = !nan && amax != std::numeric_limits<float>::infinity();
  const float sigma = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0;
    b[i] = 0;
    if (c) c[i] = 0;
    if (!finite || !(sigma > 0.f)) continue;
    const float t = v[i] / sigma;
    const float ta = std::nearbyint(std::fmin(127.f, std::fmax(-127.f, t)));
    const float e = (t - ta) * 254.f;
    const float tb = std::nearbyint(std::fmin(127.f, std::fmax(-127.f, e)));
    a[i] = static_cast<int8_t>(ta);
    b[i] = static_cast<int8_t>(tb);
    if (c) c[i] = static_cast<int8_t>(std::nearbyint(std::fmin(127.f, std::fmax(-127.f, (e - tb) * 254.f))));
  }
  return sigma;
}

// Unpack a row of codes (INT8, or packed INT4 with n even) to int8 values.
inline void unpack_codes_host(const void* codes, int64_t n, int bits, int8_t* out) {
  if (bits == 8) {
    const int8_t* in = static_cast<const int8_t*>(codes);
    for (int64_t i = 0; i < n; ++i) out[i] = in[i];
  } else {
    const uint8_t* in = static_cast<const uint8_t*>(codes);
    for (int64_t i = 0; i < n / 2; ++i) {
      out[2 * i] = static_cast<int8_t>(unpack_int4_lo(in[i]));
      out[2 * i + 1] = static_cast<int8_t>(unpack_int4_hi(in[i]));
    }
  }
}

}  // namespace qsvd
