// The CPU kernels' ISA level, torch-free: which variant of the element-wise
// loops in qsvd/cpu/simd.h runs (and whether its AVX-512-only kernels do).
//
// Levels, each a superset of the one before:
//   baseline  x86-64 as the library is compiled (SSE2; no -march)
//   avx2      AVX2 + FMA + F16C (every AVX2 CPU has the other two)
//   avx512    avx2 + AVX-512 F/BW/VL/DQ (Skylake-SP and later, Zen 4 and
//             later; not the Xeon Phi, which lacks BW/VL/DQ)
// Every level returns the same bits as the scalar spec (qsvd/numerics.h,
// qsvd/hadamard.h), except where simd.h says an AVX-512-only kernel sums in
// another order within the same bound (the weight-streaming products).
//
// One process-wide level, shared by every translation unit (an inline
// function's static, outside any anonymous namespace): the highest level the
// CPU supports, or the one QSVD_CPU_ISA=avx512|avx2|baseline|auto names,
// read once, at the first use (the torch extension makes that the moment it
// is loaded). A value that is not a level, or names a level this CPU lacks,
// is not ignored: isa_env_error() then holds the message, and the torch
// layer raises it at import and on every op call. set_active_isa() changes
// the level at run time (tests, benchmarks); calls already running may
// finish on the old level, which changes no bits.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace qsvd {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Target attributes of the code each level runs. A level's CPU check
// (cpu_supports) asks for at least these features. The element-wise loops
// are compiled for "avx512f" and "avx2" alone, the targets of the
// target_clones they replace, so their code is what it was. The
// AVX-512-only kernels name what their intrinsics need.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QSVD_ISA_X86 1
#define QSVD_TARGET_AVX2 __attribute__((target("avx2")))
#define QSVD_TARGET_AVX512 __attribute__((target("avx512f")))
#define QSVD_TARGET_AVX512_KERNELS __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define QSVD_TARGET_F16C __attribute__((target("avx,f16c")))
#else
#define QSVD_ISA_X86 0
#define QSVD_TARGET_AVX2
#define QSVD_TARGET_AVX512
#define QSVD_TARGET_AVX512_KERNELS
#define QSVD_TARGET_F16C
#endif

inline const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "baseline";
  }
  return "?";
}

// "avx512", "avx2" or "baseline" -> *out; false for anything else.
inline bool isa_from_name(const char* s, Isa* out) {
  if (s == nullptr) return false;
  for (Isa i : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (std::strcmp(s, isa_name(i)) == 0) {
      *out = i;
      return true;
    }
  }
  return false;
}

// Whether this CPU (and its OS, for the AVX / AVX-512 register state) runs
// a level.
inline bool cpu_supports(Isa i) {
#if QSVD_ISA_X86
  __builtin_cpu_init();  // may run before libgcc's constructor (static initialisers)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (i) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return i == Isa::kBaseline;
#endif
}

// The highest level this CPU supports.
inline Isa detected_isa() {
  static const Isa d = cpu_supports(Isa::kAvx512) ? Isa::kAvx512
                       : cpu_supports(Isa::kAvx2) ? Isa::kAvx2
                                                  : Isa::kBaseline;
  return d;
}

struct IsaState {
  std::atomic<int> level;
  bool env_set = false;  // QSVD_CPU_ISA was set (and not empty)
  std::string env;       // its value
  std::string error;     // why it cannot be honoured; empty when it can

  IsaState() : level(static_cast<int>(detected_isa())) {
    const char* v = std::getenv("QSVD_CPU_ISA");
    if (v == nullptr || v[0] == '\0') return;
    env_set = true;
    env = v;
    if (env == "auto") return;
    Isa want;
    if (!isa_from_name(v, &want)) {
      error = "QSVD_CPU_ISA must be avx512, avx2, baseline or auto, got '" + env + "'";
    } else if (!cpu_supports(want)) {
      error = std::string("QSVD_CPU_ISA=") + v + ", but this CPU lacks it (it supports up to " +
              isa_name(detected_isa()) + ")";
    } else {
      level.store(static_cast<int>(want));
    }
  }
};

inline IsaState& isa_state() {
  static IsaState s;
  return s;
}

// The level the kernels run now.
inline Isa active_isa() { return static_cast<Isa>(isa_state().level.load(std::memory_order_relaxed)); }

// Non-empty when QSVD_CPU_ISA holds a value that cannot be honoured.
inline const std::string& isa_env_error() { return isa_state().error; }

// Sets the level; false (and nothing changes) when the CPU lacks it.
inline bool set_active_isa(Isa i) {
  if (!cpu_supports(i)) return false;
  isa_state().level.store(static_cast<int>(i), std::memory_order_relaxed);
  return true;
}

}  // namespace cpu
}  // namespace qsvd
