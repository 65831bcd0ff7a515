// ctest unit tests of qsvd/cpu/simd.h and qsvd/cpu/isa.h: every element-wise
// loop, at every ISA level this CPU supports, against the scalar spec
// (qsvd/numerics.h, qsvd/hadamard.h) bit for bit; the level's API; and,
// with --env-level NAME / --env-error TEXT (ctest sets QSVD_CPU_ISA for
// those runs), how QSVD_CPU_ISA is read.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qsvd/cpu/isa.h"
#include "qsvd/cpu/simd.h"
#include "check.h"
#include "qsvd/hadamard.h"
#include "qsvd/numerics.h"

namespace {

using qsvd_test::g_failures;

namespace qc = qsvd::cpu;

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

bool same_float(float a, float b) { return (a != a && b != b) || bits_of(a) == bits_of(b); }

std::vector<float> random_row(int64_t n, std::mt19937& rng, float mag = 1.f) {
  std::normal_distribution<float> d(0.f, mag);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// fp32 -> fp16 bits, round to nearest even (finite and infinite values).
uint16_t half_bits_ref(float x) {
  const uint32_t u = bits_of(x), sign = (u >> 16) & 0x8000u;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 65520.0) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to infinity
  // The value in units of the smallest subnormal 2^-24, rounded half to even
  // (exact in double: a has 24 significant bits).
  if (a < 6.103515625e-05) {  // below 2^-14: subnormal (or zero)
    const double q = std::nearbyint(a * 16777216.0);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(q));
  }
  int e;
  const double m = std::frexp(a, &e);                  // a = m 2^e, m in [0.5, 1)
  const double q = std::nearbyint(std::ldexp(m, 11));  // 11 significant bits
  uint32_t mant = static_cast<uint32_t>(q), exp = static_cast<uint32_t>(e - 1 + 15);
  if (mant == 2048) mant = 1024, ++exp;
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  return static_cast<uint16_t>(sign | (exp << 10) | (mant - 1024));
}

uint16_t bf16_bits_ref(float x) {
  if (x != x) return 0x7FC0;
  const uint32_t u = bits_of(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void test_hadamard_row(const char* level) {
  std::mt19937 rng(1);
  int sizes = 0;
  for (int64_t K = 1; K <= qsvd::hadamard::kMaxDim; ++K) {
    const qsvd::hadamard::Factorization f = qsvd::hadamard::factorize(K);
    if (f.m == 0) continue;
    ++sizes;
    const float norm = qsvd::hadamard::norm_factor(K);
    const std::vector<float> x = random_row(K, rng, 3.f);
    std::vector<float> signs(K);
    for (auto& s : signs) s = rng() % 2 ? 1.f : -1.f;
    for (const float* sg : {static_cast<const float*>(nullptr), static_cast<const float*>(signs.data())}) {
      std::vector<float> want(K), scratch(f.m), v(K), got(K);
      for (int64_t i = 0; i < K; ++i) want[i] = sg ? x[i] * sg[i] : x[i];
      qsvd::hadamard::transform_row_host(want.data(), f, norm, scratch.data());
      qc::hadamard_row(x.data(), sg, v.data(), got.data(), f, norm, scratch.data());
      CHECK(std::memcmp(got.data(), want.data(), K * sizeof(float)) == 0, "%s: hadamard_row K=%lld signs=%d", level,
            static_cast<long long>(K), sg != nullptr);
      qc::hadamard_row(x.data(), sg, v.data(), v.data(), f, norm, scratch.data());  // in place (dst == v)
      CHECK(std::memcmp(v.data(), want.data(), K * sizeof(float)) == 0, "%s: hadamard_row in place K=%lld", level,
            static_cast<long long>(K));
    }
  }
  CHECK(sizes == 60, "%d sizes", sizes);
}

void test_quantize_row(const char* level) {
  std::mt19937 rng(2);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t n : {2, 6, 16, 30, 96, 130, 1000, 4096}) {
    for (int kind = 0; kind < 6; ++kind) {
      std::vector<float> v = random_row(n, rng, kind == 1 ? 1e4f : 1.f);
      if (kind == 2) std::fill(v.begin(), v.end(), 0.f);
      if (kind == 3) v[n / 2] = nan;
      if (kind == 4) v[0] = -inf;
      if (kind == 5) v[n - 1] = 3e38f, v[0] = -3e38f;
      for (int bits : {8, 4}) {
        for (float clip : {1.f, 0.9f}) {
          const int64_t bytes = qsvd::code_row_bytes(bits, n);
          std::vector<uint8_t> want(bytes, 0x5A), got(bytes, 0xA5);
          const float ws = qsvd::quantize_row_host(v.data(), n, bits, clip, want.data());
          const float gs = qc::quantize_row(v.data(), n, bits, clip, got.data());
          CHECK(same_float(gs, ws), "%s: quantize_row scale n=%lld kind=%d bits=%d: %g vs %g", level,
                static_cast<long long>(n), kind, bits, gs, ws);
          CHECK(got == want, "%s: quantize_row codes n=%lld kind=%d bits=%d", level, static_cast<long long>(n), kind,
                bits);
        }
      }
    }
  }
}

// Two or three int8 digits per value (latent_attention's split path): the
// spec's sigma and digits at every level, and the spec's documented error, for random rows, rows with a NaN or an
// infinity, zero rows, and values whose digits are exact ties.
void test_digit_row(const char* level) {
  std::mt19937 rng(5);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t n : {1, 7, 64, 96, 130, 1536}) {
    for (int kind = 0; kind < 8; ++kind) {
      std::vector<float> v = random_row(n, rng, kind == 1 ? 1e-30f : 3.f);
      if (kind == 2) std::fill(v.begin(), v.end(), 0.f);
      if (kind == 3) v[n / 2] = nan;
      if (kind == 4) v[0] = -inf;
      if (kind == 5)  // sigma = 127 / 127 = 1: the halves k/2 are ties of the a digit's rounding
        for (int64_t i = 0; i < n; ++i) v[i] = i == 0 ? 127.f : static_cast<float>(i % 255 - 127) / 2.f;
      if (kind == 6) {  // max|v| below 63.5 2^-149: sigma rounds to 0, every digit 0
        std::fill(v.begin(), v.end(), 0.f);
        v[0] = std::numeric_limits<float>::denorm_min();
      }
      if (kind == 7)  // a subnormal sigma (2^-149): quotients past 127 are clamped alike
        for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 191) * std::numeric_limits<float>::denorm_min();
      for (const bool three : {false, true}) {
        std::vector<int8_t> wa(n, 7), wb(n, 7), wc(n, 7), ga(n, -7), gb(n, -7), gc(n, -7);
        const float ws = qsvd::digit_row_host(v.data(), n, wa.data(), wb.data(), three ? wc.data() : nullptr);
        const float gs = qc::digit_row(v.data(), n, ga.data(), gb.data(), three ? gc.data() : nullptr);
        CHECK(same_float(gs, ws), "%s: digit_row sigma n=%lld kind=%d three=%d: %g vs %g", level,
              static_cast<long long>(n), kind, three, gs, ws);
        CHECK(ga == wa && gb == wb && (!three || gc == wc), "%s: digit_row digits n=%lld kind=%d three=%d", level,
              static_cast<long long>(n), kind, three);
        CHECK(three || wc == std::vector<int8_t>(n, 7), "%s: digit_row wrote c without three", level);
        if (kind != 0 && kind != 5) continue;
        // The documented error (numerics.h), in double: sigma (1/508 + u/2) + u |v| (two digits); sigma
        // (1/129032 + u/2 + u/254) + u |v| (three). Not vacuous: a wrong third digit misses it by ~sigma / 64516.
        const double u = std::ldexp(1.0, -24), sg = ws;
        for (int64_t i = 0; i < n; ++i) {
          const double rec = three ? sg * (wa[i] + wb[i] / 254.0 + wc[i] / 64516.0) : sg * (wa[i] + wb[i] / 254.0);
          const double lim = sg * (three ? 1.0 / 129032 + u / 2 + u / 254 : 1.0 / 508 + u / 2) + u * std::fabs(v[i]);
          CHECK(std::fabs(rec - v[i]) <= lim * (1 + 1e-6), "%s: digit_row error n=%lld kind=%d three=%d i=%lld: %g > %g",
                level, static_cast<long long>(n), kind, three, static_cast<long long>(i), std::fabs(rec - v[i]), lim);
        }
      }
    }
  }
}

// Quotients v / scale that are exact ties (k + 1/2) for every k, and ones
// past +-qmax: the rounding (ties to even) and the clamp of the codes. The
// scale is 1/8 exactly (clip_ratio amax / qmax with amax = +-row[0]).
void test_quantize_ties(const char* level) {
  for (int bits : {8, 4}) {
    const int qmax = bits == 8 ? 127 : 7;
    const float amax = bits == 8 ? 16.f : 1.f, clip = bits == 8 ? 127.f / 128.f : 7.f / 8.f;
    for (int64_t n : {1000, 64, 30}) {
      std::vector<float> v(n);
      v[0] = amax, v[1] = -amax;  // quotients +-(qmax + 1): clamped
      for (int64_t i = 2; i < n; ++i) v[i] = (static_cast<float>((i - 2) % (2 * qmax + 2) - qmax - 1) + 0.5f) / 8.f;
      const int64_t bytes = qsvd::code_row_bytes(bits, n);
      std::vector<uint8_t> want(bytes), got(bytes, 0xA5);
      const float ws = qsvd::quantize_row_host(v.data(), n, bits, clip, want.data());
      const float gs = qc::quantize_row(v.data(), n, bits, clip, got.data());
      CHECK(ws == 0.125f, "the test's scale is 1/8: %g", ws);
      CHECK(same_float(gs, ws), "%s: quantize_row ties scale bits=%d n=%lld", level, bits, static_cast<long long>(n));
      CHECK(got == want, "%s: quantize_row ties codes bits=%d n=%lld", level, bits, static_cast<long long>(n));
    }
  }
}

void test_unpack(const char* level) {
  std::mt19937 rng(3);
  for (int64_t n : {2, 8, 30, 128, 254, 256, 642, 1100, 4098}) {
    std::vector<uint8_t> packed(n / 2);
    for (int64_t i = 0; i < n / 2; ++i) packed[i] = static_cast<uint8_t>(i < 256 ? i : rng());  // every byte first
    std::vector<int8_t> want(n), got(n, 99), deint(n, 99);
    qsvd::unpack_codes_host(packed.data(), n, 4, want.data());
    qc::unpack_int4_row(packed.data(), n, got.data());
    CHECK(got == want, "%s: unpack_int4_row n=%lld", level, static_cast<long long>(n));
    qc::unpack_int4_deinterleaved(packed.data(), n, deint.data());
    bool ok = true;
    for (int64_t j = 0; j < n; ++j) ok &= deint[j] == want[qc::int4_deinterleaved_source(j, n)];
    CHECK(ok, "%s: unpack_int4_deinterleaved n=%lld", level, static_cast<long long>(n));
    std::vector<int8_t> moved(n, 99);  // the natural int8 codes moved into the same order
    qc::deinterleave_int8_row(want.data(), n, moved.data());
    CHECK(moved == deint, "deinterleave_int8_row n=%lld", static_cast<long long>(n));
  }
}

void test_conversions(const char* level) {
  std::mt19937 rng(4);
  const int64_t n = 1037;  // not a multiple of any vector width
  std::vector<int8_t> codes(n);
  for (int64_t i = 0; i < n; ++i)  // every code, then random ones
    codes[i] = static_cast<int8_t>(i < 256 ? i - 128 : static_cast<int>(rng() % 256) - 128);
  std::vector<float> f(n);
  qc::int8_to_float(codes.data(), n, f.data());
  std::vector<uint16_t> b(n);
  qc::int8_to_bf16(codes.data(), n, b.data());
  bool ok_f = true, ok_b = true;
  for (int64_t i = 0; i < n; ++i) {
    ok_f &= f[i] == static_cast<float>(codes[i]);
    ok_b &= b[i] == bf16_bits_ref(static_cast<float>(codes[i]));
  }
  CHECK(ok_f, "%s: int8_to_float", level);
  CHECK(ok_b, "%s: int8_to_bf16", level);

  std::vector<int32_t> acc(n);
  std::vector<float> sb(n), row(n);
  for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<int32_t>(rng()) >> (i % 31), sb[i] = random_row(1, rng)[0];
  const float s = 0.0123f;
  qc::dequant_row(acc.data(), n, s, sb.data(), row.data());
  bool ok_d = true;
  for (int64_t i = 0; i < n; ++i)
    ok_d &= same_float(row[i], qsvd::mul_rn(qsvd::mul_rn(static_cast<float>(acc[i]), s), sb[i]));
  CHECK(ok_d, "%s: dequant_row", level);

  // Values over every binade, ties, subnormals, overflow, infinities, NaN.
  std::vector<float> x = random_row(n, rng, 100.f);
  for (int64_t i = 0; i < 300; ++i) x[i] = std::ldexp(x[i], static_cast<int>(i) - 150);
  x[300] = std::numeric_limits<float>::infinity(), x[301] = -x[300], x[302] = std::numeric_limits<float>::quiet_NaN();
  x[303] = 65519.f, x[304] = 65520.f, x[305] = 1e-45f, x[306] = 1.00048828125f /* a tie in fp16 */, x[307] = -0.f;
  for (int64_t i = 310; i < 330; ++i) {
    uint32_t u = bits_of(x[i]) | 0x8000u;  // bf16 ties
    std::memcpy(&x[i], &u, 4);
  }
  std::vector<uint16_t> bf(n), hi(n), lo(n), h(n, 0);
  qc::float_to_bf16_row(x.data(), n, bf.data());
  qc::split_bf16_row(x.data(), n, hi.data(), lo.data());
  bool ok_bf = true, ok_split = true;
  for (int64_t i = 0; i < n; ++i) {
    ok_bf &= bf[i] == bf16_bits_ref(x[i]);
    const uint16_t wh = bf16_bits_ref(x[i]);
    const uint32_t hu = static_cast<uint32_t>(wh) << 16;
    float hf;
    std::memcpy(&hf, &hu, 4);
    const float r = x[i] - hf;
    ok_split &= hi[i] == wh && lo[i] == (r != r ? 0 : bf16_bits_ref(r));
  }
  CHECK(ok_bf, "%s: float_to_bf16_row", level);
  CHECK(ok_split, "%s: split_bf16_row", level);

  const bool f16c = qc::float_to_half_row(x.data(), n, h.data());
  CHECK(f16c == (qc::active_isa() != qc::Isa::kBaseline), "%s: float_to_half_row ran F16C: %d", level, f16c);
  if (f16c) {
    bool ok_h = true;
    for (int64_t i = 0; i < n; ++i)
      if (x[i] == x[i]) ok_h &= h[i] == half_bits_ref(x[i]);
      else ok_h &= (h[i] & 0x7C00u) == 0x7C00u && (h[i] & 0x3FFu) != 0;  // a NaN stays a NaN
    CHECK(ok_h, "%s: float_to_half_row", level);
  }
}

void test_levels() {
  qc::Isa i;
  CHECK(qc::isa_from_name("avx512", &i) && i == qc::Isa::kAvx512, "avx512");
  CHECK(qc::isa_from_name("avx2", &i) && i == qc::Isa::kAvx2, "avx2");
  CHECK(qc::isa_from_name("baseline", &i) && i == qc::Isa::kBaseline, "baseline");
  CHECK(!qc::isa_from_name("AVX2", &i) && !qc::isa_from_name("auto", &i) && !qc::isa_from_name("", &i) &&
            !qc::isa_from_name(nullptr, &i),
        "bad names are refused");
  CHECK(qc::cpu_supports(qc::Isa::kBaseline), "baseline always runs");
  CHECK(qc::cpu_supports(qc::detected_isa()), "the detected level runs");
  const qc::Isa before = qc::active_isa();
  for (qc::Isa l : {qc::Isa::kAvx512, qc::Isa::kAvx2}) {
    if (qc::cpu_supports(l)) continue;
    CHECK(!qc::set_active_isa(l), "a level the CPU lacks is refused: %s", qc::isa_name(l));
    CHECK(qc::active_isa() == before, "a refused level changes nothing");
  }
}

int run_env_mode(const std::string& mode, const std::string& arg) {
  if (mode == "--env-level") {
    CHECK(qc::isa_env_error().empty(), "unexpected error: %s", qc::isa_env_error().c_str());
    CHECK(arg == qc::isa_name(qc::active_isa()), "level %s, want %s", qc::isa_name(qc::active_isa()), arg.c_str());
  } else if (mode == "--env-error") {
    const std::string& e = qc::isa_env_error();
    CHECK(e.find("QSVD_CPU_ISA") != std::string::npos && e.find(arg) != std::string::npos, "error: '%s'", e.c_str());
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3) return run_env_mode(argv[1], argv[2]);
  test_levels();
  int levels = 0;
  for (qc::Isa l : {qc::Isa::kAvx512, qc::Isa::kAvx2, qc::Isa::kBaseline}) {
    if (!qc::cpu_supports(l)) {
      std::printf("simd: %s skipped (this CPU lacks it)\n", qc::isa_name(l));
      continue;
    }
    CHECK(qc::set_active_isa(l) && qc::active_isa() == l, "set %s", qc::isa_name(l));
    CHECK(qc::weight_streaming_available() == (l == qc::Isa::kAvx512), "weight streaming at %s", qc::isa_name(l));
    test_hadamard_row(qc::isa_name(l));
    test_quantize_row(qc::isa_name(l));
    test_quantize_ties(qc::isa_name(l));
    test_digit_row(qc::isa_name(l));
    test_unpack(qc::isa_name(l));
    test_conversions(qc::isa_name(l));
    ++levels;
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("simd: all checks passed at %d ISA level(s)\n", levels);
  return 0;
}
