// Per-ISA-level timing of the element-wise loops of qsvd/cpu/simd.h, torch
// free: a quick check that no level is pathologically slow (a loop GCC
// lowers badly at one register width). Built by CMake beside the ctests:
//
//   cmake --build build/cmake --target bench_simd_levels
//   build/cmake/bench_simd_levels [K=4096] [samples=201] [loop-name-part]
//
// Each number is the median over `samples` calls on 32 rows of K values,
// in ns per row; one sample is far shorter than a scheduler slice, so on a
// shared machine the median is a time the loop ran undisturbed. Levels
// this CPU lacks print "-".
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "qsvd/cpu/isa.h"
#include "qsvd/cpu/simd.h"
#include "qsvd/hadamard.h"

namespace qc = qsvd::cpu;

namespace {

double median_ns(const std::function<void()>& f, int samples) {
  std::vector<double> t;
  f();
  for (int s = 0; s < samples; ++s) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - a).count());
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t K = argc > 1 ? std::atoi(argv[1]) : 4096, rows = 32;
  const int samples = argc > 2 ? std::atoi(argv[2]) : 201;
  const char* only = argc > 3 ? argv[3] : nullptr;
  const qsvd::hadamard::Factorization f = qsvd::hadamard::factorize(K);
  if (f.m == 0 || K % 2 != 0) {
    std::fprintf(stderr, "K=%lld: not a Hadamard size\n", static_cast<long long>(K));
    return 2;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const int64_t n = rows * K;
  std::vector<float> x(n), out(n), signs(K), work(K), scratch(f.m);
  for (auto& e : x) e = normal(rng);
  for (auto& e : signs) e = rng() % 2 ? 1.f : -1.f;
  std::vector<int8_t> i8(n);
  for (auto& e : i8) e = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  std::vector<uint8_t> packed(n / 2), codes(n);
  for (auto& e : packed) e = static_cast<uint8_t>(rng());
  std::vector<int32_t> acc(n);
  for (auto& e : acc) e = static_cast<int32_t>(rng()) >> 8;
  std::vector<uint16_t> h16(n), l16(n);
  const float norm = qsvd::hadamard::norm_factor(K);
  auto per_row = [&](auto fn) {
    return [&, fn] {
      for (int64_t r = 0; r < rows; ++r) fn(r * K);
    };
  };
  struct Case {
    const char* name;
    std::function<void()> run;
  };
  const std::vector<Case> cases = {
      {"hadamard_row", per_row([&](int64_t o) {
         qc::hadamard_row(&x[o], nullptr, work.data(), &out[o], f, norm, scratch.data());
       })},
      {"hadamard_row signs", per_row([&](int64_t o) {
         qc::hadamard_row(&x[o], signs.data(), work.data(), &out[o], f, norm, scratch.data());
       })},
      {"quantize_row 8", per_row([&](int64_t o) { qc::quantize_row(&x[o], K, 8, 1.f, &codes[o]); })},
      {"quantize_row 4", per_row([&](int64_t o) { qc::quantize_row(&x[o], K, 4, 1.f, &codes[o / 2]); })},
      {"unpack_int4_row", per_row([&](int64_t o) {
         qc::unpack_int4_row(&packed[o / 2], K, reinterpret_cast<int8_t*>(&codes[o]));
       })},
      {"unpack_int4_deint", per_row([&](int64_t o) {
         qc::unpack_int4_deinterleaved(&packed[o / 2], K, reinterpret_cast<int8_t*>(&codes[o]));
       })},
      {"dequant_row", per_row([&](int64_t o) { qc::dequant_row(&acc[o], K, 0.01f, signs.data(), &out[o]); })},
      {"int8_to_float", per_row([&](int64_t o) { qc::int8_to_float(&i8[o], K, &out[o]); })},
      {"int8_to_bf16", per_row([&](int64_t o) { qc::int8_to_bf16(&i8[o], K, &h16[o]); })},
      {"float_to_bf16_row", per_row([&](int64_t o) { qc::float_to_bf16_row(&x[o], K, &h16[o]); })},
      {"split_bf16_row", per_row([&](int64_t o) { qc::split_bf16_row(&x[o], K, &h16[o], &l16[o]); })},
      {"float_to_half_row", per_row([&](int64_t o) { qc::float_to_half_row(&x[o], K, &h16[o]); })},
      {"memcpy (reference)", per_row([&](int64_t o) { std::memcpy(&out[o], &x[o], K * sizeof(float)); })},
  };
  const qc::Isa levels[] = {qc::Isa::kAvx512, qc::Isa::kAvx2, qc::Isa::kBaseline};
  std::printf("K = %lld, ns per row (median of %d samples of %lld rows)\n%-20s", static_cast<long long>(K),
              samples, static_cast<long long>(rows), "loop");
  for (qc::Isa l : levels) std::printf("%12s", qc::isa_name(l));
  std::printf("\n");
  const qc::Isa before = qc::active_isa();
  for (const Case& c : cases) {
    if (only != nullptr && std::strstr(c.name, only) == nullptr) continue;
    std::printf("%-20s", c.name);
    for (qc::Isa l : levels) {
      if (!qc::set_active_isa(l)) {
        std::printf("%12s", "-");
        continue;
      }
      std::printf("%12.0f", median_ns(c.run, samples) / rows);
    }
    std::printf("\n");
  }
  qc::set_active_isa(before);
  std::printf("(float_to_half_row below avx2 returns at once: its callers convert with c10 there)\n");
  return 0;
}
