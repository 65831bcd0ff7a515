// Tuning rules of quant_gemm as plain C++ (no CUDA, no torch): an ordered
// list of (M bucket, N/K ranges, bits) -> (config, knobs), first match wins.
// The tables are JSON data (qsvd_kernels/tuning/); Python validates them and
// installs the rules of the matching table per device (csrc/tuning.cpp), and
// the launcher asks decide() for every call. A tuning problem never makes a
// call fail: a rule whose config cannot serve the call gives the built-in
// choice (source kFallback).
#pragma once

#include <cstdint>
#include <limits>

#include "qsvd/kernels/quant_gemm_menu.h"

namespace qsvd {
namespace gemm {

struct GemmRule {
  int64_t m_min = 1, m_max = std::numeric_limits<int64_t>::max();  // inclusive
  int64_t n_min = 1, n_max = std::numeric_limits<int64_t>::max();
  int64_t k_min = 1, k_max = std::numeric_limits<int64_t>::max();
  int a_bits = 0, b_bits = 0;  // 0: any
  GemmChoice choice;
};

enum class ChoiceSource : int {
  kDefault = 0,   // no rules installed for the device: select_config()
  kTable = 1,     // a rule of an installed table
  kForced = 2,    // a rule installed by qsvd_kernels.tuning.force()
  kFallback = 3,  // a rule matched but its config cannot serve the call: select_config()
};

constexpr const char* source_name(ChoiceSource s) {
  return s == ChoiceSource::kTable    ? "table"
         : s == ChoiceSource::kForced ? "forced"
         : s == ChoiceSource::kFallback ? "default (the matching rule's config cannot serve this call)"
                                        : "default";
}

struct GemmDecision {
  GemmChoice choice;
  ChoiceSource source = ChoiceSource::kDefault;
  int rule = -1;  // index of the matching rule, or -1
};

constexpr bool rule_matches(const GemmRule& r, int64_t M, int64_t N, int64_t K, int a_bits, int b_bits) {
  return M >= r.m_min && M <= r.m_max && N >= r.n_min && N <= r.n_max && K >= r.k_min && K <= r.k_max &&
         (r.a_bits == 0 || r.a_bits == a_bits) && (r.b_bits == 0 || r.b_bits == b_bits);
}

// The choice for a call: the first matching rule whose config serves it
// (compiled, instantiated for the bit pair, runs on cc) with valid knobs;
// the built-in choice otherwise.
inline GemmDecision decide(const GemmRule* rules, int n_rules, ChoiceSource rules_source, int cc, int64_t M,
                           int64_t N, int64_t K, int a_bits, int b_bits) {
  GemmDecision d;
  d.choice.config = select_config(cc, M, a_bits, b_bits);
  for (int i = 0; i < n_rules; ++i) {
    const GemmRule& r = rules[i];
    if (!rule_matches(r, M, N, K, a_bits, b_bits)) continue;
    d.rule = i;
    if (can_serve(r.choice.config, cc, a_bits, b_bits) &&
        valid_knobs(r.choice.mode, r.choice.splits, r.choice.raster)) {
      d.choice = r.choice;
      d.source = rules_source;
    } else {
      d.source = ChoiceSource::kFallback;
    }
    return d;
  }
  return d;
}

}  // namespace gemm
}  // namespace qsvd
