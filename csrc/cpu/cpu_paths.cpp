// The CPU kernels' path choices (cpu_paths.h says what each one is).
#include "cpu_paths.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "../plan.h"
#include "int8_brgemm.h"
#include "qsvd/cpu/simd.h"

namespace qsvd_torch {
namespace cpu {

namespace {
// QSVD_CPU_ISA is read when the library loads (not at some later first
// call, whose timing would depend on what ran before it).
const bool kIsaEnvRead = (qsvd::cpu::isa_state(), true);
}  // namespace

std::vector<std::pair<std::string, bool>> cpu_features() {
  std::vector<std::pair<std::string, bool>> f;
#if QSVD_ISA_X86
  __builtin_cpu_init();
#define QSVD_FEATURE(name, gcc) f.emplace_back(name, __builtin_cpu_supports(gcc) != 0)
  QSVD_FEATURE("avx2", "avx2");
  QSVD_FEATURE("fma", "fma");
  QSVD_FEATURE("f16c", "f16c");
  QSVD_FEATURE("avx512f", "avx512f");
  QSVD_FEATURE("avx512bw", "avx512bw");
  QSVD_FEATURE("avx512vl", "avx512vl");
  QSVD_FEATURE("avx512dq", "avx512dq");
  QSVD_FEATURE("avx512_vnni", "avx512vnni");
  QSVD_FEATURE("avx512_bf16", "avx512bf16");
  QSVD_FEATURE("amx_tile", "amx-tile");
  QSVD_FEATURE("amx_int8", "amx-int8");
  QSVD_FEATURE("amx_bf16", "amx-bf16");
#undef QSVD_FEATURE
#else
  for (const char* name : {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                           "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
    f.emplace_back(name, false);
#endif
  return f;
}

void check_isa_env(const char* op) {
  (void)kIsaEnvRead;
  const std::string& err = qsvd::cpu::isa_env_error();
  QSVD_CHECK(err.empty(), op, err, " (it is read once, when the library loads)");
}

bool int_mm_exact() {
  // at::_int_mm runs oneDNN only while it is enabled (else exact reference
  // loops): oneDNN's arithmetic is probed by the first call that would run
  // it, and the answer kept only if oneDNN stayed enabled through the probe
  // (another thread may switch it). -1: not probed yet.
  static std::atomic<int> state{-1};
  if (!at::globalContext().userEnabledMkldnn()) return true;
  const int known = state.load(std::memory_order_acquire);
  if (known >= 0) return known == 1;
  const auto probe = [](int64_t M) {
    const int64_t N = 8, K = 256;
    at::Tensor a = at::full({M, K}, 127, at::kChar);
    at::Tensor b = at::full({N, K}, 127, at::kChar);
    if (M > 1) a.select(0, 1).fill_(-127);
    b.select(0, 2).fill_(-127);
    if (M > 3) a.select(0, 3).narrow(0, 0, K / 2).fill_(-127);
    // Both layouts of the right operand the kernels pass: transposed (the
    // digit scores, q_lat's weights) and plain (V's codes, W_uv).
    const at::Tensor want = at::mm(a.to(at::kLong), b.to(at::kLong).t());
    return at::equal(at::_int_mm(a, b.t()).to(at::kLong), want) &&
           at::equal(at::_int_mm(a, b.t().contiguous()).to(at::kLong), want);
  };
  const bool exact = probe(4) && probe(1);  // M = 1: oneDNN's GEMV kernels dispatch apart
  if (at::globalContext().userEnabledMkldnn()) state.store(exact ? 1 : 0, std::memory_order_release);
  return exact;
}

bool int_mm_fast() { return at::globalContext().userEnabledMkldnn() && int_mm_exact(); }

bool int8_brgemm_ready() {
#if defined(CPUBLAS_BRGEMM_I8I8I32)
  if (!at::native::cpublas::could_pack(at::kChar)) return false;
  // The arithmetic, probed once on full-range codes (-128 and 127 on both
  // sides) against an int64 product.
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

GemmBf16F32 gemm_bf16_f32() {
  static const GemmBf16F32 fn = [] {
    // libtorch_cpu is loaded without RTLD_GLOBAL: look in it by name.
    void* sym = nullptr;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) != 0 && info.dli_fname != nullptr) {
      if (void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD)) sym = dlsym(lib, "cblas_gemm_bf16bf16f32");
    }
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32");
    return reinterpret_cast<GemmBf16F32>(sym);
  }();
  return fn;
}

bool quant_gemm_small_m_brgemm(QuantGemmKnob knob, const char* op) {
  switch (knob) {
    case QuantGemmKnob::kOneDnn: return false;
    case QuantGemmKnob::kBrgemm:
      QSVD_CHECK(int8_brgemm_ready(), op,
                 "QSVD_CPU_QUANT_GEMM=brgemm, but torch's int8 brgemm (at::native::cpublas::brgemm) is not "
                 "available here (it needs an AMX CPU and oneDNN enabled)");
      return true;
    case QuantGemmKnob::kAuto: break;
  }
  return int8_brgemm_ready();
}

DigitScores digit_scores() {
  if (int8_brgemm_ready() && gemm_bf16_f32() != nullptr) return DigitScores::kBrgemm;
  return int_mm_fast() ? DigitScores::kIntMm : DigitScores::kNone;
}

bool latent_split_available() { return digit_scores() != DigitScores::kNone; }

bool latent_absorbed_split(const char* op) {
  switch (plan::cpu_latent_gemm_knob(op)) {
    case LatentGemmKnob::kFp32: return false;
    case LatentGemmKnob::kSplit:
      QSVD_CHECK(latent_split_available(), op,
                 "QSVD_CPU_LATENT_GEMM=split, but this CPU or torch build (or oneDNN, switched off) lacks an exact "
                 "int8 GEMM (torch's int8 brgemm, AMX, with MKL's cblas_gemm_bf16bf16f32; or oneDNN's "
                 "at::_int_mm, exact where the CPU has VNNI)");
      return true;
    case LatentGemmKnob::kAuto: break;
  }
  return latent_split_available();
}

bool weight_streaming() { return qsvd::cpu::weight_streaming_available(); }

}  // namespace cpu
}  // namespace qsvd_torch
