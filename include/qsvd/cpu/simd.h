// Vectorised element-wise helpers of the CPU kernels, torch-free.
//
// The library is built for the baseline x86-64 ISA (setup.py passes no
// -march), so the loops that carry the element-wise work are compiled
// three times, for the ISA levels of qsvd/cpu/isa.h (avx512, avx2,
// baseline), and a call runs the variant of the process-wide level
// (qsvd::cpu::active_isa(): the CPU's best unless QSVD_CPU_ISA or
// qsvd_kernels._C.set_cpu_isa says otherwise). How: each loop's body is an
// always_inline function compiled for the default target; three thin
// wrappers with target attributes call it (GCC inlines a default-target
// always_inline callee into a wider-target caller, so each wrapper is the
// body compiled for its ISA, as target_clones would make it), and a switch
// on the level picks the wrapper (QSVD_CPU_DISPATCH below). The Hadamard
// butterflies and the quantizer are written on GCC vectors of the level's
// register width (16, 8 or 4 floats) instead, one body per level
// (QSVD_CPU_DISPATCH_LEVEL): their shuffles, selects and reductions are
// what GCC lowers badly on other widths, or does not vectorise at all.
//
// Everything here is plain IEEE arithmetic with FMA contraction off
// (-ffp-contract=off, which setup.py and CMake pass: GCC's "avx512f"
// target implies FMA, and only that flag keeps a * b + c two roundings
// there; cpp_tests/test_simd.cpp and the Python tests check every level bit
// for bit), so every variant returns the same bits as the scalar
// definitions in qsvd/numerics.h and qsvd/hadamard.h.
//
// The AVX-512-only kernels (the weight-streaming products) run at the
// avx512 level only; below it their callers take the fallback
// (weight_streaming_available() is false). The deinterleaved INT4 unpack
// has an AVX-512 and an AVX2 table lookup and a scalar loop at baseline.
// F16C conversion runs from avx2 up.
//
// The GEMMs are not here: the CPU kernels take them from torch (oneDNN
// int8, MKL / oneDNN fp32).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "qsvd/cpu/isa.h"
#include "qsvd/formats.h"
#include "qsvd/hadamard.h"
#include "qsvd/numerics.h"

// name(params) runs name##_body(args) compiled for the active ISA level.
// name##_body is an always_inline function; ret may be void.
#define QSVD_CPU_DISPATCH(ret, name, params, args)                                                   \
  QSVD_TARGET_AVX512 __attribute__((noinline)) inline ret name##_avx512 params { return name##_body args; } \
  QSVD_TARGET_AVX2 __attribute__((noinline)) inline ret name##_avx2 params { return name##_body args; }     \
  __attribute__((noinline)) inline ret name##_baseline params { return name##_body args; }                  \
  QSVD_CPU_DISPATCH_SWITCH(ret, name, params, args)

// The entry point both macros end with: the variant of the active level.
#define QSVD_CPU_DISPATCH_SWITCH(ret, name, params, args) \
  inline ret name params {                                \
    switch (::qsvd::cpu::active_isa()) {                  \
      case ::qsvd::cpu::Isa::kAvx512: return name##_avx512 args; \
      case ::qsvd::cpu::Isa::kAvx2: return name##_avx2 args;     \
      default: return name##_baseline args;                      \
    }                                                            \
  }

// The same, for a body that takes the level as its template argument
// (name##_body<Isa::kAvx2>(...)): where one code does not suit every level.
#define QSVD_CPU_DISPATCH_LEVEL(ret, name, params, args)                                                       \
  QSVD_TARGET_AVX512 __attribute__((noinline)) inline ret name##_avx512 params {                           \
    return name##_body<::qsvd::cpu::Isa::kAvx512> args;                                                    \
  }                                                                                                        \
  QSVD_TARGET_AVX2 __attribute__((noinline)) inline ret name##_avx2 params {                               \
    return name##_body<::qsvd::cpu::Isa::kAvx2> args;                                                      \
  }                                                                                                        \
  __attribute__((noinline)) inline ret name##_baseline params {                                            \
    return name##_body<::qsvd::cpu::Isa::kBaseline> args;                                                  \
  }                                                                                                        \
  QSVD_CPU_DISPATCH_SWITCH(ret, name, params, args)

#define QSVD_CPU_BODY inline __attribute__((always_inline))

namespace qsvd {
namespace cpu {
namespace {

// VL floats (VL = 16, 8 or 4: one zmm, ymm or xmm register), unaligned
// access allowed. Each ISA level runs the Hadamard code on its own register
// width: GCC lowers a 16-lane __builtin_shuffle or lane select on ymm or xmm
// registers element by element (measured 20 to 30 times slower per row
// than the avx512 level), while at the native width each is one or two
// shuffles and a blend.
template <int VL>
struct VecOf;
template <>
struct VecOf<16> {
  typedef float f __attribute__((vector_size(64), aligned(4)));
  typedef int32_t i __attribute__((vector_size(64), aligned(4)));
};
template <>
struct VecOf<8> {
  typedef float f __attribute__((vector_size(32), aligned(4)));
  typedef int32_t i __attribute__((vector_size(32), aligned(4)));
};
template <>
struct VecOf<4> {
  typedef float f __attribute__((vector_size(16), aligned(4)));
  typedef int32_t i __attribute__((vector_size(16), aligned(4)));
};

// The register width of a level, in floats.
template <Isa L>
constexpr int kFloatLanes = L == Isa::kAvx512 ? 16 : L == Isa::kAvx2 ? 8 : 4;

template <int VL>
inline __attribute__((always_inline)) typename VecOf<VL>::f loadv(const float* p) {
  typename VecOf<VL>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline __attribute__((always_inline)) void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// One radix-2 stage with span H < VL inside a register of VL lanes:
//   lane i without bit H: v[i] + v[i + H];  lane i with bit H: v[i - H] - v[i]
// which is exactly row[j] = x + y, row[j + H] = x - y of the scalar spec.
template <int VL, int H, int... I>
inline __attribute__((always_inline)) typename VecOf<VL>::f stage_in_register(typename VecOf<VL>::f v,
                                                                             std::integer_sequence<int, I...>) {
  typedef typename VecOf<VL>::i vi;
  constexpr vi partner = {(I ^ H)...};
  constexpr vi has_bit = {((I & H) ? -1 : 0)...};
  const typename VecOf<VL>::f p = __builtin_shuffle(v, partner);
  const typename VecOf<VL>::f sum = v + p, diff = p - v;
  return has_bit ? diff : sum;
}

// Stages h = 1, 2, 4, 8 (in this order) on a block of 16 floats held as
// 16 / VL registers: those with h < VL inside each register, the others
// between registers.
template <int VL>
inline __attribute__((always_inline)) void stages_1_to_8(typename VecOf<VL>::f* y) {
  constexpr int R = 16 / VL;
  constexpr auto lanes = std::make_integer_sequence<int, VL>{};
  for (int r = 0; r < R; ++r) {
    y[r] = stage_in_register<VL, 1>(y[r], lanes);
    y[r] = stage_in_register<VL, 2>(y[r], lanes);
    if constexpr (VL > 4) y[r] = stage_in_register<VL, 4>(y[r], lanes);
    if constexpr (VL > 8) y[r] = stage_in_register<VL, 8>(y[r], lanes);
  }
  for (int h = 1; h < R; h *= 2)  // span h registers = h VL floats
    for (int r = 0; r < R; ++r)
      if ((r & h) == 0) {
        const typename VecOf<VL>::f a = y[r], b = y[r + h];
        y[r] = a + b;
        y[r + h] = a - b;
      }
}

// The whole spec of qsvd/hadamard.h on one row of K = m * 2^log_n values,
// bit-identical to step 1 + hadamard::transform_row_host (the same fp32
// operations on the same operands, several at a time):
//   in (fp32 K values; `signs` may be null) -> dst (fp32 K values; may be v).
// v is a K-float work row. Step 1 is fused into the first pass (stages
// h = 1, 2, 4, 8 on blocks of 16 in registers), step 4 (the norm) into the
// last one, and the other stages run two per pass, so a row of 4096 is read
// and written five times, in L1. VL is the level's register width in floats.
template <Isa L>
QSVD_CPU_BODY void hadamard_row_body(const float* in, const float* signs, float* v, float* dst,
                                     hadamard::Factorization f, float norm, float* scratch) {
  constexpr int VL = kFloatLanes<L>;
  typedef typename VecOf<VL>::f vf;
  constexpr int R = 16 / VL;
  const int64_t n = int64_t{1} << f.log_n;
  const int64_t K = f.m * n;
  if (n < 16) {
    if (signs != nullptr) {
      for (int64_t i = 0; i < K; ++i) v[i] = in[i] * signs[i];
    } else {
      for (int64_t i = 0; i < K; ++i) v[i] = in[i];
    }
    hadamard::transform_row_host(v, f, norm, scratch);
    if (dst != v) std::memcpy(dst, v, K * sizeof(float));
    return;
  }
  const vf normv = vf{} + norm;
  // Radix-4 passes for h = 16, 64, ... while 4h <= n, then one radix-2 pass
  // if a stage is left. `last_pass` is the one that writes dst with the norm
  // (only when m == 1; otherwise the base transform does).
  int radix4 = 0;
  int64_t h_end = 16;
  while (4 * h_end <= n) h_end *= 4, ++radix4;
  const bool radix2 = h_end < n;
  const int passes = radix4 + (radix2 ? 1 : 0);
  for (int a = 0; a < f.m; ++a) {
    const float* x = in + a * n;
    const float* sg = signs != nullptr ? signs + a * n : nullptr;
    float* row = v + a * n;
    float* out = dst + a * n;
    const bool block_last = f.m == 1 && passes == 0;
    for (int64_t i = 0; i < n; i += 16) {
      vf y[R];
      for (int r = 0; r < R; ++r) {
        y[r] = loadv<VL>(x + i + r * VL);
        if (sg != nullptr) y[r] = y[r] * loadv<VL>(sg + i + r * VL);
      }
      stages_1_to_8<VL>(y);
      for (int r = 0; r < R; ++r) {
        if (block_last)
          storev(out + i + r * VL, y[r] * normv);
        else
          storev(row + i + r * VL, y[r]);
      }
    }
    int pass = 0;
    int64_t h = 16;
    for (; 4 * h <= n; h *= 4) {
      const bool last = f.m == 1 && ++pass == passes;
      float* o = last ? out : row;
      for (int64_t i = 0; i < n; i += 4 * h)
        for (int64_t j = i; j < i + h; j += VL) {
          const vf x0 = loadv<VL>(row + j), x1 = loadv<VL>(row + j + h);
          const vf x2 = loadv<VL>(row + j + 2 * h), x3 = loadv<VL>(row + j + 3 * h);
          const vf y0 = x0 + x1, y1 = x0 - x1, y2 = x2 + x3, y3 = x2 - x3;  // stage h
          vf z0 = y0 + y2, z2 = y0 - y2, z1 = y1 + y3, z3 = y1 - y3;        // stage 2h
          if (last) z0 = z0 * normv, z1 = z1 * normv, z2 = z2 * normv, z3 = z3 * normv;
          storev(o + j, z0);
          storev(o + j + 2 * h, z2);
          storev(o + j + h, z1);
          storev(o + j + 3 * h, z3);
        }
    }
    if (radix2) {
      const bool last = f.m == 1;
      float* o = last ? out : row;
      for (int64_t j = 0; j < h; j += VL) {
        const vf x0 = loadv<VL>(row + j), x1 = loadv<VL>(row + j + h);
        vf z0 = x0 + x1, z1 = x0 - x1;
        if (last) z0 = z0 * normv, z1 = z1 * normv;
        storev(o + j, z0);
        storev(o + j + h, z1);
      }
    }
  }
  if (f.m > 1) {
    // The m-point base transform, summed left to right, VL columns at a
    // time, then the norm.
    const int8_t* Hm = hadamard::base_matrix_host(f.m);
    for (int64_t b = 0; b < n; b += VL) {
      vf col[36];
      for (int a = 0; a < f.m; ++a) col[a] = loadv<VL>(v + a * n + b);
      for (int a = 0; a < f.m; ++a) {
        vf acc = {};
        for (int ap = 0; ap < f.m; ++ap) acc = Hm[ap * f.m + a] > 0 ? acc + col[ap] : acc - col[ap];
        storev(dst + a * n + b, acc * normv);
      }
    }
  }
}
QSVD_CPU_DISPATCH_LEVEL(void, hadamard_row,
                        (const float* in, const float* signs, float* v, float* dst, hadamard::Factorization f,
                         float norm, float* scratch),
                        (in, signs, v, dst, f, norm, scratch))

// max |v|, and whether v holds a NaN, on VL-lane registers (see
// quantize_row below for why this form).
template <Isa L>
QSVD_CPU_BODY float abs_max_body(const float* v, int64_t n, bool* has_nan) {
  constexpr int VL = kFloatLanes<L>;
  constexpr int R = 16 / VL;
  typedef typename VecOf<VL>::f vf;
  typedef typename VecOf<VL>::i vi;
  vf part[R] = {};
  vi nans[R] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int r = 0; r < R; ++r) {
      const vf x = loadv<VL>(v + i + r * VL);
      const vf a = x < 0.f ? -x : x;
      nans[r] |= a != a;
      part[r] = a > part[r] ? a : part[r];
    }
  float amax = 0.f;
  bool nan = false;
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < VL; ++k) {
      nan |= nans[r][k] != 0;
      amax = part[r][k] > amax ? part[r][k] : amax;
    }
  for (; i < n; ++i) {
    const float a = v[i] < 0.f ? -v[i] : v[i];
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
  *has_nan = nan;
  return amax;
}

// Per-row quantization, as qsvd::quantize_row_host: the same scale and the
// same codes.
//
// max |v| runs on VL-lane registers, 16 / VL partial maxima per 16 values,
// combined at the end: GCC does not vectorise one running max (whose NaN
// and -0 rules it may not reorder without -ffast-math), and the result is
// the same in any order (NaNs are counted apart; a > m ? a : m never takes
// a -0 over the +0 every partial starts at).
//
// The codes: clamp(round(v / scale)) of the spec is computed as
// round(clamp(v / scale)) (the same integer: the bounds +-qmax are
// integers, and rounding is monotone), with round(q) = (q + 1.5 2^23) -
// 1.5 2^23: for |q| < 2^22 the sum lies in [2^23, 2^24), where fp32 holds
// exactly the integers, so the addition rounds q to an integer once, in the
// current rounding mode, as nearbyintf does (only the sign of a zero may
// differ, which its int code does not keep). Why not nearbyintf: baseline
// x86-64 has no rounding instruction (SSE4.1's roundps), so GCC calls libm
// per element there; and GCC vectorises this form at every level.
template <Isa L>
QSVD_CPU_BODY float quantize_row_body(const float* v, int64_t n, int bits, float clip_ratio, void* codes) {
  constexpr int VL = kFloatLanes<L>;
  typedef typename VecOf<VL>::f vf;
  typedef typename VecOf<VL>::i vi;
  bool nan = false;
  float amax = abs_max_body<L>(v, n, &nan);
  if (nan) amax = __builtin_nanf("");
  // A NaN in the row makes the scale NaN (its payload is not specified).
  const int qmax = qmax_for_bits(bits);
  const float scale = quant_scale(amax, clip_ratio, qmax);
  if (!(scale > 0.f) || scale == __builtin_inff()) {
    std::memset(codes, 0, code_row_bytes(bits, n));
    return scale;
  }
  const float hi = static_cast<float>(qmax);
  const auto code = [scale, hi](float x) {
    float q = x / scale;
    q = q != q ? 0.f : q;  // NaN quotient: code 0
    q = q < -hi ? -hi : q;
    q = q > hi ? hi : q;
    q = (q + 12582912.f) - 12582912.f;  // 1.5 2^23: rounds to an integer, |q| <= 127
    return static_cast<int>(q);
  };
  // The same on registers (GCC does not vectorise the loop of `code`: it
  // sees control flow in the selects).
  const vf sv = vf{} + scale, hv = vf{} + hi, mhv = vf{} - hi, magic = vf{} + 12582912.f;
  const auto codes_of = [&](const float* p) {
    vf q = loadv<VL>(p) / sv;
    q = q != q ? vf{} : q;
    q = q < mhv ? mhv : q;
    q = q > hv ? hv : q;
    q = (q + magic) - magic;
    return __builtin_convertvector(q, vi);
  };
  // Codes of 64 values at a time on registers into `c`, then narrowed to
  // bytes by a plain loop (GCC packs that with pack instructions; a
  // vector conversion to int8 it lowers lane by lane).
  constexpr int64_t kChunk = 64;
  int32_t c[kChunk];
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    for (int64_t k = 0; k < kChunk; k += VL) {
      const vi ck = codes_of(v + j + k);
      std::memcpy(c + k, &ck, sizeof(ck));
    }
    if (bits == 8) {
      int8_t* out = static_cast<int8_t*>(codes) + j;
      for (int64_t k = 0; k < kChunk; ++k) out[k] = static_cast<int8_t>(c[k]);
    } else {
      uint8_t* out = static_cast<uint8_t*>(codes) + j / 2;
      for (int64_t k = 0; k < kChunk / 2; ++k) out[k] = pack_int4(c[2 * k], c[2 * k + 1]);
    }
  }
  if (bits == 8) {
    int8_t* out = static_cast<int8_t*>(codes);
    for (; j < n; ++j) out[j] = static_cast<int8_t>(code(v[j]));
  } else {
    uint8_t* out = static_cast<uint8_t*>(codes);
    for (; j < n; j += 2) out[j / 2] = pack_int4(code(v[j]), code(v[j + 1]));
  }
  return scale;
}
QSVD_CPU_DISPATCH_LEVEL(float, quantize_row, (const float* v, int64_t n, int bits, float clip_ratio, void* codes),
                        (v, n, bits, clip_ratio, codes))

// Two int8 digits per value, or three (c not null), as
// qsvd::digit_row_host (the spec): the same sigma and digits. rint as in
// quantize_row (the 1.5 2^23 form; |t| <= 127 after the clamp, |(t - a)
// 254| <= 127 + a little before it).
template <Isa L>
QSVD_CPU_BODY float digit_row_body(const float* v, int64_t n, int8_t* a, int8_t* b, int8_t* c) {
  constexpr int VL = kFloatLanes<L>;
  typedef typename VecOf<VL>::f vf;
  typedef typename VecOf<VL>::i vi;
  bool nan = false;
  const float amax = abs_max_body<L>(v, n, &nan);
  const bool finite = !nan && amax != __builtin_inff();
  const float sigma = finite ? amax / 127.f : __builtin_nanf("");
  if (!finite || !(sigma > 0.f)) {  // sigma 0: every digit 0 (t would be 0 / 0)
    std::memset(a, 0, n);
    std::memset(b, 0, n);
    if (c) std::memset(c, 0, n);
    return sigma;
  }
  const auto rint_clamped = [](float x) {
    x = x < -127.f ? -127.f : x;
    x = x > 127.f ? 127.f : x;
    return (x + 12582912.f) - 12582912.f;
  };
  const auto digits = [sigma, &rint_clamped](float x, int* da, int* db, int* dc) {
    const float t = x / sigma;
    const float ta = rint_clamped(t);
    const float e = (t - ta) * 254.f;
    const float tb = rint_clamped(e);
    *da = static_cast<int>(ta);
    *db = static_cast<int>(tb);
    *dc = static_cast<int>(rint_clamped((e - tb) * 254.f));
  };
  const vf sv = vf{} + sigma, hv = vf{} + 127.f, mhv = vf{} - 127.f, magic = vf{} + 12582912.f,
           scale254 = vf{} + 254.f;
  // (No vector lambdas: a lambda does not inherit the body's target ISA.)
  constexpr int64_t kChunk = 64;
  int32_t ca[kChunk], cb[kChunk], cc[kChunk];
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    for (int64_t k = 0; k < kChunk; k += VL) {
      const vf t = loadv<VL>(v + j + k) / sv;
      vf ta = t < mhv ? mhv : t;
      ta = ta > hv ? hv : ta;
      ta = (ta + magic) - magic;
      const vf e = (t - ta) * scale254;
      vf tb = e < mhv ? mhv : e;
      tb = tb > hv ? hv : tb;
      tb = (tb + magic) - magic;
      const vi ia = __builtin_convertvector(ta, vi), ib = __builtin_convertvector(tb, vi);
      std::memcpy(ca + k, &ia, sizeof(ia));
      std::memcpy(cb + k, &ib, sizeof(ib));
      if (c) {
        vf tc = (e - tb) * scale254;
        tc = tc < mhv ? mhv : tc;
        tc = tc > hv ? hv : tc;
        tc = (tc + magic) - magic;
        const vi ic = __builtin_convertvector(tc, vi);
        std::memcpy(cc + k, &ic, sizeof(ic));
      }
    }
    for (int64_t k = 0; k < kChunk; ++k) a[j + k] = static_cast<int8_t>(ca[k]), b[j + k] = static_cast<int8_t>(cb[k]);
    if (c)
      for (int64_t k = 0; k < kChunk; ++k) c[j + k] = static_cast<int8_t>(cc[k]);
  }
  for (; j < n; ++j) {
    int da, db, dc;
    digits(v[j], &da, &db, &dc);
    a[j] = static_cast<int8_t>(da);
    b[j] = static_cast<int8_t>(db);
    if (c) c[j] = static_cast<int8_t>(dc);
  }
  return sigma;
}
QSVD_CPU_DISPATCH_LEVEL(float, digit_row, (const float* v, int64_t n, int8_t* a, int8_t* b, int8_t* c),
                        (v, n, a, b, c))

// INT4 (two's-complement nibbles, element 2i low) -> int8, n even.
QSVD_CPU_BODY void unpack_int4_row_body(const uint8_t* in, int64_t n, int8_t* out) {
  for (int64_t i = 0; i < n / 2; ++i) {
    const uint8_t b = in[i];
    out[2 * i] = static_cast<int8_t>(static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4);
    out[2 * i + 1] = static_cast<int8_t>(static_cast<int8_t>(b) >> 4);
  }
}
QSVD_CPU_DISPATCH(void, unpack_int4_row, (const uint8_t* in, int64_t n, int8_t* out), (in, n, out))

// INT4 -> int8 in "chunk-deinterleaved" order, for a GEMM whose two
// operands agree on any order of K (an int32 dot product is exact in any
// order): each 64-byte chunk (128 codes) becomes its 64 even codes, then
// its 64 odd codes; a tail of fewer than 128 codes stays in natural order.
// int4_deinterleaved_source(j, n) is the natural index of output j. n is
// even (INT4 codes come two to a byte).
constexpr int64_t kInt4ChunkCodes = 128;
inline int64_t int4_deinterleaved_source(int64_t j, int64_t n) {
  if (j >= n / kInt4ChunkCodes * kInt4ChunkCodes) return j;
  const int64_t c = j / kInt4ChunkCodes, i = j % kInt4ChunkCodes;
  return c * kInt4ChunkCodes + (i < 64 ? 2 * i : 2 * (i - 64) + 1);
}

inline void unpack_int4_deinterleaved_scalar(const uint8_t* in, int64_t n, int8_t* out) {
  const int64_t full = n / kInt4ChunkCodes * kInt4ChunkCodes;
  for (int64_t c = 0; c < full; c += kInt4ChunkCodes) {
    const uint8_t* b = in + c / 2;
    for (int64_t i = 0; i < 64; ++i) {
      out[c + i] = static_cast<int8_t>(static_cast<int8_t>(static_cast<uint8_t>(b[i] << 4)) >> 4);
      out[c + 64 + i] = static_cast<int8_t>(static_cast<int8_t>(b[i]) >> 4);
    }
  }
  unpack_int4_row(in + full / 2, n - full, out + full);  // the tail, in natural order
}

#if QSVD_ISA_X86
// A nibble -> its signed value by one table lookup per 64 codes.
QSVD_TARGET_AVX512_KERNELS inline void unpack_int4_deinterleaved_avx512(const uint8_t* in, int64_t n, int8_t* out) {
  // The 16-entry table in each 128-bit lane (a load, not _mm512_broadcast_i32x4,
  // whose GCC 12 header trips -Wuninitialized).
  alignas(64) static constexpr int8_t kLut[64] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
                                                  0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
                                                  0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
                                                  0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
  const __m512i lut = _mm512_load_si512(kLut);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t full = n / kInt4ChunkCodes * kInt4ChunkCodes;
  for (int64_t c = 0; c < full; c += kInt4ChunkCodes) {
    const __m512i v = _mm512_loadu_si512(in + c / 2);
    const __m512i even = _mm512_and_si512(v, low4), odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    _mm512_storeu_si512(out + c, _mm512_shuffle_epi8(lut, even));
    _mm512_storeu_si512(out + c + 64, _mm512_shuffle_epi8(lut, odd));
  }
  unpack_int4_row(in + full / 2, n - full, out + full);
}
#endif

#if QSVD_ISA_X86
// The same lookup on 32 codes at a time (AVX2's vpshufb).
QSVD_TARGET_AVX2 inline void unpack_int4_deinterleaved_avx2(const uint8_t* in, int64_t n, int8_t* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6,
                                       7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t full = n / kInt4ChunkCodes * kInt4ChunkCodes;
  for (int64_t c = 0; c < full; c += kInt4ChunkCodes)
    for (int64_t h = 0; h < 64; h += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + c / 2 + h));
      const __m256i even = _mm256_and_si256(v, low4), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c + h), _mm256_shuffle_epi8(lut, even));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c + 64 + h), _mm256_shuffle_epi8(lut, odd));
    }
  unpack_int4_row(in + full / 2, n - full, out + full);
}
#endif

// The table lookup at the avx512 and avx2 levels, the scalar loop at
// baseline (the same bytes).
inline void unpack_int4_deinterleaved(const uint8_t* in, int64_t n, int8_t* out) {
#if QSVD_ISA_X86
  if (active_isa() == Isa::kAvx512) return unpack_int4_deinterleaved_avx512(in, n, out);
  if (active_isa() == Isa::kAvx2) return unpack_int4_deinterleaved_avx2(in, n, out);
#endif
  unpack_int4_deinterleaved_scalar(in, n, out);
}

// int8 codes in natural order -> the chunk-deinterleaved order of K
// (out[j] = in[int4_deinterleaved_source(j, n)]), for an INT8 operand that
// meets an INT4 one unpacked by unpack_int4_deinterleaved.
inline void deinterleave_int8_row(const int8_t* in, int64_t n, int8_t* out) {
  const int64_t full = n / kInt4ChunkCodes * kInt4ChunkCodes;
  for (int64_t c = 0; c < full; c += kInt4ChunkCodes)
    for (int64_t i = 0; i < 64; ++i) {
      out[c + i] = in[c + 2 * i];
      out[c + 64 + i] = in[c + 2 * i + 1];
    }
  std::memcpy(out + full, in + full, n - full);
}

// Stored codes of a row (INT8, or packed INT4) -> int8 values.
inline void unpack_codes_row(const void* codes, int64_t n, int bits, int8_t* out) {
  if (bits == 8)
    std::memcpy(out, codes, n);
  else
    unpack_int4_row(static_cast<const uint8_t*>(codes), n, out);
}

// The quant_gemm epilogue's first two steps, each product rounded once
// (as qsvd::mul_rn): row[n] = (float(acc[n]) * s) * sb[n].
QSVD_CPU_BODY void dequant_row_body(const int32_t* acc, int64_t n, float s, const float* sb, float* row) {
  for (int64_t i = 0; i < n; ++i) row[i] = (static_cast<float>(acc[i]) * s) * sb[i];
}
QSVD_CPU_DISPATCH(void, dequant_row, (const int32_t* acc, int64_t n, float s, const float* sb, float* row),
                  (acc, n, s, sb, row))

// out[i] = float(in[i]) for int8 codes.
QSVD_CPU_BODY void int8_to_float_body(const int8_t* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}
QSVD_CPU_DISPATCH(void, int8_to_float, (const int8_t* in, int64_t n, float* out), (in, n, out))

// int8 codes -> bf16 bits (exact: |code| <= 128 needs 8 significant bits).
QSVD_CPU_BODY void int8_to_bf16_body(const int8_t* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(in[i]);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    out[i] = static_cast<uint16_t>(u >> 16);
  }
}
QSVD_CPU_DISPATCH(void, int8_to_bf16, (const int8_t* in, int64_t n, uint16_t* out), (in, n, out))

// fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16).
inline __attribute__((always_inline)) uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return x != x ? static_cast<uint16_t>(0x7FC0) : rounded;
}

QSVD_CPU_BODY void float_to_bf16_row_body(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits(in[i]);
}
QSVD_CPU_DISPATCH(void, float_to_bf16_row, (const float* in, int64_t n, uint16_t* out), (in, n, out))

// x = hi + lo + e with hi = bf16(x), lo = bf16(x - hi) (x - hi is exact),
// |e| <= 2^-18 |x| (two 8-bit significands; NaN and inf stay in hi, lo 0).
QSVD_CPU_BODY void split_bf16_row_body(const float* x, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = bf16_bits(x[i]);
    const uint32_t hu = static_cast<uint32_t>(h) << 16;
    float hf;
    std::memcpy(&hf, &hu, 4);
    const float r = x[i] - hf;
    hi[i] = h;
    lo[i] = r != r ? static_cast<uint16_t>(0) : bf16_bits(r);
  }
}
QSVD_CPU_DISPATCH(void, split_bf16_row, (const float* x, int64_t n, uint16_t* hi, uint16_t* lo),
                  (x, n, hi, lo))

// ---------------------------------------------------------------------------
// Matrix-vector products that read a weight matrix in its stored type
// (fp16, bf16 or int8: the latent ops' weight dtypes), on AVX-512 hosts.
//
// Why not torch: at B = 1 decode the latent ops multiply a few query rows
// by each head's weights ([r, d], 2 bytes a weight). torch's GEMMs need
// both operands in one dtype, so the weights would be converted to fp32
// first: 2 bytes read, 4 written and 4 read again per weight, most of the
// absorbed decode's time. These read each weight once and convert it in
// registers (vcvtph2ps, a shift, vpmovsxbd). Where they are not available
// (an ISA level below avx512: no AVX-512 here, or QSVD_CPU_ISA /
// set_cpu_isa chose a lower level; or more rows than kWeightStreamRows in
// the caller) the caller converts once and uses torch's GEMM.
//
// Numerics: every weight converts exactly to fp32; an output sums n = d
// (dot_rows) or n = r (axpy_rows) products with fused multiply-adds and a
// fixed reduction tree, at most n roundings on any term's path, so
// |error| <= n u sum|terms|: the bound the error analysis assumes for a
// GEMM of any order.

// Weights come as fp16, bf16 or int8 (qsvd::DType's kF16, kBF16, kI8).

#if QSVD_ISA_X86
#define QSVD_AVX512 QSVD_TARGET_AVX512_KERNELS

// 16 weights from element i (the first `n` of them; the rest read as 0).
template <DType W>
QSVD_AVX512 inline __m512 weights16_avx512(const void* w, int64_t i, __mmask16 m) {
  if constexpr (W == DType::kF16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i));
  } else if constexpr (W == DType::kBF16) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(w) + i)));
  }
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// y[g ldy + i] = sum_j w[i d + j] x[g d + j] for i < rows, g < G: four
// rows by P <= 2 query rows at a time (4 P independent FMA chains, each
// weight converted once per pass), each closed by the fixed tree of
// _mm512_reduce_add_ps. Further pairs of query rows re-read the head's
// weights from L2.
template <DType W, int P>
QSVD_AVX512 inline void dot_pass_avx512(const void* w, int64_t rows, int64_t d, const float* x, float* y,
                                        int64_t ldy) {
  int64_t i = 0;
  for (; i < rows; i += 4) {
    const int nr = rows - i < 4 ? static_cast<int>(rows - i) : 4;
    __m512 acc[P][4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[p][k] = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = tail_mask(d - j);
      __m512 xv[P];
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) xv[p] = _mm512_maskz_loadu_ps(m, x + p * d + j);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        // Rows past the end re-read the last row (discarded below).
        const __m512 wv = weights16_avx512<W>(w, (i + (k < nr ? k : nr - 1)) * d + j, m);
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) acc[p][k] = _mm512_fmadd_ps(wv, xv[p], acc[p][k]);
      }
    }
    for (int p = 0; p < P; ++p)
      for (int k = 0; k < nr; ++k) y[p * ldy + i + k] = _mm512_reduce_add_ps(acc[p][k]);
  }
}

template <DType W>
QSVD_AVX512 void dot_rows_avx512(const void* w, int64_t rows, int64_t d, const float* x, int64_t G, float* y,
                                 int64_t ldy) {
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) dot_pass_avx512<W, 2>(w, rows, d, x + g * d, y + g * ldy, ldy);
  if (g < G) dot_pass_avx512<W, 1>(w, rows, d, x + g * d, y + g * ldy, ldy);
}

// y[p d + j] = sum_i a[p lda + i] w[i d + j0 + j] for the NC 16-column
// chunks from j0 (the last one masked to `last` columns) and P <= 2 rows
// of a, in registers over all rows of w.
template <DType W, int NC, int P>
QSVD_AVX512 inline void axpy_block_avx512(const void* w, int64_t rows, int64_t d, int64_t j0, __mmask16 last,
                                          const float* a, int64_t lda, float* y) {
  __m512 acc[P][NC];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[p][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    __m512 av[P];
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) av[p] = _mm512_set1_ps(a[p * lda + i]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512 wv = weights16_avx512<W>(w, i * d + j0 + 16 * c, c == NC - 1 ? last : 0xFFFF);
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[p][c] = _mm512_fmadd_ps(av[p], wv, acc[p][c]);
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c)
      _mm512_mask_storeu_ps(y + p * d + j0 + 16 * c, c == NC - 1 ? last : 0xFFFF, acc[p][c]);
}

template <DType W, int P>
QSVD_AVX512 inline void axpy_pass_avx512(const void* w, int64_t rows, int64_t d, const float* a, int64_t lda,
                                         float* y) {
  for (int64_t j0 = 0; j0 < d; j0 += 128) {
    const int64_t left = d - j0 < 128 ? d - j0 : 128;
    const int nc = static_cast<int>((left + 15) / 16);
    const __mmask16 last = tail_mask(left - 16 * (nc - 1));
    switch (nc) {
      case 8: axpy_block_avx512<W, 8, P>(w, rows, d, j0, last, a, lda, y); break;
      case 7: axpy_block_avx512<W, 7, P>(w, rows, d, j0, last, a, lda, y); break;
      case 6: axpy_block_avx512<W, 6, P>(w, rows, d, j0, last, a, lda, y); break;
      case 5: axpy_block_avx512<W, 5, P>(w, rows, d, j0, last, a, lda, y); break;
      case 4: axpy_block_avx512<W, 4, P>(w, rows, d, j0, last, a, lda, y); break;
      case 3: axpy_block_avx512<W, 3, P>(w, rows, d, j0, last, a, lda, y); break;
      case 2: axpy_block_avx512<W, 2, P>(w, rows, d, j0, last, a, lda, y); break;
      default: axpy_block_avx512<W, 1, P>(w, rows, d, j0, last, a, lda, y); break;
    }
  }
}

// y[g d + j] = sum_i a[g lda + i] w[i d + j] for j < d, g < G (y is
// overwritten): 128 columns by two rows of a at a time, in registers.
template <DType W>
QSVD_AVX512 void axpy_rows_avx512(const void* w, int64_t rows, int64_t d, const float* a, int64_t lda, int64_t G,
                                  float* y) {
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) axpy_pass_avx512<W, 2>(w, rows, d, a + g * lda, lda, y + g * d);
  if (g < G) axpy_pass_avx512<W, 1>(w, rows, d, a + g * lda, lda, y + g * d);
}

// Whether the kernels above run now: at the avx512 level (which the CPU
// has, or it could not be active).
inline bool weight_streaming_available() { return active_isa() == Isa::kAvx512; }

// The dispatch on the weights' stored type (callers check
// weight_streaming_available() first).
inline void weight_dot_rows(DType t, const void* w, int64_t rows, int64_t d, const float* x, int64_t G,
                            float* y, int64_t ldy) {
  switch (t) {
    case DType::kF16: return dot_rows_avx512<DType::kF16>(w, rows, d, x, G, y, ldy);
    case DType::kBF16: return dot_rows_avx512<DType::kBF16>(w, rows, d, x, G, y, ldy);
    case DType::kI8: return dot_rows_avx512<DType::kI8>(w, rows, d, x, G, y, ldy);
    default: __builtin_trap();  // not a weight type: callers pass only these
  }
}
inline void weight_axpy_rows(DType t, const void* w, int64_t rows, int64_t d, const float* a, int64_t lda,
                             int64_t G, float* y) {
  switch (t) {
    case DType::kF16: return axpy_rows_avx512<DType::kF16>(w, rows, d, a, lda, G, y);
    case DType::kBF16: return axpy_rows_avx512<DType::kBF16>(w, rows, d, a, lda, G, y);
    case DType::kI8: return axpy_rows_avx512<DType::kI8>(w, rows, d, a, lda, G, y);
    default: __builtin_trap();  // not a weight type
  }
}
#undef QSVD_AVX512
#else
inline bool weight_streaming_available() { return false; }
inline void weight_dot_rows(DType, const void*, int64_t, int64_t, const float*, int64_t, float*, int64_t) {}
inline void weight_axpy_rows(DType, const void*, int64_t, int64_t, const float*, int64_t, int64_t, float*) {}
#endif

#if QSVD_ISA_X86
// fp32 -> fp16 bits with F16C (round to nearest even, as c10::Half; a NaN
// keeps a quiet NaN, its payload may differ). Returns false below the avx2
// level (which F16C is part of): the caller converts with c10 then.
QSVD_TARGET_F16C inline void float_to_half_f16c(const float* in, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = _cvtss_sh(in[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline bool float_to_half_row(const float* in, int64_t n, uint16_t* out) {
  if (active_isa() == Isa::kBaseline) return false;
  float_to_half_f16c(in, n, out);
  return true;
}
// fp16 bits -> fp32 with F16C (exact). Returns false below the avx2 level.
QSVD_TARGET_F16C inline void half_to_float_f16c(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(in[i]);
}
inline bool half_to_float_row(const uint16_t* in, int64_t n, float* out) {
  if (active_isa() == Isa::kBaseline) return false;
  half_to_float_f16c(in, n, out);
  return true;
}
#else
inline bool float_to_half_row(const float*, int64_t, uint16_t*) { return false; }
inline bool half_to_float_row(const uint16_t*, int64_t, float*) { return false; }
#endif

}  // namespace
}  // namespace cpu
}  // namespace qsvd
