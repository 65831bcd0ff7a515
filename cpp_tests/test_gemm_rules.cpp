// ctest: quant_gemm's tuning rules (include/qsvd/kernels/quant_gemm_rules.h),
// the one implementation of rule matching (the launcher's; Python's tuner
// and explain() call it through _C.match_rule): first match wins, bounds are
// inclusive, bits 0 match any pair, a rule whose config cannot serve the
// call (wrong arch, bit pair, or not compiled) or whose knobs are invalid
// falls back to the built-in choice, and no rule gives the built-in choice.
#include <cstdint>

#include "check.h"
#include "qsvd/kernels/quant_gemm_rules.h"

namespace {

namespace qg = qsvd::gemm;
using qsvd_test::g_failures;

qg::GemmRule rule(int64_t m_min, int64_t m_max, qg::GemmConfig config, int a_bits = 0, int b_bits = 0) {
  qg::GemmRule r;
  r.m_min = m_min;
  r.m_max = m_max;
  r.a_bits = a_bits;
  r.b_bits = b_bits;
  r.choice.config = config;
  return r;
}

void test_first_match_and_bounds() {
  const qg::GemmRule rules[] = {rule(1, 16, qg::GemmConfig::kSm80Prefill, 8, 8),
                                rule(1, INT64_MAX, qg::GemmConfig::kSm80Decode)};
  const auto src = qg::ChoiceSource::kTable;
  qg::GemmDecision d = qg::decide(rules, 2, src, 80, 16, 64, 64, 8, 8);
  CHECK(d.rule == 0 && d.choice.config == qg::GemmConfig::kSm80Prefill && d.source == src, "M = 16 (upper bound)");
  d = qg::decide(rules, 2, src, 80, 17, 64, 64, 8, 8);
  CHECK(d.rule == 1 && d.choice.config == qg::GemmConfig::kSm80Decode, "M = 17 goes to the catch-all");
  d = qg::decide(rules, 2, src, 80, 1, 64, 64, 4, 4);
  CHECK(d.rule == 1, "bits (8, 8) do not match a W4A4 call; bits 0 match any");
  d = qg::decide(rules, 1, src, 80, 17, 64, 64, 8, 8);
  CHECK(d.rule == -1 && d.source == qg::ChoiceSource::kDefault &&
            d.choice.config == qg::select_config(80, 17, 8, 8),
        "no match: the built-in choice");
  qg::GemmRule nk = rule(1, INT64_MAX, qg::GemmConfig::kSm80Decode);
  nk.n_min = 100;
  nk.k_max = 50;
  CHECK(!qg::rule_matches(nk, 1, 99, 10, 8, 8) && !qg::rule_matches(nk, 1, 100, 51, 8, 8) &&
            qg::rule_matches(nk, 1, 100, 50, 8, 8),
        "N and K ranges are inclusive");
}

void test_fallbacks() {
  const auto src = qg::ChoiceSource::kTable;
  // An sm90 config cannot run on cc 80: the rule matches, the built-in choice runs.
  const qg::GemmRule hopper[] = {rule(1, INT64_MAX, qg::GemmConfig::kSm90Decode)};
  qg::GemmDecision d = qg::decide(hopper, 1, src, 80, 8, 64, 64, 8, 8);
  CHECK(d.rule == 0 && d.source == qg::ChoiceSource::kFallback && d.choice.config == qg::select_config(80, 8, 8, 8),
        "an sm90 config on an sm80 device falls back");
  // Invalid knobs (split_k with one split) fall back as well.
  qg::GemmRule bad = rule(1, INT64_MAX, qg::GemmConfig::kSm80Decode);
  bad.choice.mode = qg::StreamKMode::kSplitK;
  bad.choice.splits = 1;
  d = qg::decide(&bad, 1, src, 80, 8, 64, 64, 8, 8);
  CHECK(d.source == qg::ChoiceSource::kFallback, "split_k with 1 split is refused");
  // A config of the tune menu is not compiled in the default build.
  const qg::GemmRule tune[] = {rule(1, INT64_MAX, qg::GemmConfig::kSm80Decode32x64S4Streamk)};
  d = qg::decide(tune, 1, src, 80, 8, 64, 64, 8, 8);
  CHECK(d.source == qg::ChoiceSource::kFallback, "a config not compiled in falls back");
}

}  // namespace

int main() {
  test_first_match_and_bounds();
  test_fallbacks();
  return qsvd_test::report("gemm_rules");
}
