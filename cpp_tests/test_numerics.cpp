// ctest unit tests of the torch-free host/device helpers (run on the CPU).
// No framework: a failing check prints where and why and the exit code is 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "qsvd/hadamard.h"
#include "qsvd/latent_cache_layout.h"
#include "qsvd/numerics.h"

namespace {

using qsvd_test::g_failures;

void test_int4_pack_unpack() {
  for (int lo = -8; lo <= 7; ++lo)
    for (int hi = -8; hi <= 7; ++hi) {
      const uint8_t b = qsvd::pack_int4(lo, hi);
      CHECK(qsvd::unpack_int4_lo(b) == lo, "lo %d hi %d -> byte %u", lo, hi, b);
      CHECK(qsvd::unpack_int4_hi(b) == hi, "lo %d hi %d -> byte %u", lo, hi, b);
    }
  // Layout: element 2i in the low nibble, two's complement.
  CHECK(qsvd::pack_int4(-1, 2) == 0x2F, "got 0x%02x", qsvd::pack_int4(-1, 2));
  CHECK(qsvd::pack_int4(7, -7) == 0x97, "got 0x%02x", qsvd::pack_int4(7, -7));
  // Every byte decodes to values in [-8, 7] and re-encodes to itself.
  for (int b = 0; b < 256; ++b) {
    const int lo = qsvd::unpack_int4_lo(static_cast<uint8_t>(b));
    const int hi = qsvd::unpack_int4_hi(static_cast<uint8_t>(b));
    CHECK(qsvd::pack_int4(lo, hi) == b, "byte %d", b);
  }
  std::vector<int8_t> out(4);
  const uint8_t packed[2] = {qsvd::pack_int4(-7, 3), qsvd::pack_int4(0, 7)};
  qsvd::unpack_codes_host(packed, 4, 4, out.data());
  CHECK(out[0] == -7 && out[1] == 3 && out[2] == 0 && out[3] == 7, "unpack_codes_host");
}

void test_round_half_even() {
  const float in[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.5f, 0.49999997f, 126.5f, 127.5f};
  const float want[] = {0.f, 2.f, 2.f, -0.f, -2.f, -2.f, 4.f, 0.f, 126.f, 128.f};
  for (int i = 0; i < 10; ++i)
    CHECK(qsvd::round_half_even(in[i]) == want[i], "round(%g) = %g, want %g", in[i],
          qsvd::round_half_even(in[i]), want[i]);
}

void test_quantize_value() {
  // Ties go to even: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2.
  CHECK(qsvd::quantize_value(2.5f, 1.f, 127) == 2, "tie 2.5");
  CHECK(qsvd::quantize_value(3.5f, 1.f, 127) == 4, "tie 3.5");
  CHECK(qsvd::quantize_value(-2.5f, 1.f, 127) == -2, "tie -2.5");
  CHECK(qsvd::quantize_value(1000.f, 1.f, 127) == 127, "clamp hi");
  CHECK(qsvd::quantize_value(-1000.f, 1.f, 127) == -127, "clamp lo (never -128)");
  CHECK(qsvd::quantize_value(-1000.f, 1.f, 7) == -7, "int4 clamp lo (never -8)");
  CHECK(qsvd::quantize_value(5.f, 0.f, 127) == 0, "zero scale");
  CHECK(qsvd::quantize_value(NAN, 1.f, 127) == 0, "NaN value");
  CHECK(qsvd::quantize_value(1.f, NAN, 127) == 0, "NaN scale");
  CHECK(qsvd::quantize_value(1.f, INFINITY, 127) == 0, "Inf scale");
  CHECK(qsvd::quant_scale(127.f, 1.f, 127) == 1.f, "scale");
  CHECK(qsvd::quant_scale(0.f, 0.9f, 127) == 0.f, "zero scale");
  CHECK(qsvd::quant_scale(14.f, 0.5f, 7) == 1.f, "int4 scale with clip");
}

void test_quantize_row() {
  std::vector<float> zeros(8, 0.f);
  int8_t codes[8];
  float s = qsvd::quantize_row_host(zeros.data(), 8, 8, 1.f, codes);
  CHECK(s == 0.f, "all-zero row scale %g", s);
  for (int i = 0; i < 8; ++i) CHECK(codes[i] == 0, "all-zero row code %d", codes[i]);

  const float row[4] = {-127.f, 63.5f, 0.4f, 1.f};
  s = qsvd::quantize_row_host(row, 4, 8, 1.f, codes);
  CHECK(s == 1.f, "scale %g", s);
  CHECK(codes[0] == -127 && codes[1] == 64 && codes[2] == 0 && codes[3] == 1, "codes");

  // clip 0.5: values beyond half the max saturate.
  s = qsvd::quantize_row_host(row, 4, 8, 0.5f, codes);
  CHECK(codes[0] == -127 && codes[1] == 127, "clipped codes %d %d", codes[0], codes[1]);

  // INT4 packing of a row: [7, -7, 1, 0] at scale 1.
  const float row4[4] = {7.f, -7.f, 1.f, 0.f};
  uint8_t packed[2];
  s = qsvd::quantize_row_host(row4, 4, 4, 1.f, packed);
  CHECK(s == 1.f, "int4 scale %g", s);
  CHECK(packed[0] == qsvd::pack_int4(7, -7) && packed[1] == qsvd::pack_int4(1, 0), "int4 packed");

  // NaN in a row makes the scale NaN (loud), codes stay in range.
  const float bad[3] = {1.f, NAN, 2.f};
  s = qsvd::quantize_row_host(bad, 3, 8, 1.f, codes);
  CHECK(std::isnan(s), "NaN row scale %g", s);
  const float bad2[3] = {NAN, 1.f, 2.f};
  s = qsvd::quantize_row_host(bad2, 3, 8, 1.f, codes);
  CHECK(std::isnan(s), "NaN-first row scale %g", s);
}

void test_factorize() {
  using qsvd::hadamard::factorize;
  struct Case { int64_t K; int m; int log_n; };
  const Case cases[] = {{1, 1, 0},      {2, 1, 1},     {4096, 1, 12},   {32768, 1, 15},
                        {5120, 20, 8},  {3072, 12, 8}, {576, 36, 4},    {1152, 36, 5},
                        {12, 12, 0},    {28, 28, 0},   {7168, 28, 8},   {40, 20, 1},
                        {6, 0, 0},      {10, 0, 0},    {3, 0, 0},       {44, 0, 0},
                        {65536, 0, 0},  {0, 0, 0},     {-4, 0, 0},      {24576, 12, 11},
                        {36 * 1024, 0, 0}};
  for (const auto& c : cases) {
    const auto f = factorize(c.K);
    CHECK(f.m == c.m && (c.m == 0 || f.log_n == c.log_n), "factorize(%lld) = (%d, %d), want (%d, %d)",
          static_cast<long long>(c.K), f.m, f.log_n, c.m, c.log_n);
  }
  // Every factorization reproduces K.
  for (int64_t K = 1; K <= qsvd::hadamard::kMaxDim; ++K) {
    const auto f = factorize(K);
    if (f.m) CHECK(f.m * (int64_t{1} << f.log_n) == K, "K = %lld", static_cast<long long>(K));
  }
}

int supported_orders() {
  int n = 0;
  for (int64_t K = 1; K <= qsvd::hadamard::kMaxDim; ++K) n += qsvd::hadamard::is_supported_dim(K);
  return n;
}

void test_base_matrices() {
  for (int m : {1, 12, 20, 28, 36}) {
    const int8_t* H = qsvd::hadamard::base_matrix_host(m);
    CHECK(H != nullptr, "base %d", m);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) {
        CHECK(H[i * m + j] == 1 || H[i * m + j] == -1, "H%d[%d][%d] = %d", m, i, j, H[i * m + j]);
        int dot = 0;
        for (int k = 0; k < m; ++k) dot += H[i * m + k] * H[j * m + k];
        CHECK(dot == (i == j ? m : 0), "H%d rows %d.%d = %d", m, i, j, dot);
      }
  }
  CHECK(qsvd::hadamard::base_matrix_host(40) == nullptr, "no base 40");
}

// Entry (i, j) of H_K (unnormalised), straight from the definition.
int hadamard_entry(int64_t i, int64_t j, qsvd::hadamard::Factorization f) {
  const int64_t n = int64_t{1} << f.log_n;
  const int8_t* H = qsvd::hadamard::base_matrix_host(f.m);
  const int64_t ai = i / n, bi = i % n, aj = j / n, bj = j % n;
  const int sylvester = (__builtin_popcountll(static_cast<uint64_t>(bi & bj)) & 1) ? -1 : 1;
  return H[ai * f.m + aj] * sylvester;
}

void test_transform_every_order() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 1.f);
  int orders = 0;
  for (int64_t K = 1; K <= qsvd::hadamard::kMaxDim; ++K) {
    const auto f = qsvd::hadamard::factorize(K);
    if (!f.m) continue;
    ++orders;
    const float norm = qsvd::hadamard::norm_factor(K);
    std::vector<float> v(K), scratch(f.m);

    // Basis vectors: exact arithmetic (sums of one +-1), so row i of
    // H_K / sqrt(K) must come out exactly.
    for (int64_t i : {int64_t{0}, K / 3, K - 1}) {
      std::fill(v.begin(), v.end(), 0.f);
      v[i] = 1.f;
      qsvd::hadamard::transform_row_host(v.data(), f, norm, scratch.data());
      for (int64_t j = 0; j < K; ++j) {
        const float want = static_cast<float>(hadamard_entry(i, j, f)) * norm;
        if (v[j] != want) {
          CHECK(false, "K=%lld e_%lld[%lld] = %g, want %g", static_cast<long long>(K),
                static_cast<long long>(i), static_cast<long long>(j), v[j], want);
          break;
        }
      }
    }

    // Random input: orthogonality preserves the norm; for K <= 2048 compare
    // with the dense product in double. Error bound: each of the log2 N + m
    // additions rounds once, on partial sums bounded by sum|x|.
    std::vector<float> x(K);
    double sum_abs = 0, sum_sq = 0;
    for (auto& e : x) {
      e = normal(rng);
      sum_abs += std::fabs(e);
      sum_sq += double(e) * e;
    }
    v = x;
    qsvd::hadamard::transform_row_host(v.data(), f, norm, scratch.data());
    double out_sq = 0;
    for (float e : v) out_sq += double(e) * e;
    CHECK(std::fabs(out_sq - sum_sq) <= 1e-5 * sum_sq, "K=%lld norm %g vs %g",
          static_cast<long long>(K), out_sq, sum_sq);
    if (K <= 2048) {
      const double tol = (f.log_n + f.m + 2) * std::ldexp(1.0, -24) * sum_abs / std::sqrt(double(K));
      for (int64_t j = 0; j < K; ++j) {
        double ref = 0;
        for (int64_t i = 0; i < K; ++i) ref += double(x[i]) * hadamard_entry(i, j, f);
        ref /= std::sqrt(double(K));
        if (std::fabs(ref - v[j]) > tol) {
          CHECK(false, "K=%lld y[%lld] = %.9g, dense %.9g, tol %g", static_cast<long long>(K),
                static_cast<long long>(j), v[j], ref, tol);
          break;
        }
      }
    }
  }
  CHECK(orders == supported_orders() && orders == 60, "tested %d orders", orders);
}

}  // namespace

// Both latent cache layouts address the same slot's codes and scale where
// docs/ops.md says: separate (codes stride row_bytes, scales stride 4) and
// packed rows (both strides row_bytes + 4, scale right after the codes).
void test_latent_cache_layout() {
  CHECK(qsvd::packed_row_bytes(8, 512) == 516, "got %lld", static_cast<long long>(qsvd::packed_row_bytes(8, 512)));
  CHECK(qsvd::packed_row_bytes(4, 512) == 260, "got %lld", static_cast<long long>(qsvd::packed_row_bytes(4, 512)));
  static_assert(qsvd::packed_row_bytes(8, 16) == 20, "packed_row_bytes is constexpr");
  for (int bits : {8, 4}) {
    const int64_t r = 96, row_bytes = qsvd::code_row_bytes(bits, r), slots = 7;
    std::vector<uint8_t> codes(slots * row_bytes), packed(slots * (row_bytes + 4));
    std::vector<float> scales(slots);
    const qsvd::LatentCacheLayout sep = qsvd::separate_latent_layout(codes.data(), scales.data(), bits, r);
    const qsvd::LatentCacheLayout pk = qsvd::packed_latent_layout(packed.data(), bits, r);
    CHECK(sep.code_stride == row_bytes && sep.scale_stride == 4, "bits %d", bits);
    CHECK(pk.code_stride == row_bytes + 4 && pk.scale_stride == row_bytes + 4, "bits %d", bits);
    for (int64_t s = 0; s < slots; ++s) {
      CHECK(sep.codes_of(s) == codes.data() + s * row_bytes, "bits %d slot %lld", bits, static_cast<long long>(s));
      CHECK(sep.scale_of(s) == scales.data() + s, "bits %d slot %lld", bits, static_cast<long long>(s));
      CHECK(pk.codes_of(s) == packed.data() + s * (row_bytes + 4), "bits %d slot %lld", bits,
            static_cast<long long>(s));
      CHECK(reinterpret_cast<uint8_t*>(pk.scale_of(s)) == packed.data() + s * (row_bytes + 4) + row_bytes,
            "bits %d slot %lld", bits, static_cast<long long>(s));
    }
  }
}

int main() {
  test_int4_pack_unpack();
  test_round_half_even();
  test_quantize_value();
  test_quantize_row();
  test_factorize();
  test_base_matrices();
  test_transform_every_order();
  test_latent_cache_layout();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("numerics: all checks passed (%d Hadamard orders)\n", supported_orders());
  return 0;
}
